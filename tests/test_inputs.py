"""The input catalogue: for every public function, bad and edge inputs and the outcome each must give.

A row is ``row(id, call, expect)``: ``id`` starts with the public name it exercises
(``"nt_xent/empty z1"``), ``call`` is a function of no arguments, and ``expect`` is one of

* ``raises(ValueError, "temperature")``: that exception, whose message matches the regex (the
  argument's name, at least);
* ``gives(check)``: it returns, and ``check(result)`` holds (``finite``, ``nonfinite``, ``close_to(...)``
  or any predicate);

Rows whose input could abort the process (a C++ or FAISS exception inside an OpenMP region, say)
go in ``SUBPROCESS_ROWS`` as source code, run in a fresh interpreter: an abort there is a failing
test, not a dead suite. Every public name of ``fastssl.__all__`` has at least one row
(``test_every_public_name_has_rows``). Each domain keeps its rows in its own section below.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import fastssl

ROWS: list = []
SUBPROCESS_ROWS: list = []


def row(id: str, call, expect) -> None:
    ROWS.append(pytest.param(call, expect, id=id))


def subprocess_row(id: str, code: str, expect_stdout: str) -> None:
    """`code` runs in a fresh interpreter and must exit 0 printing a line that matches `expect_stdout`."""
    SUBPROCESS_ROWS.append(pytest.param(textwrap.dedent(code), expect_stdout, id=id))


def raises(exc: type[BaseException], match: str):
    return ("raises", exc, match)


def gives(check):
    return ("gives", check)


def _tensors(result):
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _tensors(r)]
    if isinstance(result, dict):
        return [t for r in result.values() for t in _tensors(r)]
    return []


def finite(result) -> bool:
    """Every floating tensor in the result is finite."""
    return all(bool(torch.isfinite(t).all()) for t in _tensors(result) if t.is_floating_point())


def nonfinite(result) -> bool:
    """The (first) floating tensor of the result holds a NaN or an inf: a non-finite input was not
    turned into a finite number."""
    t = next(t for t in _tensors(result) if t.is_floating_point())
    return not bool(torch.isfinite(t).all())


def close_to(expected, rtol: float = 1e-5, atol: float = 1e-6):
    """The (first) tensor of the result equals `expected` (a tensor, or a function of no arguments
    computing it) within tolerance."""

    def check(result) -> bool:
        want = expected() if callable(expected) else expected
        got = _tensors(result)[0]
        return torch.allclose(got.double(), torch.as_tensor(want).double(), rtol=rtol, atol=atol)

    check.__name__ = "close_to"
    return check


# ---------------------------------------------------------------------------------------------
# contrastive: nt_xent, NTXentLoss, info_nce, InfoNCELoss


# ---------------------------------------------------------------------------------------------
# mixing: mochi_logits, mochi_loss, MemoryQueue


# ---------------------------------------------------------------------------------------------
# masking: random_masking, block_masking, noise_masking, unshuffle, masked_mse_loss, patchify, unpatchify


# ---------------------------------------------------------------------------------------------
# adversarial: pgd_step_, random_start, pgd_attack, instance_attack, feature_attack, robust_accuracy


# ---------------------------------------------------------------------------------------------
# neighbors: knn_search, knn_classify, knn_pseudo_labels, KNNClassifier, kmeans, cluster_pseudo_labels,
# cluster_metrics


# ---------------------------------------------------------------------------------------------
# environment: FASTSSL_IMPL


def _env_impl(value: str, fn):
    """fn() with FASTSSL_IMPL set to `value` (restored after)."""

    def call():
        old = os.environ.get("FASTSSL_IMPL")
        os.environ["FASTSSL_IMPL"] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["FASTSSL_IMPL"]
            else:
                os.environ["FASTSSL_IMPL"] = old

    return call


def _env_calls():
    """One call per op family that reads FASTSSL_IMPL through impl="auto" (CPU tensors)."""
    z = torch.randn(6, 5, dtype=torch.float64)
    x = torch.rand(2, 5, 3, dtype=torch.float64)
    mask = torch.ones(2, 5)
    visible, _, ids = fastssl.random_masking(x, 0.5, generator=torch.Generator().manual_seed(0), impl="reference")
    return {
        "nt_xent": lambda **kw: fastssl.nt_xent(z[:3], z[3:], **kw),
        "info_nce": lambda **kw: fastssl.info_nce(z[:3], z[3:], **kw),
        "mochi_loss": lambda **kw: fastssl.mochi_loss(
            z[:3], z[3:], z, n_hard=4, n_mix=2, n_mix_query=1, generator=torch.Generator().manual_seed(0), **kw
        ),
        "random_masking": lambda **kw: fastssl.random_masking(
            x, 0.5, generator=torch.Generator().manual_seed(0), **kw
        )[0],
        "unshuffle": lambda **kw: fastssl.unshuffle(visible, ids, torch.zeros(3, dtype=torch.float64), **kw),
        "masked_mse_loss": lambda **kw: fastssl.masked_mse_loss(x, x.flip(0), mask, **kw),
        "pgd_step_": lambda **kw: fastssl.pgd_step_(x.clone(), x - 0.5, x, eps=0.1, alpha=0.05, **kw),
    }


for _name, _call in _env_calls().items():
    for _value in ("garbage", "CPP", " cpp"):
        row(f"{_name}/FASTSSL_IMPL={_value!r}", _env_impl(_value, _call), raises(ValueError, "FASTSSL_IMPL"))
    # empty means unset: the "auto" result; an explicit impl= is not overridden by a bad variable
    row(f"{_name}/FASTSSL_IMPL=''", _env_impl("", _call), gives(close_to(lambda c=_call: c(impl="cpp"), 1e-12)))
    row(f"{_name}/FASTSSL_IMPL=garbage, impl='cpp'", _env_impl("garbage", lambda c=_call: c(impl="cpp")), gives(finite))
    row(
        f"{_name}/FASTSSL_IMPL=reference",
        _env_impl("reference", _call),
        gives(close_to(lambda c=_call: c(impl="reference"), 1e-12)),
    )


# ---------------------------------------------------------------------------------------------
# the runner


@pytest.mark.parametrize(("call", "expect"), ROWS)
def test_row(call, expect):
    if expect[0] == "raises":
        _, exc, match = expect
        with pytest.raises(exc, match=match):
            call()
    else:
        result = call()
        assert expect[1](result), f"{getattr(expect[1], '__name__', expect[1])} failed for {result!r}"


@pytest.mark.parametrize(("code", "expect_stdout"), SUBPROCESS_ROWS)
def test_subprocess_row(code, expect_stdout):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"exit {done.returncode} (a negative code is a signal):\n{done.stderr[-3000:]}"
    assert re.search(expect_stdout, done.stdout), done.stdout[-2000:]


def test_every_public_name_has_rows():
    ids = [p.id for p in ROWS + SUBPROCESS_ROWS]
    missing = [name for name in fastssl.__all__ if not name.startswith("_") and not any(
        re.match(rf"{re.escape(name)}\b", i) for i in ids
    )]  # fmt: skip
    assert not missing, f"public names without a row in the input catalogue: {missing}"
