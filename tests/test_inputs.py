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

import copy
import math
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
# adversarial: pgd_step_, random_start, pgd_attack, instance_attack, feature_attack, robust_accuracy,
# apgd_attack, autoattack, fab_attack, square_attack, trades_loss, mart_loss

_AX = torch.rand(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
_AY = torch.tensor([0, 1, 2, 1])
_AG = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
torch.manual_seed(0)
_AMODEL = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
_AENC = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))


def _step(x_adv=None, grad=None, x_orig=None, **kw):
    kw = {"eps": 0.1, "alpha": 0.01, **kw}
    x_adv = _AX.clone() if x_adv is None else x_adv
    return fastssl.pgd_step_(x_adv, _AG if grad is None else grad, _AX if x_orig is None else x_orig, **kw)


def _linf_step(x, g, x0, eps, alpha, lo=0.0, hi=1.0):
    return lambda: (x0 + (x + alpha * g.sign() - x0).clamp(-eps, eps)).clamp(lo, hi)


def _attack(x=None, y="default", **kw):
    return fastssl.pgd_attack(_AMODEL, _AX if x is None else x, _AY if isinstance(y, str) else y, **kw)


def _in_box(eps):
    return lambda r: bool(((r - _AX).abs() <= eps + 1e-6).all() and (r >= 0).all() and (r <= 1).all())


_step_known = _linf_step(_AX, _AG, _AX, 0.1, 0.01)
row("pgd_step_/known step", _step, gives(close_to(_step_known)))
row(
    "pgd_step_/1-D x",
    lambda: _step(_AX.flatten().clone(), _AG.flatten(), _AX.flatten()),
    gives(close_to(lambda: _step_known().flatten())),
)
row(
    "pgd_step_/one sample", lambda: _step(_AX[:1].clone(), _AG[:1], _AX[:1]), gives(close_to(lambda: _step_known()[:1]))
)
row("pgd_step_/fp64", lambda: _step(_AX.double(), _AG.double(), _AX.double()), gives(close_to(_step_known)))
row(
    "pgd_step_/bf16",
    lambda: _step(_AX.bfloat16(), _AG.bfloat16(), _AX.bfloat16()),
    gives(close_to(_step_known, rtol=1e-2, atol=1e-2)),
)
row(
    "pgd_step_/fp16",
    lambda: _step(_AX.half(), _AG.half(), _AX.half()),
    gives(close_to(_step_known, rtol=1e-3, atol=1e-3)),
)
row(
    "pgd_step_/transposed x_adv",
    lambda: _step(_AX.clone().transpose(2, 3), _AG.transpose(2, 3), _AX.transpose(2, 3)),
    gives(close_to(lambda: _step_known().transpose(2, 3))),
)
row("pgd_step_/expanded x_adv", lambda: _step(_AX[:1].expand(4, 3, 2, 2)), raises(ValueError, "x_adv"))
row(
    "pgd_step_/expanded grad",
    lambda: _step(grad=_AG[:1].expand(4, 3, 2, 2)),
    gives(close_to(_linf_step(_AX, _AG[:1].expand(4, 3, 2, 2), _AX, 0.1, 0.01))),
)
row("pgd_step_/empty batch", lambda: _step(_AX[:0].clone(), _AG[:0], _AX[:0]), raises(ValueError, "x_adv"))
row(
    "pgd_step_/scalar x_adv",
    lambda: _step(torch.tensor(0.5), torch.tensor(1.0), torch.tensor(0.5)),
    raises(ValueError, "x_adv"),
)
row("pgd_step_/int x_adv", lambda: _step(torch.zeros(4, 3, dtype=torch.long)), raises(TypeError, "x_adv"))
row("pgd_step_/complex x_adv", lambda: _step(torch.zeros(4, 3, dtype=torch.cfloat)), raises(TypeError, "x_adv"))
row("pgd_step_/list x_adv", lambda: _step([[0.5]]), raises(TypeError, "x_adv"))
row("pgd_step_/grad shape", lambda: _step(grad=_AG[:, :1]), raises(ValueError, "grad"))
row("pgd_step_/grad dtype", lambda: _step(grad=_AG.double()), raises(TypeError, "grad"))
row("pgd_step_/x_orig batch", lambda: _step(x_orig=_AX[:3]), raises(ValueError, "x_orig"))
row("pgd_step_/NaN grad", lambda: _step(grad=_AG.masked_fill(_AG > 1, float("nan"))), gives(nonfinite))
row("pgd_step_/inf grad", lambda: _step(grad=_AG * float("inf")), gives(close_to(_step_known)))
row(
    "pgd_step_/large grad l2",
    lambda: _step(grad=_AG * 1e15, norm="l2"),
    gives(close_to(lambda: _step(grad=_AG, norm="l2"))),
)
row("pgd_step_/tiny grad l2", lambda: _step(grad=_AG * 1e-30, norm="l2"), gives(close_to(_AX)))
row("pgd_step_/zero grad", lambda: _step(grad=torch.zeros_like(_AG)), gives(close_to(_AX)))
row("pgd_step_/eps 0", lambda: _step(eps=0.0), gives(close_to(_AX)))
row("pgd_step_/eps huge", lambda: _step(eps=1e30), gives(close_to(_linf_step(_AX, _AG, _AX, 1e30, 0.01))))
row("pgd_step_/eps negative", lambda: _step(eps=-0.1), raises(ValueError, "eps"))
row("pgd_step_/eps NaN", lambda: _step(eps=float("nan")), raises(ValueError, "eps"))
row("pgd_step_/eps inf", lambda: _step(eps=float("inf")), raises(ValueError, "eps"))
row("pgd_step_/eps string", lambda: _step(eps="0.1"), raises(TypeError, "eps"))
row("pgd_step_/eps bool", lambda: _step(eps=True), raises(TypeError, "eps"))
row(
    "pgd_step_/eps per sample",
    lambda: _step(eps=torch.tensor([0.0, 0.1, 0.1, 0.1])),
    gives(lambda r: bool(torch.equal(r[0], _AX[0]))),
)
row("pgd_step_/eps wrong shape", lambda: _step(eps=torch.full((3,), 0.1)), raises(ValueError, "eps"))
row(
    "pgd_step_/eps tensor with grad",
    lambda: _step(eps=torch.full((4,), 0.1, requires_grad=True)),
    gives(close_to(_step_known)),
)
row("pgd_step_/alpha 0", lambda: _step(alpha=0.0), raises(ValueError, "alpha"))
row("pgd_step_/alpha tiny", lambda: _step(alpha=1e-30), gives(close_to(_AX)))
row(
    "pgd_step_/alpha NaN tensor",
    lambda: _step(alpha=torch.tensor([0.1, float("nan"), 0.1, 0.1])),
    raises(ValueError, "alpha"),
)
row("pgd_step_/norm", lambda: _step(norm="l1"), raises(ValueError, "norm"))
row("pgd_step_/bounds reversed", lambda: _step(bounds=(1.0, 0.0)), raises(ValueError, "bounds"))
row("pgd_step_/bounds NaN", lambda: _step(bounds=(0.0, float("nan"))), raises(ValueError, "bounds"))
row(
    "pgd_step_/bounds None",
    lambda: _step(bounds=None),
    gives(close_to(_linf_step(_AX, _AG, _AX, 0.1, 0.01, -1e9, 1e9))),
)
row("pgd_step_/impl", lambda: _step(impl="fast"), raises(ValueError, "impl"))

row(
    "random_start/linf in the box",
    lambda: fastssl.random_start(_AX, 0.1, generator=torch.Generator().manual_seed(0)),
    gives(_in_box(0.1)),
)
row(
    "random_start/l2 1-D x",
    lambda: fastssl.random_start(_AX.flatten(), 0.1, norm="l2"),
    gives(lambda r: r.shape == (48,) and bool(((r - _AX.flatten()).abs() <= 0.1 + 1e-6).all())),
)
row("random_start/eps 0", lambda: fastssl.random_start(_AX, 0.0), gives(close_to(_AX)))
row(
    "random_start/eps per sample",
    lambda: fastssl.random_start(_AX, torch.tensor([0.0, 0.1, 0.1, 0.1])),
    gives(lambda r: bool(torch.equal(r[0], _AX[0]))),
)
row("random_start/eps negative", lambda: fastssl.random_start(_AX, -0.1), raises(ValueError, "eps"))
row("random_start/x outside bounds", lambda: fastssl.random_start(_AX + 1, 0.1), raises(ValueError, "bounds"))
row(
    "random_start/x NaN",
    lambda: fastssl.random_start(_AX.masked_fill(_AX > 0.5, float("nan")), 0.1),
    raises(ValueError, "non-finite"),
)
row("random_start/empty", lambda: fastssl.random_start(_AX[:0], 0.1), raises(ValueError, "x"))
row("random_start/generator type", lambda: fastssl.random_start(_AX, 0.1, generator=0), raises(TypeError, "generator"))
row("random_start/norm", lambda: fastssl.random_start(_AX, 0.1, norm="linf2"), raises(ValueError, "norm"))

row("pgd_attack/in the box", lambda: _attack(eps=0.1, alpha=0.03, steps=3), gives(_in_box(0.1)))
row("pgd_attack/steps 0 no start", lambda: _attack(steps=0, random_start=False), gives(close_to(_AX)))
row(
    "pgd_attack/1-D x l2",
    lambda: fastssl.pgd_attack(
        lambda v: torch.stack([v, -v], 1),
        _AX.flatten(),
        torch.zeros(48, dtype=torch.long),
        eps=0.1,
        alpha=0.05,
        steps=2,
        norm="l2",
    ),
    gives(lambda r: r.shape == (48,) and bool(((r - _AX.flatten()).abs() <= 0.1 + 1e-6).all())),
)
row("pgd_attack/one sample", lambda: _attack(_AX[:1], _AY[:1], steps=2), gives(finite))
row(
    "pgd_attack/fp64",
    lambda: fastssl.pgd_attack(copy.deepcopy(_AMODEL).double(), _AX.double(), _AY, steps=2),
    gives(finite),
)
row("pgd_attack/eps negative", lambda: _attack(eps=-0.1), raises(ValueError, "eps"))
row("pgd_attack/alpha 0", lambda: _attack(alpha=0.0), raises(ValueError, "alpha"))
row("pgd_attack/steps negative", lambda: _attack(steps=-1), raises(ValueError, "steps"))
row("pgd_attack/steps float", lambda: _attack(steps=2.0), raises(TypeError, "steps"))
row("pgd_attack/restarts 0", lambda: _attack(restarts=0), raises(ValueError, "restarts"))
row("pgd_attack/y length", lambda: _attack(y=_AY[:3]), raises(ValueError, "y"))
row("pgd_attack/no y no loss", lambda: _attack(y=None), raises(ValueError, "loss_fn"))
row("pgd_attack/loss_fn shape", lambda: _attack(loss_fn=lambda out, y: out), raises(ValueError, "loss_fn"))
row(
    "pgd_attack/model returns scalar",
    lambda: fastssl.pgd_attack(lambda v: v.sum(), _AX, _AY),
    raises(ValueError, "model"),
)
row("pgd_attack/model not callable", lambda: fastssl.pgd_attack(3, _AX, _AY), raises(TypeError, "model"))
row("pgd_attack/x NaN", lambda: _attack(_AX.masked_fill(_AX > 0.5, float("nan"))), raises(ValueError, "non-finite"))
row(
    "pgd_attack/x inf",
    lambda: _attack(_AX.masked_fill(_AX > 0.5, float("inf")), bounds=None),
    raises(ValueError, "non-finite"),
)
row("pgd_attack/bounds", lambda: _attack(bounds=(0.0, 0.0)), raises(ValueError, "bounds"))
row(
    "pgd_attack/generator type",
    lambda: _attack(generator="seed"),
    raises(TypeError, "generator"),
)

_Z2 = _AX.flip(0)
row(
    "instance_attack/in the box",
    lambda: fastssl.instance_attack(_AENC, _AX, _Z2, eps=0.1, alpha=0.03, steps=2),
    gives(_in_box(0.1)),
)
row(
    "instance_attack/temperature 0 steps 0",
    lambda: fastssl.instance_attack(_AENC, _AX, _Z2, temperature=0, steps=0),
    raises(ValueError, "temperature"),
)
row(
    "instance_attack/temperature NaN",
    lambda: fastssl.instance_attack(_AENC, _AX, _Z2, temperature=float("nan")),
    raises(ValueError, "temperature"),
)
row("instance_attack/x2 batch", lambda: fastssl.instance_attack(_AENC, _AX, _Z2[:3]), raises(ValueError, "x2"))
row("instance_attack/x1 int", lambda: fastssl.instance_attack(_AENC, _AX.long(), _Z2), raises(TypeError, "x1"))

row(
    "feature_attack/in the box",
    lambda: fastssl.feature_attack(_AENC, _AX, eps=0.1, alpha=0.03, steps=2),
    gives(_in_box(0.1)),
)
row(
    "feature_attack/1-D embeddings",
    lambda: fastssl.feature_attack(lambda v: v.flatten(1).sum(1), _AX, eps=0.1, steps=2),
    gives(_in_box(0.1)),
)
row("feature_attack/eps NaN", lambda: fastssl.feature_attack(_AENC, _AX, eps=float("nan")), raises(ValueError, "eps"))
row("feature_attack/empty", lambda: fastssl.feature_attack(_AENC, _AX[:0]), raises(ValueError, "x"))

row(
    "robust_accuracy/clean only",
    lambda: fastssl.robust_accuracy(_AMODEL, _AX, _AY, eps=0),
    gives(lambda r: list(r) == [0.0] and r[0.0] == (_AMODEL(_AX).argmax(1) == _AY).double().mean().item()),
)
row(
    "robust_accuracy/in [0, 1]",
    lambda: fastssl.robust_accuracy(_AMODEL, _AX, _AY, eps=(0.0, 0.1), steps=2),
    gives(lambda r: all(0 <= v <= 1 for v in r.values())),
)
row(
    "apgd_attack/success is misclassified",
    lambda: fastssl.apgd_attack(_AMODEL, _AX, _AY, eps=0.1, steps=5),
    gives(lambda r: bool(torch.equal(r[1], _AMODEL(r[0]).argmax(1) != _AY))),
)
row("apgd_attack/eps 0", lambda: fastssl.apgd_attack(_AMODEL, _AX, _AY, eps=0.0), raises(ValueError, "eps"))
row(
    "apgd_attack/dlr with 2 classes",
    lambda: fastssl.apgd_attack(lambda v: _AMODEL(v)[:, :2], _AX, _AY % 2, eps=0.1, loss="dlr"),
    raises(ValueError, "classes"),
)
row(
    "apgd_attack/targeted with 3 classes",
    lambda: fastssl.apgd_attack(_AMODEL, _AX, _AY, eps=0.1, targeted=True),
    raises(ValueError, "classes"),
)
row(
    "apgd_attack/x outside bounds",
    lambda: fastssl.apgd_attack(_AMODEL, _AX + 1, _AY, eps=0.1),
    raises(ValueError, "bounds"),
)
row(
    "apgd_attack/model output 1-D",
    lambda: fastssl.apgd_attack(lambda v: v.flatten(1).sum(1), _AX, _AY, eps=0.1),
    raises(ValueError, "model"),
)
row(
    "autoattack/standard l2",
    lambda: fastssl.autoattack(_AMODEL, _AX, _AY, eps=0.1, norm="l2"),
    raises(NotImplementedError, "linf"),
)
row(
    "autoattack/standard bounds",
    lambda: fastssl.autoattack(_AMODEL, _AX, _AY, eps=0.1, bounds=(-1.0, 1.0)),
    raises(ValueError, "bounds"),
)
row(
    "autoattack/standard",
    lambda: fastssl.autoattack(_IMODEL, _IMG, _IY, eps=0.1, steps=3, n_target_classes=3, queries=20, progress=False),
    gives(
        lambda r: (
            bool(torch.equal(r[1], _IMODEL(r[0]).argmax(1) == _IY)) and bool(((r[0] - _IMG).abs() <= 0.1 + 1e-6).all())
        )
    ),
)
row(
    "autoattack/rand eot_iter 0",
    lambda: fastssl.autoattack(_AMODEL, _AX, _AY, eps=0.1, version="rand", eot_iter=0),
    raises(ValueError, "eot_iter"),
)
row(
    "autoattack/progress 1",
    lambda: fastssl.autoattack(_AMODEL, _AX, _AY, eps=0.1, version="apgd", progress=1),
    raises(TypeError, "progress"),
)
row(
    "autoattack/version",
    lambda: fastssl.autoattack(_AMODEL, _AX, _AY, eps=0.1, version="plus"),
    raises(ValueError, "version"),
)
row(
    "autoattack/attacks",
    lambda: fastssl.autoattack(_AMODEL, _AX, _AY, eps=0.1, attacks=["pgd"]),
    raises(ValueError, "attacks"),
)
row(
    "autoattack/apgd-ce",
    lambda: fastssl.autoattack(_AMODEL, _AX, _AY, eps=0.1, attacks=["apgd-ce"], steps=5, progress=False),
    gives(lambda r: bool(torch.equal(r[1], _AMODEL(r[0]).argmax(1) == _AY))),
)
row(
    "robust_accuracy/eps negative",
    lambda: fastssl.robust_accuracy(_AMODEL, _AX, _AY, eps=(0.1, -0.1)),
    raises(ValueError, "eps"),
)
row("robust_accuracy/eps empty", lambda: fastssl.robust_accuracy(_AMODEL, _AX, _AY, eps=()), raises(ValueError, "eps"))
row(
    "robust_accuracy/targeted",
    lambda: fastssl.robust_accuracy(_AMODEL, _AX, _AY, targeted=True),
    raises(ValueError, "targeted"),
)
row("robust_accuracy/float labels", lambda: fastssl.robust_accuracy(_AMODEL, _AX, _AY.float()), raises(TypeError, "y"))
row("robust_accuracy/labels length", lambda: fastssl.robust_accuracy(_AMODEL, _AX, _AY[:2]), raises(ValueError, "y"))

_IMG = torch.rand(4, 1, 5, 5, generator=torch.Generator().manual_seed(0))
_IMODEL = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(25, 5))
_IY = _IMODEL(_IMG).argmax(1).detach()
row(
    "fab_attack/success is misclassified and in the ball",
    lambda: fastssl.fab_attack(_IMODEL, _IMG, _IY, eps=0.2, steps=5, n_target_classes=4),
    gives(
        lambda r: (
            bool(torch.equal(r[1], _IMODEL(r[0]).argmax(1) != _IY)) and bool(((r[0] - _IMG).abs() <= 0.2 + 1e-6).all())
        )
    ),
)
row(
    "fab_attack/one sample",
    lambda: fastssl.fab_attack(_IMODEL, _IMG[:1], _IY[:1], eps=0.1, steps=2, n_target_classes=4),
    gives(lambda r: r[0].shape == (1, 1, 5, 5)),
)
row("fab_attack/eps 0", lambda: fastssl.fab_attack(_IMODEL, _IMG, _IY, eps=0.0), raises(ValueError, "eps"))
row("fab_attack/steps 0", lambda: fastssl.fab_attack(_IMODEL, _IMG, _IY, eps=0.1, steps=0), raises(ValueError, "steps"))
row("fab_attack/eta 0", lambda: fastssl.fab_attack(_IMODEL, _IMG, _IY, eps=0.1, eta=0), raises(ValueError, "eta"))
row("fab_attack/float labels", lambda: fastssl.fab_attack(_IMODEL, _IMG, _IY.float(), eps=0.1), raises(TypeError, "y"))
row(
    "fab_attack/x NaN",
    lambda: fastssl.fab_attack(_IMODEL, _IMG * math.nan, _IY, eps=0.1),
    raises(ValueError, "non-finite"),
)
row(
    "fab_attack/x outside [0, 1]",
    lambda: fastssl.fab_attack(_IMODEL, _IMG + 1, _IY, eps=0.1),
    raises(ValueError, "bounds"),
)
row(
    "fab_attack/targets",
    lambda: fastssl.fab_attack(_IMODEL, _IMG, _IY, eps=0.1, n_target_classes=5),
    raises(ValueError, "n_target_classes"),
)
row(
    "fab_attack/model output 1-D",
    lambda: fastssl.fab_attack(lambda v: v.flatten(1).sum(1), _IMG, _IY, eps=0.1),
    raises(ValueError, "model"),
)
row(
    "fab_attack/early_stop 1",
    lambda: fastssl.fab_attack(_IMODEL, _IMG, _IY, eps=0.1, early_stop=1),
    raises(TypeError, "early_stop"),
)
row(
    "square_attack/success is misclassified and in the ball",
    lambda: fastssl.square_attack(_IMODEL, _IMG, _IY, eps=0.2, queries=30, generator=torch.Generator().manual_seed(0)),
    gives(
        lambda r: (
            bool(torch.equal(r[1], _IMODEL(r[0]).argmax(1) != _IY)) and bool(((r[0] - _IMG).abs() <= 0.2 + 1e-6).all())
        )
    ),
)
row(
    "square_attack/one query",
    lambda: fastssl.square_attack(_IMODEL, _IMG, _IY, eps=0.1, queries=1),
    gives(lambda r: r[0].shape == _IMG.shape),
)
row(
    "square_attack/1x1 images",
    lambda: fastssl.square_attack(
        lambda v: torch.cat([v.flatten(1), -v.flatten(1)], 1),
        _IMG[:, :, :1, :1],
        torch.ones(4, dtype=torch.long),
        eps=0.1,
        queries=3,
    ),
    gives(lambda r: r[0].shape == (4, 1, 1, 1)),
)
row(
    "square_attack/flat x",
    lambda: fastssl.square_attack(_IMODEL, _IMG.flatten(1), _IY, eps=0.1),
    raises(ValueError, "images"),
)
row(
    "square_attack/eps negative", lambda: fastssl.square_attack(_IMODEL, _IMG, _IY, eps=-0.1), raises(ValueError, "eps")
)
row(
    "square_attack/queries 0",
    lambda: fastssl.square_attack(_IMODEL, _IMG, _IY, eps=0.1, queries=0),
    raises(ValueError, "queries"),
)
row(
    "square_attack/p_init NaN",
    lambda: fastssl.square_attack(_IMODEL, _IMG, _IY, eps=0.1, p_init=math.nan),
    raises(ValueError, "p_init"),
)
row(
    "square_attack/generator type",
    lambda: fastssl.square_attack(_IMODEL, _IMG, _IY, eps=0.1, generator=1),
    raises(TypeError, "generator"),
)
row(
    "square_attack/x outside [0, 1]",
    lambda: fastssl.square_attack(_IMODEL, _IMG - 1, _IY, eps=0.1),
    raises(ValueError, "bounds"),
)

for _name, _loss in (("trades_loss", fastssl.trades_loss), ("mart_loss", fastssl.mart_loss)):
    row(
        f"{_name}/finite scalar",
        lambda f=_loss: f(_AMODEL, _AX, _AY, steps=2),
        gives(lambda r: finite(r) and r.dim() == 0),
    )
    row(f"{_name}/steps 0", lambda f=_loss: f(_AMODEL, _AX, _AY, steps=0), gives(finite))
    row(f"{_name}/one sample", lambda f=_loss: f(_AMODEL, _AX[:1], _AY[:1], steps=1), gives(finite))
    row(f"{_name}/beta negative", lambda f=_loss: f(_AMODEL, _AX, _AY, beta=-1.0), raises(ValueError, "beta"))
    row(f"{_name}/eps negative", lambda f=_loss: f(_AMODEL, _AX, _AY, eps=-0.1), raises(ValueError, "eps"))
    row(f"{_name}/step_size 0", lambda f=_loss: f(_AMODEL, _AX, _AY, step_size=0.0), raises(ValueError, "step_size"))
    row(f"{_name}/steps float", lambda f=_loss: f(_AMODEL, _AX, _AY, steps=2.0), raises(TypeError, "steps"))
    row(f"{_name}/float labels", lambda f=_loss: f(_AMODEL, _AX, _AY.float()), raises(TypeError, "y"))
    row(f"{_name}/x outside bounds", lambda f=_loss: f(_AMODEL, _AX + 1, _AY), raises(ValueError, "bounds"))
    row(f"{_name}/x NaN", lambda f=_loss: f(_AMODEL, _AX.masked_fill(_AX > 0.5, math.nan), _AY),
        raises(ValueError, "non-finite"))  # fmt: skip
    row(f"{_name}/model output 1-D", lambda f=_loss: f(lambda v: v.flatten(1).sum(1), _AX, _AY),
        raises(ValueError, "model"))  # fmt: skip
    row(f"{_name}/eval_attack 1", lambda f=_loss: f(_AMODEL, _AX, _AY, eval_attack=1), raises(TypeError, "eval_attack"))
    row(f"{_name}/NaN weights give NaN", lambda f=_loss: f(lambda v: _AMODEL(v) * math.nan, _AX, _AY, steps=1),
        gives(nonfinite))  # fmt: skip
    row(f"{_name}/mode kept", lambda f=_loss: (f(_AMODEL.train(), _AX, _AY, steps=1, eval_attack=True),
        _AMODEL.training), gives(lambda r: r[1] is True))  # fmt: skip
row("trades_loss/norm", lambda: fastssl.trades_loss(_AMODEL, _AX, _AY, norm="l1"), raises(ValueError, "norm"))
row("trades_loss/l2", lambda: fastssl.trades_loss(_AMODEL, _AX, _AY, norm="l2", eps=0.5, step_size=0.1, steps=2),
    gives(finite))  # fmt: skip
row("trades_loss/beta 0 is cross-entropy", lambda: fastssl.trades_loss(_AMODEL, _AX, _AY, beta=0.0, steps=1),
    gives(close_to(lambda: torch.nn.functional.cross_entropy(_AMODEL(_AX), _AY))))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# neighbors: knn_search, knn_classify, knn_pseudo_labels, KNNClassifier, kmeans, cluster_pseudo_labels,
# cluster_metrics


# ---------------------------------------------------------------------------------------------
# environment: FASTSSL_IMPL


# ---------------------------------------------------------------------------------------------
# semi-supervised: fixmatch_loss, FlexMatchLoss, FreeMatchLoss, freematch_fairness_loss, SoftMatchLoss,
# uda_loss, tsa_threshold


def _logits(b=6, c=4, *, seed=0, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, c, generator=g)).to(dtype)


def _with(x, i, value):
    x = x.clone()
    x[i] = value
    return x


def _classes(w):
    return max(1, w.shape[-1])  # of the module: the logits' own number, so that their checks speak


_W, _S = _logits(), _logits(seed=1)
_IDX = torch.arange(6)
_SEMISUP = {  # the functions and modules, each as f(weak, strong)
    "fixmatch_loss": lambda w, s: fastssl.fixmatch_loss(w, s),
    "uda_loss": lambda w, s: fastssl.uda_loss(w, s),
    "FlexMatchLoss": lambda w, s: fastssl.FlexMatchLoss(_classes(w), 10)(w, s, torch.arange(w.shape[0])),
    "FreeMatchLoss": lambda w, s: fastssl.FreeMatchLoss(_classes(w))(w, s),
    "SoftMatchLoss": lambda w, s: fastssl.SoftMatchLoss(_classes(w))(w, s),
}
for _name, _f in _SEMISUP.items():
    row(f"{_name}/1-D logits", lambda f=_f: f(_W[0], _S[0]), raises(ValueError, "logits_weak"))
    row(f"{_name}/views of different shapes", lambda f=_f: f(_W, _S[:, :3]), raises(ValueError, "logits_strong"))
    row(f"{_name}/views of different dtypes", lambda f=_f: f(_W, _S.double()), raises(TypeError, "logits_strong"))
    row(f"{_name}/integer logits", lambda f=_f: f(_W.long(), _S.long()), raises(TypeError, "logits_weak"))
    row(f"{_name}/empty batch", lambda f=_f: f(_W[:0], _S[:0]), raises(ValueError, "logits_weak"))
    row(f"{_name}/no classes", lambda f=_f: f(_W[:, :0], _S[:, :0]), raises(ValueError, "logits_weak"))
    # one class: every row is certain of it, so the consistency loss is 0
    row(f"{_name}/C = 1", lambda f=_f: f(_W[:, :1], _S[:, :1]), gives(close_to(0.0)))
    row(f"{_name}/NaN in the weak view", lambda f=_f: f(_with(_W, (2, 1), math.nan), _S), gives(nonfinite))
    row(f"{_name}/inf in the strong view", lambda f=_f: f(_W, _with(_S, (0, 3), math.inf)), gives(nonfinite))
    row(f"{_name}/-inf logit in the weak view", lambda f=_f: f(_with(_W, (4, 0), -math.inf), _S), gives(nonfinite))
    row(
        f"{_name}/fp16 logits",
        lambda f=_f: f(_W.half(), _S.half()),
        gives(lambda r: finite(r) and r[0].dtype == torch.float32),
    )
    row(f"{_name}/bf16 logits", lambda f=_f: f(_W.bfloat16(), _S.bfloat16()), gives(finite))

for _t in (-0.1, 1.5, math.nan):
    row(
        f"fixmatch_loss/threshold {_t}",
        lambda t=_t: fastssl.fixmatch_loss(_W, _S, threshold=t),
        raises(ValueError, "threshold"),
    )
    row(f"uda_loss/threshold {_t}", lambda t=_t: fastssl.uda_loss(_W, _S, threshold=t), raises(ValueError, "threshold"))
    row(
        f"FlexMatchLoss/threshold {_t}",
        lambda t=_t: fastssl.FlexMatchLoss(4, 6, threshold=t),
        raises(ValueError, "threshold"),
    )
row(
    "fixmatch_loss/threshold True",
    lambda: fastssl.fixmatch_loss(_W, _S, threshold=True),
    raises(TypeError, "threshold"),
)
row("fixmatch_loss/threshold 0 keeps every row", lambda: fastssl.fixmatch_loss(_W, _S, threshold=0.0)[1],
    gives(lambda m: bool((m == 1).all())))  # fmt: skip
row("fixmatch_loss/threshold 1 keeps only certain rows",
    lambda: fastssl.fixmatch_loss(_W, _S, threshold=1.0)[1], gives(lambda m: bool((m == 0).all())))  # fmt: skip
for _tau in (0.0, -1.0, math.inf):
    row(f"fixmatch_loss/temperature {_tau}", lambda t=_tau: fastssl.fixmatch_loss(_W, _S, temperature=t),
        raises(ValueError, "temperature"))  # fmt: skip
    row(f"uda_loss/temperature {_tau}", lambda t=_tau: fastssl.uda_loss(_W, _S, temperature=t),
        raises(ValueError, "temperature"))  # fmt: skip
    row(f"FreeMatchLoss/temperature {_tau}", lambda t=_tau: fastssl.FreeMatchLoss(4, temperature=t),
        raises(ValueError, "temperature"))  # fmt: skip
row("fixmatch_loss/hard_label 1", lambda: fastssl.fixmatch_loss(_W, _S, hard_label=1), raises(TypeError, "hard_label"))
row(
    "fixmatch_loss/soft labels", lambda: fastssl.fixmatch_loss(_W, _S, hard_label=False, temperature=0.5), gives(finite)
)
row("tsa_threshold/unknown schedule", lambda: fastssl.tsa_threshold("cosine", 1, 10, 4), raises(ValueError, "schedule"))
row("tsa_threshold/step past the end", lambda: fastssl.tsa_threshold("linear", 11, 10, 4), raises(ValueError, "step"))
row("tsa_threshold/negative step", lambda: fastssl.tsa_threshold("linear", -1, 10, 4), raises(ValueError, "step"))
row("tsa_threshold/float step", lambda: fastssl.tsa_threshold("linear", 1.5, 10, 4), raises(TypeError, "step"))
row("tsa_threshold/total_steps 0", lambda: fastssl.tsa_threshold("linear", 0, 0, 4), raises(ValueError, "total_steps"))
row("tsa_threshold/num_classes 0", lambda: fastssl.tsa_threshold("log", 0, 10, 0), raises(ValueError, "num_classes"))
row("tsa_threshold/one class", lambda: fastssl.tsa_threshold("exp", 3, 10, 1), gives(lambda t: t == 1.0))
row(
    "tsa_threshold/start of linear is 1/K",
    lambda: fastssl.tsa_threshold("linear", 0, 10, 4),
    gives(lambda t: t == 0.25),
)

row("FlexMatchLoss/num_classes 0", lambda: fastssl.FlexMatchLoss(0, 6), raises(ValueError, "num_classes"))
row("FlexMatchLoss/num_unlabeled 0", lambda: fastssl.FlexMatchLoss(4, 0), raises(ValueError, "num_unlabeled"))
row("FlexMatchLoss/thresh_warmup 'no'", lambda: fastssl.FlexMatchLoss(4, 6, thresh_warmup="no"),
    raises(TypeError, "thresh_warmup"))  # fmt: skip
row("FlexMatchLoss/classes differ from num_classes", lambda: fastssl.FlexMatchLoss(5, 6)(_W, _S, _IDX),
    raises(ValueError, "num_classes"))  # fmt: skip
row(
    "FlexMatchLoss/float indices",
    lambda: fastssl.FlexMatchLoss(4, 6)(_W, _S, _IDX.float()),
    raises(TypeError, "indices"),
)
row("FlexMatchLoss/indices of the wrong length", lambda: fastssl.FlexMatchLoss(4, 6)(_W, _S, _IDX[:3]),
    raises(ValueError, "indices"))  # fmt: skip
row("FlexMatchLoss/index past num_unlabeled", lambda: fastssl.FlexMatchLoss(4, 5)(_W, _S, _IDX),
    raises(ValueError, "indices"))  # fmt: skip
row(
    "FlexMatchLoss/negative index", lambda: fastssl.FlexMatchLoss(4, 6)(_W, _S, _IDX - 1), raises(ValueError, "indices")
)
row("FlexMatchLoss/state in state_dict", lambda: sorted(fastssl.FlexMatchLoss(4, 6).state_dict()),
    gives(lambda k: k == ["classwise_acc", "selected_label"]))  # fmt: skip


def _poisoned(module, *extra):
    """The loss of a finite batch after a batch with a NaN row went into the module's state."""
    module(_with(_W, (0, 0), math.nan), _S, *extra)
    return module(_W, _S, *extra)


for _ema in (1.0, -0.1, math.nan):
    row(f"FreeMatchLoss/ema {_ema}", lambda e=_ema: fastssl.FreeMatchLoss(4, ema=e), raises(ValueError, "ema"))
    row(f"SoftMatchLoss/ema {_ema}", lambda e=_ema: fastssl.SoftMatchLoss(4, ema=e), raises(ValueError, "ema"))
row("FreeMatchLoss/classes differ from num_classes", lambda: fastssl.FreeMatchLoss(3)(_W, _S),
    raises(ValueError, "num_classes"))  # fmt: skip
row("FreeMatchLoss/a NaN in the state stays visible", lambda: _poisoned(fastssl.FreeMatchLoss(4)), gives(nonfinite))
row("FreeMatchLoss/ema 0 (no memory)", lambda: fastssl.FreeMatchLoss(4, ema=0.0)(_W, _S), gives(finite))

_P = torch.full((4,), 0.25)
_fair = fastssl.freematch_fairness_loss
_ONES = torch.ones(6)
row(
    "freematch_fairness_loss/mask of the wrong length", lambda: _fair(_ONES[:3], _S, _P, _P), raises(ValueError, "mask")
)
row("freematch_fairness_loss/p_model too short", lambda: _fair(_ONES, _S, _P[:3], _P), raises(ValueError, "p_model"))
row(
    "freematch_fairness_loss/label_hist a list",
    lambda: _fair(_ONES, _S, _P, [0.25] * 4),
    raises(ValueError, "label_hist"),
)
row("freematch_fairness_loss/1-D logits", lambda: _fair(_ONES, _S[0], _P, _P), raises(ValueError, "logits_strong"))
row("freematch_fairness_loss/empty mask gives 0", lambda: _fair(0 * _ONES, _S, _P, _P), gives(close_to(0.0)))
row("freematch_fairness_loss/NaN in a masked row", lambda: _fair(_ONES, _with(_S, (1, 1), math.nan), _P, _P),
    gives(nonfinite))  # fmt: skip
row("freematch_fairness_loss/NaN mask entry", lambda: _fair(_with(0 * _ONES, 2, math.nan), _S, _P, _P), gives(finite))
row("freematch_fairness_loss/a class never predicted",
    lambda: _fair(_ONES, _S, _P, torch.tensor([0.5, 0.5, 0.0, 0.0])), gives(finite))  # fmt: skip

row("SoftMatchLoss/n_sigma 0", lambda: fastssl.SoftMatchLoss(4, n_sigma=0), raises(ValueError, "n_sigma"))
row("SoftMatchLoss/dist_align None", lambda: fastssl.SoftMatchLoss(4, dist_align=None), raises(TypeError, "dist_align"))
row("SoftMatchLoss/one row (no variance)", lambda: fastssl.SoftMatchLoss(4)(_W[:1], _S[:1]),
    raises(ValueError, "at least 2 rows"))  # fmt: skip
row("SoftMatchLoss/a NaN in the state stays visible", lambda: _poisoned(fastssl.SoftMatchLoss(4)), gives(nonfinite))
row("SoftMatchLoss/identical rows, ema 0 (variance 0)",
    lambda: fastssl.SoftMatchLoss(4, ema=0.0)(_W[:1].repeat(3, 1), _S[:3]), gives(finite))  # fmt: skip
row("SoftMatchLoss/weights in (0, 1]", lambda: fastssl.SoftMatchLoss(4)(_W, _S)[1],
    gives(lambda w: bool(((w > 0) & (w <= 1)).all())))  # fmt: skip


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
