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


# ---------------------------------------------------------------------------------------------
# pairwise and redundancy: siglip_loss, SigLIPLoss, alignment_loss, hypersphere_loss,
# negative_cosine_similarity, barlow_twins_loss, vicreg_loss

_A, _B = torch.randn(6, 4), torch.randn(6, 4)


def _with(x, i, value):
    x = x.clone()
    x.view(-1)[i] = value
    return x


row("siglip_loss/empty image", lambda: fastssl.siglip_loss(_A[:0], _B[:0]), raises(ValueError, "image"))
row("siglip_loss/1-D image", lambda: fastssl.siglip_loss(_A[0], _B[0]), raises(ValueError, "image"))
row("siglip_loss/integer image", lambda: fastssl.siglip_loss(_A.long(), _B.long()), raises(TypeError, "image"))
row("siglip_loss/text rows differ", lambda: fastssl.siglip_loss(_A, _B[:5]), raises(ValueError, "text"))
row("siglip_loss/text dtype differs", lambda: fastssl.siglip_loss(_A, _B.double()), raises(TypeError, "text"))
row("siglip_loss/scale nan", lambda: fastssl.siglip_loss(_A, _B, scale=float("nan")), raises(ValueError, "scale"))
row("siglip_loss/scale string", lambda: fastssl.siglip_loss(_A, _B, scale="10"), raises(TypeError, "scale"))
row(
    "siglip_loss/scale two values",
    lambda: fastssl.siglip_loss(_A, _B, scale=torch.ones(2)),
    raises(ValueError, "scale"),
)
row(
    "siglip_loss/scale integer tensor",
    lambda: fastssl.siglip_loss(_A, _B, scale=torch.tensor(3)),
    raises(TypeError, "scale"),
)
row("siglip_loss/bias inf", lambda: fastssl.siglip_loss(_A, _B, bias=float("inf")), raises(ValueError, "bias"))
row("siglip_loss/reduction", lambda: fastssl.siglip_loss(_A, _B, reduction="avg"), raises(ValueError, "reduction"))
row("siglip_loss/impl", lambda: fastssl.siglip_loss(_A, _B, impl="fast"), raises(ValueError, "impl"))
row("siglip_loss/gather not bool", lambda: fastssl.siglip_loss(_A, _B, gather=1), raises(TypeError, "gather"))
row(
    "siglip_loss/gather without group",
    lambda: fastssl.siglip_loss(_A, _B, gather=True),
    raises(RuntimeError, "process group"),
)
row("siglip_loss/nan image", lambda: fastssl.siglip_loss(_with(_A, 3, float("nan")), _B), gives(nonfinite))
row("siglip_loss/inf text", lambda: fastssl.siglip_loss(_A, _with(_B, 0, float("inf"))), gives(nonfinite))
row(
    "siglip_loss/nan image triton",
    lambda: fastssl.siglip_loss(_with(_A, 3, float("nan")), _B, impl="triton"),
    gives(nonfinite),
)
row(
    "siglip_loss/nan scale tensor",
    lambda: fastssl.siglip_loss(_A, _B, scale=torch.tensor(float("nan"))),
    gives(nonfinite),
)
row("siglip_loss/zero row", lambda: fastssl.siglip_loss(_with(_A, slice(0, 4), 0.0), _B), gives(finite))
row(
    "siglip_loss/one pair",
    lambda: fastssl.siglip_loss(_A[:1], _B[:1], scale=1.0, bias=0.0),
    gives(close_to(lambda: torch.nn.functional.softplus(-torch.cosine_similarity(_A[:1], _B[:1])).sum())),
)
row("SigLIPLoss/scale_init zero", lambda: fastssl.SigLIPLoss(scale_init=0.0), raises(ValueError, "scale_init"))
row("SigLIPLoss/bias_init nan", lambda: fastssl.SigLIPLoss(bias_init=float("nan")), raises(ValueError, "bias_init"))
row("SigLIPLoss/learnable not bool", lambda: fastssl.SigLIPLoss(learnable="yes"), raises(TypeError, "learnable"))
row("SigLIPLoss/forward", lambda: fastssl.SigLIPLoss()(_A, _B), gives(finite))
row("alignment_loss/alpha zero", lambda: fastssl.alignment_loss(_A, _B, alpha=0), raises(ValueError, "alpha"))
row("alignment_loss/y rows differ", lambda: fastssl.alignment_loss(_A, _B[:2]), raises(ValueError, "y"))
row("alignment_loss/nan x", lambda: fastssl.alignment_loss(_with(_A, 0, float("nan")), _B), gives(nonfinite))
row("alignment_loss/same rows", lambda: fastssl.alignment_loss(_A, 3 * _A), gives(close_to(0.0, atol=1e-6)))
row("hypersphere_loss/one row", lambda: fastssl.hypersphere_loss(_A[:1], _B[:1]), raises(ValueError, "z1"))
row("hypersphere_loss/t zero", lambda: fastssl.hypersphere_loss(_A, _B, t=0.0), raises(ValueError, "t"))
row("hypersphere_loss/lam negative", lambda: fastssl.hypersphere_loss(_A, _B, lam=-1.0), raises(ValueError, "lam"))
row("hypersphere_loss/z2 dtype differs", lambda: fastssl.hypersphere_loss(_A, _B.half()), raises(TypeError, "z2"))
row("hypersphere_loss/nan z2", lambda: fastssl.hypersphere_loss(_A, _with(_B, 5, float("nan"))), gives(nonfinite))
row("hypersphere_loss/coincident rows", lambda: fastssl.hypersphere_loss(_A[:1].repeat(4, 1), _B[:4]), gives(finite))
row(
    "negative_cosine_similarity/3-D p",
    lambda: fastssl.negative_cosine_similarity(_A[None], _B[None]),
    raises(ValueError, "p"),
)
row(
    "negative_cosine_similarity/z rows differ",
    lambda: fastssl.negative_cosine_similarity(_A, _B[:3]),
    raises(ValueError, "z"),
)
row("negative_cosine_similarity/zero row", lambda: fastssl.negative_cosine_similarity(_A * 0, _B), gives(close_to(0.0)))
row(
    "negative_cosine_similarity/nan p",
    lambda: fastssl.negative_cosine_similarity(_with(_A, 1, float("nan")), _B),
    gives(nonfinite),
)
row("barlow_twins_loss/one row", lambda: fastssl.barlow_twins_loss(_A[:1], _B[:1]), raises(ValueError, "z1"))
row("barlow_twins_loss/z2 rows differ", lambda: fastssl.barlow_twins_loss(_A, _B[:4]), raises(ValueError, "z2"))
row(
    "barlow_twins_loss/lambda_ negative",
    lambda: fastssl.barlow_twins_loss(_A, _B, lambda_=-1.0),
    raises(ValueError, "lambda_"),
)
row(
    "barlow_twins_loss/gather without group",
    lambda: fastssl.barlow_twins_loss(_A, _B, gather=True),
    raises(RuntimeError, "process group"),
)
row("barlow_twins_loss/nan z1", lambda: fastssl.barlow_twins_loss(_with(_A, 2, float("nan")), _B), gives(nonfinite))
row(
    "barlow_twins_loss/constant column",
    lambda: fastssl.barlow_twins_loss(_with(_A, slice(0, None, 4), 1.0), _B),
    gives(finite),
)
row("vicreg_loss/one row", lambda: fastssl.vicreg_loss(_A[:1], _B[:1]), raises(ValueError, "z1"))
row("vicreg_loss/eps zero", lambda: fastssl.vicreg_loss(_A, _B, eps=0.0), raises(ValueError, "eps"))
row(
    "vicreg_loss/invariance negative",
    lambda: fastssl.vicreg_loss(_A, _B, invariance=-1.0),
    raises(ValueError, "invariance"),
)
row("vicreg_loss/gather not bool", lambda: fastssl.vicreg_loss(_A, _B, gather="no"), raises(TypeError, "gather"))
row("vicreg_loss/inf z2", lambda: fastssl.vicreg_loss(_A, _with(_B, 0, float("inf"))), gives(nonfinite))
row(
    "vicreg_loss/constant views", lambda: fastssl.vicreg_loss(_A * 0, _B * 0), gives(close_to(25.0 * (1 - 1e-2)))
)  # only the variance hinge: 1 − √eps per column


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
