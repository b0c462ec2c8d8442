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
# prototypes: dino_loss, DINOLoss, ibot_loss, IBOTLoss, swav_loss, koleo_loss, teacher_temperature_schedule


def _dino_inputs(v=4, g=2, b=3, k=10, d=6, dtype=torch.float32):
    return (torch.randn(v * b, d, dtype=dtype), torch.randn(g * b, d, dtype=dtype), torch.randn(k, d, dtype=dtype),
            torch.randn(k, d, dtype=dtype))  # fmt: skip


def _dino(student=None, teacher=None, weight=None, teacher_weight=None, center=None, **kw):
    s, t, w, tw = _dino_inputs()
    given = (student, teacher, weight, teacher_weight)
    pick = [x if x is not None else y for x, y in zip(given, (s, t, w, tw), strict=True)]
    return lambda: fastssl.dino_loss(*pick, center, **kw)


def _nan_at(x, i=0):
    x = x.clone()
    x.view(-1)[i] = float("nan")
    return x


_S, _T, _W, _TW = _dino_inputs()
row("dino_loss/student rows not a multiple of B", _dino(student=torch.randn(10, 6)), raises(ValueError, "student"))
row("dino_loss/teacher rows not a multiple of n_global_crops", _dino(teacher=torch.randn(5, 6)),
    raises(ValueError, "n_global_crops"))  # fmt: skip
row("dino_loss/n_global_crops more than crops", _dino(student=torch.randn(3, 6), teacher=torch.randn(6, 6),
    n_global_crops=2), raises(ValueError, "n_global_crops"))  # fmt: skip
row("dino_loss/one crop, no pair", _dino(student=torch.randn(3, 6), teacher=torch.randn(3, 6), n_global_crops=1),
    raises(ValueError, "pair"))  # fmt: skip
row("dino_loss/K mismatch", _dino(teacher_weight=torch.randn(9, 6)), raises(ValueError, "teacher_weight"))
row("dino_loss/d mismatch", _dino(weight=torch.randn(10, 5)), raises(ValueError, "weight"))
row("dino_loss/center of the wrong size", _dino(center=torch.zeros(9)), raises(ValueError, "center"))
row("dino_loss/student_temperature 0", _dino(student_temperature=0.0), raises(ValueError, "student_temperature"))
row("dino_loss/teacher_temperature < 0", _dino(teacher_temperature=-0.04), raises(ValueError, "teacher_temperature"))
row("dino_loss/unknown centering", _dino(centering="mean"), raises(ValueError, "centering"))
row("dino_loss/negative sinkhorn_iterations", _dino(centering="sinkhorn", sinkhorn_iterations=-1),
    raises(ValueError, "sinkhorn_iterations"))  # fmt: skip
row("dino_loss/dtype mismatch", _dino(weight=torch.randn(10, 6, dtype=torch.float64)), raises(TypeError, "weight"))
row("dino_loss/integer student", _dino(student=torch.ones(12, 6, dtype=torch.int64)), raises(TypeError, "student"))
row("dino_loss/NaN student", _dino(student=_nan_at(_S)), gives(nonfinite))
row("dino_loss/NaN teacher, sinkhorn", _dino(teacher=_nan_at(_T), centering="sinkhorn"), gives(nonfinite))
row("dino_loss/inf weight", _dino(weight=_W.index_fill(0, torch.tensor([2]), float("inf"))), gives(nonfinite))
row("dino_loss/K = 1 gives 0", _dino(weight=torch.randn(1, 6), teacher_weight=torch.randn(1, 6)), gives(close_to(0.0)))
row("dino_loss/huge logits stay finite", _dino(student=1e4 * _S, teacher=1e4 * _T, centering="none"), gives(finite))
row("DINOLoss/center_momentum > 1", lambda: fastssl.DINOLoss(10, center_momentum=1.5),
    raises(ValueError, "center_momentum"))  # fmt: skip
row("DINOLoss/forward updates the center", lambda: (lambda m: (m(_S, _T, _W, _TW), m.center)[1])(fastssl.DINOLoss(10)),
    gives(lambda c: bool(c.abs().sum() > 0)))  # fmt: skip
row("ibot_loss/teacher rows differ from student", lambda: fastssl.ibot_loss(_S, _T, _W, _TW),
    raises(ValueError, "teacher"))  # fmt: skip
row("ibot_loss/token_weights of the wrong length", lambda: fastssl.ibot_loss(_S, _S, _W, _TW,
    token_weights=torch.ones(5)), raises(ValueError, "token_weights"))  # fmt: skip
row("ibot_loss/n_images 0", lambda: fastssl.ibot_loss(_S, _S, _W, _TW, n_images=0), raises(ValueError, "n_images"))
row("ibot_loss/NaN teacher", lambda: fastssl.ibot_loss(_S, _nan_at(_S), _W, _TW), gives(nonfinite))
row("IBOTLoss/unknown centering", lambda: fastssl.IBOTLoss(10, centering="ema"), raises(ValueError, "centering"))
row("IBOTLoss/forward", lambda: fastssl.IBOTLoss(10)(_S, _S, _W, _TW), gives(finite))
row("swav_loss/rows not a multiple of n_crops", lambda: fastssl.swav_loss(torch.randn(10, 6), _W, n_crops=4),
    raises(ValueError, "n_crops"))  # fmt: skip
row("swav_loss/n_crops_for_assign > n_crops", lambda: fastssl.swav_loss(_S, _W, n_crops=2, n_crops_for_assign=3),
    raises(ValueError, "n_crops_for_assign"))  # fmt: skip
row("swav_loss/epsilon 0", lambda: fastssl.swav_loss(_S, _W, n_crops=4, epsilon=0.0), raises(ValueError, "epsilon"))
row("swav_loss/queue d mismatch", lambda: fastssl.swav_loss(_S, _W, n_crops=4, queue=torch.randn(7, 5)),
    raises(ValueError, "queue"))  # fmt: skip
row("swav_loss/queue per crop, wrong count",
    lambda: fastssl.swav_loss(_S, _W, n_crops=4, queue=torch.randn(3, 7, 6)), raises(ValueError, "queue"))  # fmt: skip
row("swav_loss/NaN z", lambda: fastssl.swav_loss(_nan_at(_S), _W, n_crops=4), gives(nonfinite))
row("koleo_loss/one row", lambda: fastssl.koleo_loss(torch.randn(1, 4)), raises(ValueError, "2 rows"))
row("koleo_loss/eps 0", lambda: fastssl.koleo_loss(torch.randn(3, 4), eps=0.0), raises(ValueError, "eps"))
row("koleo_loss/duplicate rows are finite", lambda: fastssl.koleo_loss(torch.ones(4, 3)), gives(finite))
row("koleo_loss/NaN", lambda: fastssl.koleo_loss(_nan_at(torch.randn(5, 3))), gives(nonfinite))
row("teacher_temperature_schedule/warmup longer than training",
    lambda: fastssl.teacher_temperature_schedule(0.04, 0.07, 30, 10), raises(ValueError, "warmup_epochs"))  # fmt: skip
row("teacher_temperature_schedule/final 0", lambda: fastssl.teacher_temperature_schedule(0.04, 0.0, 3, 10),
    raises(ValueError, "final"))  # fmt: skip


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
