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
(``test_every_public_name_has_rows``). Each domain keeps its rows in its own section below; the
rows' lambdas read module-level names when they run, so a section's names carry its own prefix
(``_LW`` for the semi-supervised logits, ``_DS`` for DINO's student rows, ...), never a name another
section uses.
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
import torch.nn.functional as F

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


def _rows(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


_A, _B, _NEG = _rows(6, 5, seed=1), _rows(6, 5, seed=2), _rows(4, 5, seed=3)
_ROW_SCALES = torch.tensor([1e20, 1e-20, 1e30, 1e-30, 1.0, 7.0])[:, None]


def _contrastive_rows(name, fn, first, second):
    """The rows shared by nt_xent and info_nce: fn(x, y, **options) with arguments named first, second."""
    ref = lambda **kw: lambda: fn(_A, _B, **kw)
    row(f"{name}/1-D {first}", lambda: fn(_A[0], _B), raises(ValueError, first))
    row(f"{name}/3-D {second}", lambda: fn(_A, _B[None]), raises(ValueError, second))
    row(f"{name}/empty batch", lambda: fn(_A[:0], _B[:0]), raises(ValueError, first))
    row(f"{name}/no features", lambda: fn(_A[:, :0], _B[:, :0]), raises(ValueError, first))
    row(f"{name}/rows differ", lambda: fn(_A, _B[:5]), raises(ValueError, second))
    row(f"{name}/features differ", lambda: fn(_A, _B[:, :4]), raises(ValueError, second))
    row(f"{name}/dtypes differ", lambda: fn(_A, _B.double()), raises(TypeError, second))
    row(f"{name}/devices differ", lambda: fn(_A, _B.to("meta")), raises(ValueError, second))
    row(f"{name}/not a tensor", lambda: fn(_A.tolist(), _B), raises(TypeError, first))
    for dtype in (torch.int64, torch.bool, torch.complex64):
        row(f"{name}/{dtype} {first}", lambda dtype=dtype: fn(_A.to(dtype), _B.to(dtype)), raises(TypeError, first))
    for dtype, rtol in ((torch.float16, 2e-2), (torch.bfloat16, 5e-2), (torch.float64, 1e-5)):
        row(f"{name}/{dtype}", lambda dtype=dtype: fn(_A.to(dtype), _B.to(dtype)), gives(close_to(ref(), rtol=rtol)))
    row(
        f"{name}/non-contiguous",
        lambda: fn(_rows(6, 10)[:, ::2], _B),
        gives(close_to(lambda: fn(_rows(6, 10)[:, ::2].contiguous(), _B))),
    )
    row(f"{name}/transposed", lambda: fn(_A.T.contiguous().T, _B), gives(close_to(ref())))
    row(f"{name}/expanded", lambda: fn(_A[:1].expand(6, 5), _B), gives(close_to(lambda: fn(_A[:1].repeat(6, 1), _B))))
    row(f"{name}/one row", lambda: fn(_A[:1], _B[:1]), gives(finite))
    row(f"{name}/NaN", lambda: fn(_A.index_fill(1, torch.tensor([2]), float("nan")), _B), gives(nonfinite))
    row(f"{name}/inf", lambda: fn(_A, _B.index_fill(0, torch.tensor([3]), float("inf"))), gives(nonfinite))
    for scale in (1e20, 1e-20, 1e30, 1e-30):
        row(
            f"{name}/rows times {scale:g}",
            lambda scale=scale: fn(_A * scale, _B * scale),
            gives(close_to(ref(), rtol=1e-5)),
        )
    row(
        f"{name}/rows of norm 1e±20 and 1e±30",
        lambda: fn(_A * _ROW_SCALES, _B * _ROW_SCALES.flip(0)),
        gives(close_to(ref(), rtol=1e-5)),
    )
    row(f"{name}/a zero row", lambda: fn(_A.index_fill(0, torch.tensor([1]), 0.0), _B), gives(finite))
    row(f"{name}/all zero", lambda: fn(torch.zeros(6, 5), torch.zeros(6, 5)), gives(finite))
    for tau in (0.0, -0.5, float("nan"), float("inf"), float("-inf")):
        row(f"{name}/temperature={tau}", lambda tau=tau: fn(_A, _B, temperature=tau), raises(ValueError, "temperature"))
    row(f"{name}/temperature=1e-30", lambda: fn(_A, _B, temperature=1e-30), gives(finite))
    row(f"{name}/temperature=1e30", lambda: fn(_A, _B, temperature=1e30), gives(finite))
    row(f"{name}/temperature='0.5'", lambda: fn(_A, _B, temperature="0.5"), raises(TypeError, "temperature"))
    row(f"{name}/temperature=True", lambda: fn(_A, _B, temperature=True), raises(TypeError, "temperature"))
    row(
        f"{name}/temperature tensor",
        lambda: fn(_A, _B, temperature=torch.tensor(0.3)),
        gives(close_to(ref(temperature=0.3))),
    )
    row(
        f"{name}/temperature tensor with grad",
        lambda: fn(_A, _B, temperature=torch.tensor([0.3], requires_grad=True)),
        gives(close_to(ref(temperature=0.3))),
    )
    row(
        f"{name}/temperature fp64 tensor",
        lambda: fn(_A, _B, temperature=torch.tensor(0.3, dtype=torch.float64)),
        gives(close_to(ref(temperature=0.3))),
    )
    for bad, exc in (
        (torch.tensor([0.3, 0.3]), ValueError),
        (torch.tensor(1), TypeError),
        (torch.tensor(0.0), ValueError),
        (torch.tensor(-0.3, requires_grad=True), ValueError),
        (torch.tensor(float("nan")), ValueError),
        (torch.tensor(float("inf")), ValueError),
        (torch.ones(0), ValueError),
    ):
        row(
            f"{name}/temperature tensor {bad.tolist()} {bad.dtype}",
            lambda bad=bad: fn(_A, _B, temperature=bad),
            raises(exc, "temperature"),
        )
    row(f"{name}/reduction='avg'", lambda: fn(_A, _B, reduction="avg"), raises(ValueError, "reduction"))
    row(f"{name}/reduction='none'", lambda: fn(_A, _B, reduction="none"), gives(lambda r: r.dim() == 1 and finite(r)))
    row(f"{name}/impl='fast'", lambda: fn(_A, _B, impl="fast"), raises(ValueError, "impl"))
    row(f"{name}/impl='cuda' on CPU tensors", lambda: fn(_A, _B, impl="cuda"), raises(ValueError, "cuda"))
    row(
        f"{name}/gather without a process group",
        lambda: fn(_A, _B, gather=True),
        raises((RuntimeError, ValueError), "gather|process group|distributed"),
    )


_contrastive_rows("nt_xent", fastssl.nt_xent, "z1", "z2")
_contrastive_rows("info_nce", lambda q, k, **kw: fastssl.info_nce(q, k, **kw), "query", "key")
_Y = torch.tensor([0, 1, 0, 2, 1, 2])
row("nt_xent/labels", lambda: fastssl.nt_xent(_A, _B, labels=_Y), gives(finite))
row("nt_xent/labels without z2", lambda: fastssl.nt_xent(_A, labels=_Y), gives(finite))
row("nt_xent/no z2 and no labels", lambda: fastssl.nt_xent(_A), raises(ValueError, "labels"))
row("nt_xent/labels float", lambda: fastssl.nt_xent(_A, _B, labels=_Y.float()), raises(TypeError, "labels"))
row("nt_xent/labels bool", lambda: fastssl.nt_xent(_A, _B, labels=_Y > 0), raises(TypeError, "labels"))
row("nt_xent/labels of the wrong length", lambda: fastssl.nt_xent(_A, _B, labels=_Y[:5]), raises(ValueError, "labels"))
row("nt_xent/labels 2-D", lambda: fastssl.nt_xent(_A, _B, labels=_Y[None]), raises(ValueError, "labels"))
row("nt_xent/labels a list", lambda: fastssl.nt_xent(_A, _B, labels=_Y.tolist()), raises(TypeError, "labels"))
row(
    "nt_xent/labels on another device",
    lambda: fastssl.nt_xent(_A, _B, labels=_Y.to("meta")),
    raises(ValueError, "labels"),
)
row("nt_xent/no row has a positive", lambda: fastssl.nt_xent(_A, labels=torch.arange(6)), raises(ValueError, "labels"))
row(
    "nt_xent/huge labels",
    lambda: fastssl.nt_xent(_A, labels=_Y * 2**62),
    gives(close_to(lambda: fastssl.nt_xent(_A, labels=_Y))),
)
row("nt_xent/one row, labels", lambda: fastssl.nt_xent(_A[:1], labels=torch.tensor([0])), raises(ValueError, "labels"))
row(
    "nt_xent/one row each view is a positive pair",
    lambda: fastssl.nt_xent(_A[:1], _B[:1]),
    gives(close_to(0.0, atol=1e-6)),
)
row(
    "NTXentLoss/equals nt_xent",
    lambda: fastssl.NTXentLoss(temperature=0.2)(_A, _B),
    gives(close_to(lambda: fastssl.nt_xent(_A, _B, temperature=0.2))),
)
row(
    "NTXentLoss/labels",
    lambda: fastssl.NTXentLoss()(_A, labels=_Y),
    gives(close_to(lambda: fastssl.nt_xent(_A, labels=_Y))),
)
row("NTXentLoss/temperature=0", lambda: fastssl.NTXentLoss(temperature=0.0)(_A, _B), raises(ValueError, "temperature"))
row("NTXentLoss/reduction='avg'", lambda: fastssl.NTXentLoss(reduction="avg")(_A, _B), raises(ValueError, "reduction"))
row("NTXentLoss/1-D z1", lambda: fastssl.NTXentLoss()(_A[0], _B), raises(ValueError, "z1"))
row("info_nce/one row: the positive alone", lambda: fastssl.info_nce(_A[:1], _B[:1]), gives(close_to(0.0, atol=1e-6)))
row("info_nce/negatives", lambda: fastssl.info_nce(_A, _B, negatives=_NEG, symmetric=True), gives(finite))
row("info_nce/negatives 1-D", lambda: fastssl.info_nce(_A, _B, negatives=_NEG[0]), raises(ValueError, "negatives"))
row(
    "info_nce/negatives of other D",
    lambda: fastssl.info_nce(_A, _B, negatives=_NEG[:, :4]),
    raises(ValueError, "negatives"),
)
row(
    "info_nce/negatives fp64", lambda: fastssl.info_nce(_A, _B, negatives=_NEG.double()), raises(TypeError, "negatives")
)
row("info_nce/negatives empty", lambda: fastssl.info_nce(_A, _B, negatives=_NEG[:0]), raises(ValueError, "negatives"))
row("info_nce/negatives NaN", lambda: fastssl.info_nce(_A, _B, negatives=_NEG * float("nan")), gives(nonfinite))
row(
    "info_nce/negatives of norm 1e±30",
    lambda: fastssl.info_nce(_A, _B, negatives=_NEG * _ROW_SCALES[:4]),
    gives(close_to(lambda: fastssl.info_nce(_A, _B, negatives=_NEG), rtol=1e-5)),
)
row("info_nce/symmetric=1", lambda: fastssl.info_nce(_A, _B, symmetric=1), raises(TypeError, "symmetric"))
row(
    "InfoNCELoss/equals info_nce",
    lambda: fastssl.InfoNCELoss(temperature=0.2, symmetric=True)(_A, _B),
    gives(close_to(lambda: fastssl.info_nce(_A, _B, temperature=0.2, symmetric=True))),
)
row(
    "InfoNCELoss/learnable temperature",
    lambda: fastssl.InfoNCELoss(temperature=0.2, learnable_temperature=True)(_A, _B),
    gives(close_to(lambda: fastssl.info_nce(_A, _B, temperature=0.2), rtol=1e-5)),
)
for _tau in (0.0, -1.0, float("nan"), float("inf")):
    row(
        f"InfoNCELoss/temperature={_tau}",
        lambda tau=_tau: fastssl.InfoNCELoss(temperature=tau),
        raises(ValueError, "temperature"),
    )
row("InfoNCELoss/negatives", lambda: fastssl.InfoNCELoss()(_A, _B, _NEG), gives(finite))
row("InfoNCELoss/1-D query", lambda: fastssl.InfoNCELoss()(_A[0], _B), raises(ValueError, "query"))


# ---------------------------------------------------------------------------------------------
# mixing: mochi_logits, mochi_loss, MemoryQueue

_QUEUE = _rows(10, 5, seed=4) * torch.rand(10, 1, generator=torch.Generator().manual_seed(5))
_MIX = dict(n_hard=4, n_mix=3, n_mix_query=2)
_QUEUE_SCALES = torch.tensor([1e20, 1e-20, 1e30, 1e-30, 1.0, 2.0, 1e25, 1e-25, 3.0, 1e-10])[:, None]


def _seeded(fn, q=_A, k=_B, queue=_QUEUE, **kw):
    """fn(q, k, queue) with a fixed generator (the C++ hard-set selection's order, which the draws
    index, is the same for the same scores, so the same seed gives the same negatives)."""
    options = dict(_MIX, generator=torch.Generator().manual_seed(0))
    options.update(kw)
    return fn(q, k, queue, **options)


def _filled_queue(n=10):
    queue = fastssl.MemoryQueue(16, 5)
    queue.enqueue(_QUEUE[:n])
    return queue


for _name, _fn in (("mochi_logits", fastssl.mochi_logits), ("mochi_loss", fastssl.mochi_loss)):
    _ref = lambda fn=_fn, **kw: lambda: _seeded(fn, **kw)
    row(f"{_name}/1-D q", lambda fn=_fn: _seeded(fn, q=_A[0]), raises(ValueError, "q"))
    row(f"{_name}/3-D k", lambda fn=_fn: _seeded(fn, k=_B[None]), raises(ValueError, "k"))
    row(f"{_name}/1-D queue", lambda fn=_fn: _seeded(fn, queue=_QUEUE[0]), raises(ValueError, "queue"))
    row(f"{_name}/empty batch", lambda fn=_fn: _seeded(fn, q=_A[:0], k=_B[:0]), raises(ValueError, "q"))
    row(f"{_name}/empty queue", lambda fn=_fn: _seeded(fn, queue=_QUEUE[:0]), raises(ValueError, "queue"))
    row(
        f"{_name}/empty MemoryQueue",
        lambda fn=_fn: _seeded(fn, queue=fastssl.MemoryQueue(8, 5)),
        raises(ValueError, "queue"),
    )
    row(f"{_name}/MemoryQueue", lambda fn=_fn: _seeded(fn, queue=_filled_queue()), gives(close_to(_ref())))
    row(f"{_name}/queue a list", lambda fn=_fn: _seeded(fn, queue=_QUEUE.tolist()), raises(TypeError, "queue"))
    row(f"{_name}/one row", lambda fn=_fn: _seeded(fn, q=_A[:1], k=_B[:1]), gives(finite))
    row(f"{_name}/one queue row, no pair mixes", lambda fn=_fn: _seeded(fn, queue=_QUEUE[:1], n_mix=0), gives(finite))
    row(f"{_name}/k rows differ", lambda fn=_fn: _seeded(fn, k=_B[:5]), raises(ValueError, "k"))
    row(f"{_name}/queue features differ", lambda fn=_fn: _seeded(fn, queue=_QUEUE[:, :4]), raises(ValueError, "queue"))
    row(f"{_name}/dtypes differ", lambda fn=_fn: _seeded(fn, queue=_QUEUE.double()), raises(TypeError, "queue"))
    row(f"{_name}/devices differ", lambda fn=_fn: _seeded(fn, k=_B.to("meta")), raises(ValueError, "k"))
    for dtype in (torch.int64, torch.bool, torch.complex64):
        row(
            f"{_name}/{dtype} q",
            lambda fn=_fn, dt=dtype: _seeded(fn, q=_A.to(dt), k=_B.to(dt), queue=_QUEUE.to(dt)),
            raises(TypeError, "q"),
        )
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        row(
            f"{_name}/{dtype}",
            lambda fn=_fn, dt=dtype: _seeded(fn, q=_A.to(dt), k=_B.to(dt), queue=_QUEUE.to(dt)),
            gives(finite),
        )
    row(
        f"{_name}/non-contiguous queue",
        lambda fn=_fn: _seeded(fn, queue=_QUEUE.repeat_interleave(2, dim=1)[:, ::2]),
        gives(close_to(_ref())),
    )
    row(f"{_name}/NaN q", lambda fn=_fn: _seeded(fn, q=_A * float("nan")), gives(nonfinite))
    row(
        f"{_name}/inf in queue",
        lambda fn=_fn: _seeded(fn, queue=_QUEUE.index_fill(0, torch.tensor([0]), float("inf"))),
        gives(nonfinite),
    )
    for scale in (1e20, 1e-20, 1e30, 1e-30):
        row(
            f"{_name}/q times {scale:g}",
            lambda fn=_fn, sc=scale: _seeded(fn, q=_A * sc, k=_B * sc),
            gives(close_to(_ref(), rtol=1e-5, atol=1e-5)),
        )
    row(
        f"{_name}/queue rows of norm 1e±20 to 1e±30",
        lambda fn=_fn: _seeded(fn, queue=_QUEUE * _QUEUE_SCALES),
        gives(close_to(_ref(), rtol=1e-5, atol=1e-5)),
    )
    row(
        f"{_name}/zero queue rows",
        lambda fn=_fn: _seeded(fn, queue=_QUEUE.index_fill(0, torch.tensor([2, 5]), 0.0)),
        gives(finite),
    )
    row(
        f"{_name}/all zero",
        lambda fn=_fn: _seeded(fn, q=torch.zeros(6, 5), k=torch.zeros(6, 5), queue=torch.zeros(10, 5)),
        gives(finite),
    )
    for tau in (0.0, -0.2, float("nan"), float("inf")):
        row(
            f"{_name}/temperature={tau}",
            lambda fn=_fn, t=tau: _seeded(fn, temperature=t),
            raises(ValueError, "temperature"),
        )
    row(f"{_name}/temperature=1e-30", lambda fn=_fn: _seeded(fn, temperature=1e-30), gives(lambda r: True))
    row(f"{_name}/temperature=1e30", lambda fn=_fn: _seeded(fn, temperature=1e30), gives(finite))
    row(
        f"{_name}/temperature tensor",
        lambda fn=_fn: _seeded(fn, temperature=torch.tensor(0.3)),
        gives(close_to(_ref(temperature=0.3))),
    )
    row(
        f"{_name}/temperature tensor with grad",
        lambda fn=_fn: _seeded(fn, temperature=torch.tensor(0.3, requires_grad=True)),
        gives(close_to(_ref(temperature=0.3))),
    )
    for bad, exc in (
        (torch.tensor([0.3, 0.3]), ValueError),
        (torch.tensor(1), TypeError),
        (torch.tensor(0.0), ValueError),
        (torch.tensor(float("nan")), ValueError),
    ):
        row(
            f"{_name}/temperature tensor {bad.tolist()} {bad.dtype}",
            lambda fn=_fn, b=bad: _seeded(fn, temperature=b),
            raises(exc, "temperature"),
        )
    row(f"{_name}/temperature='0.2'", lambda fn=_fn: _seeded(fn, temperature="0.2"), raises(TypeError, "temperature"))
    for key, bad, exc in (
        ("n_hard", 0, ValueError),
        ("n_hard", -3, ValueError),
        ("n_hard", 2.5, TypeError),
        ("n_hard", True, TypeError),
        ("n_mix", -1, ValueError),
        ("n_mix", float("nan"), TypeError),
        ("n_mix_query", -1, ValueError),
        ("n_mix_query", 1.0, TypeError),
        ("n_hard", 1, ValueError),
    ):
        row(f"{_name}/{key}={bad}", lambda fn=_fn, kw={key: bad}: _seeded(fn, **kw), raises(exc, key))
    row(f"{_name}/n_hard huge", lambda fn=_fn: _seeded(fn, n_hard=2**62), gives(close_to(_ref(n_hard=10))))
    row(f"{_name}/n_mix=0 and n_mix_query=0: MoCo", lambda fn=_fn: _seeded(fn, n_mix=0, n_mix_query=0), gives(finite))
    row(f"{_name}/generator=3", lambda fn=_fn: _seeded(fn, generator=3), raises(TypeError, "generator"))
    row(
        f"{_name}/generator a seed",
        lambda fn=_fn: _seeded(fn, generator=torch.manual_seed),
        raises(TypeError, "generator"),
    )
    row(f"{_name}/impl='fast'", lambda fn=_fn: _seeded(fn, impl="fast"), raises(ValueError, "impl"))
row("mochi_loss/reduction='avg'", lambda: _seeded(fastssl.mochi_loss, reduction="avg"), raises(ValueError, "reduction"))
row(
    "mochi_loss/equals the cross-entropy of mochi_logits",
    lambda: _seeded(fastssl.mochi_loss),
    gives(close_to(lambda: F.cross_entropy(_seeded(fastssl.mochi_logits), torch.zeros(6, dtype=torch.long)))),
)

row("MemoryQueue/size=0", lambda: fastssl.MemoryQueue(0, 5), raises(ValueError, "size"))
row("MemoryQueue/size=2.0", lambda: fastssl.MemoryQueue(2.0, 5), raises(TypeError, "size"))
row("MemoryQueue/dim=-1", lambda: fastssl.MemoryQueue(4, -1), raises(ValueError, "dim"))
row("MemoryQueue/dim=True", lambda: fastssl.MemoryQueue(4, True), raises(TypeError, "dim"))
row("MemoryQueue/dtype int", lambda: fastssl.MemoryQueue(4, 5, dtype=torch.int64), raises(TypeError, "dtype"))
row("MemoryQueue/enqueue 1-D", lambda: fastssl.MemoryQueue(4, 5).enqueue(_A[0]), raises(ValueError, "x"))
row("MemoryQueue/enqueue empty", lambda: fastssl.MemoryQueue(4, 5).enqueue(_A[:0]), raises(ValueError, "x"))
row("MemoryQueue/enqueue other dim", lambda: fastssl.MemoryQueue(4, 4).enqueue(_A), raises(ValueError, "x"))
row("MemoryQueue/enqueue fp64", lambda: fastssl.MemoryQueue(8, 5).enqueue(_A.double()), raises(TypeError, "x"))
row("MemoryQueue/enqueue int", lambda: fastssl.MemoryQueue(8, 5).enqueue(_A.long()), raises(TypeError, "x"))
row(
    "MemoryQueue/enqueue another device",
    lambda: fastssl.MemoryQueue(8, 5).enqueue(_A.to("meta")),
    raises(ValueError, "x"),
)
row(
    "MemoryQueue/enqueue more rows than size", lambda: fastssl.MemoryQueue(4, 5).enqueue(_A), raises(ValueError, "size")
)
row(
    "MemoryQueue/labels to a queue without",
    lambda: fastssl.MemoryQueue(8, 5).enqueue(_A, _Y),
    raises(ValueError, "labels"),
)
row(
    "MemoryQueue/no labels to a labelled queue",
    lambda: fastssl.MemoryQueue(8, 5, store_labels=True).enqueue(_A),
    raises(ValueError, "labels"),
)
row(
    "MemoryQueue/float labels",
    lambda: fastssl.MemoryQueue(8, 5, store_labels=True).enqueue(_A, _Y.float()),
    raises(TypeError, "labels"),
)
row(
    "MemoryQueue/gather without a process group",
    lambda: fastssl.MemoryQueue(8, 5).enqueue(_A, gather=True),
    raises((RuntimeError, ValueError), "process group|distributed|init"),
)


def _enqueued(queue, *batches):
    for x in batches:
        queue.enqueue(x)
    return queue


row(
    "MemoryQueue/wraps around",
    lambda: _enqueued(fastssl.MemoryQueue(8, 5), _A, _B).get(),
    gives(close_to(torch.cat([_A[4:], _B]))),
)
row(
    "MemoryQueue/NaN rows are kept (the loss then is NaN)",
    lambda: _seeded(fastssl.mochi_loss, queue=_enqueued(_filled_queue(), _A * float("nan"))),
    gives(nonfinite),
)
row(
    "MemoryQueue/bad state",
    lambda: fastssl.MemoryQueue(4, 5).set_extra_state({"next": 9, "filled": 2}),
    raises(ValueError, "state"),
)


# ---------------------------------------------------------------------------------------------
# masking: random_masking, block_masking, noise_masking, unshuffle, masked_mse_loss, patchify, unpatchify

_MX = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
_MIDS = torch.arange(5).expand(2, 5)
_MTOKEN = torch.zeros(3)
_MONES = torch.ones(2, 5)
_META = torch.device("meta")


def _mgen():
    return torch.Generator().manual_seed(0)


def _mask_rm(x, ratio=0.5, **kw):
    """random_masking with a fixed seed."""
    return lambda: fastssl.random_masking(x, ratio, generator=_mgen(), **kw)


def _same_as_reference_rm(x, ratio=0.5, p=0):
    """random_masking equals the reference on the same input, output by output (pure data movement)."""

    def check(result) -> bool:
        ref = fastssl.random_masking(x.contiguous(), ratio, generator=_mgen(), num_prefix_tokens=p, impl="reference")
        return all(torch.equal(a, r) for a, r in zip(result, ref, strict=True))

    check.__name__ = "same_as_reference"
    return check


def _ones_mask(pred):
    return torch.ones(pred.shape[:2], dtype=pred.dtype if pred.is_floating_point() else torch.float32)


def _mse(pred, target=None, mask=None, **kw):
    target = pred + 1 if target is None else target
    mask = _ones_mask(pred) if mask is None else mask
    return lambda: fastssl.masked_mse_loss(pred, target, mask, **kw)


def _mse_ref(pred, target=None, mask=None, **kw):
    """The reference loss in fp64 (a function of no arguments, for close_to)."""
    target = pred + 1 if target is None else target
    mask = _ones_mask(pred) if mask is None else mask
    return lambda: fastssl.masked_mse_loss(pred.double(), target.double(), mask.double(), impl="reference", **kw)


def _counts(n):
    """Every mask of the batch has exactly n patches."""

    def check(mask) -> bool:
        return mask.dtype == torch.bool and bool((mask.sum((1, 2)) == n).all())

    check.__name__ = f"counts_{n}"
    return check


def _shape(*shape):
    def check(result) -> bool:
        return tuple(_tensors(result)[0].shape) == shape

    check.__name__ = f"shape_{shape}"
    return check


_NAN, _INF = float("nan"), float("inf")

# random_masking
row("random_masking/2-d x", _mask_rm(_MX[0]), raises(ValueError, "x"))
row("random_masking/4-d x", _mask_rm(_MX[None]), raises(ValueError, "x"))
row("random_masking/empty batch", _mask_rm(_MX[:0]), raises(ValueError, "x.*empty"))
row("random_masking/no tokens", _mask_rm(_MX[:, :0]), raises(ValueError, "num_prefix_tokens"))
row("random_masking/no features", _mask_rm(_MX[..., :0]), raises(ValueError, "x.*features"))
row("random_masking/one sample", _mask_rm(_MX[:1]), gives(_same_as_reference_rm(_MX[:1])))
row("random_masking/one token", _mask_rm(_MX[:, :1]), gives(_same_as_reference_rm(_MX[:, :1])))
for _dt in (torch.int64, torch.bool, torch.complex64):
    row(f"random_masking/{_dt} x", _mask_rm(_MX.to(_dt)), raises(TypeError, "x"))
for _dt in (torch.float16, torch.bfloat16, torch.float64):
    row(f"random_masking/{_dt} x", _mask_rm(_MX.to(_dt)), gives(_same_as_reference_rm(_MX.to(_dt))))
_xt = torch.randn(3, 5, 2).transpose(0, 1)  # [5, 3, 2], strided in every dim
row("random_masking/transposed x", _mask_rm(_xt), gives(_same_as_reference_rm(_xt)))
row("random_masking/strided x", _mask_rm(_MX[:, :, ::2]), gives(_same_as_reference_rm(_MX[:, :, ::2])))
_xe = torch.randn(2, 5, 1).expand(2, 5, 3)
row("random_masking/expanded x", _mask_rm(_xe), gives(_same_as_reference_rm(_xe)))
row("random_masking/NaN and inf in x", _mask_rm(torch.full((2, 5, 3), _NAN)), gives(nonfinite))
row("random_masking/1e30 x", _mask_rm(_MX * 1e30), gives(_same_as_reference_rm(_MX * 1e30)))
row("random_masking/1e-30 x", _mask_rm(_MX * 1e-30), gives(_same_as_reference_rm(_MX * 1e-30)))
row("random_masking/mask_ratio 0", _mask_rm(_MX, 0.0), gives(_shape(2, 5, 3)))
row("random_masking/mask_ratio tiny", _mask_rm(_MX, 1e-30), gives(_shape(2, 5, 3)))
row("random_masking/mask_ratio near 1", _mask_rm(_MX, 0.99), gives(_shape(2, 0, 3)))
for _v in (1.0, -0.1, _NAN, _INF, -_INF, 1e30):
    row(f"random_masking/mask_ratio {_v}", _mask_rm(_MX, _v), raises(ValueError, "mask_ratio"))
row("random_masking/mask_ratio tensor", _mask_rm(_MX, torch.tensor(0.5)), gives(_same_as_reference_rm(_MX)))
row("random_masking/mask_ratio tensor with grad", _mask_rm(_MX, torch.tensor(0.5, requires_grad=True)),
    gives(_same_as_reference_rm(_MX)))  # fmt: skip
row("random_masking/mask_ratio tensor NaN", _mask_rm(_MX, torch.tensor(_NAN)), raises(ValueError, "mask_ratio"))
row("random_masking/mask_ratio [2] tensor", _mask_rm(_MX, torch.tensor([0.5, 0.5])), raises(TypeError, "mask_ratio"))
row("random_masking/mask_ratio string", _mask_rm(_MX, "0.5"), raises(TypeError, "mask_ratio"))
row("random_masking/mask_ratio None", _mask_rm(_MX, None), raises(TypeError, "mask_ratio"))
row("random_masking/num_prefix_tokens 1", _mask_rm(_MX, num_prefix_tokens=1), gives(_same_as_reference_rm(_MX, p=1)))
row("random_masking/num_prefix_tokens all", _mask_rm(_MX, num_prefix_tokens=5), raises(ValueError, "num_prefix_tokens"))
row("random_masking/num_prefix_tokens -1", _mask_rm(_MX, num_prefix_tokens=-1), raises(ValueError, "num_prefix_tokens"))
row("random_masking/num_prefix_tokens huge", _mask_rm(_MX, num_prefix_tokens=2**63),
    raises(ValueError, "num_prefix_tokens"))  # fmt: skip
row("random_masking/num_prefix_tokens 1.0", _mask_rm(_MX, num_prefix_tokens=1.0),
    raises(TypeError, "num_prefix_tokens"))  # fmt: skip
row("random_masking/num_prefix_tokens tensor", _mask_rm(_MX, num_prefix_tokens=torch.tensor(1)),
    raises(TypeError, "num_prefix_tokens"))  # fmt: skip
row("random_masking/generator int", lambda: fastssl.random_masking(_MX, generator=0), raises(TypeError, "generator"))
row("random_masking/generator string", lambda: fastssl.random_masking(_MX, generator="cpu"),
    raises(TypeError, "generator"))  # fmt: skip
row("random_masking/cpu generator, meta x", lambda: fastssl.random_masking(_MX.to(_META), generator=_mgen()),
    raises(ValueError, "generator"))  # fmt: skip
row("random_masking/impl", lambda: fastssl.random_masking(_MX, impl="fast"), raises(ValueError, "impl"))


# unshuffle
def _un(v=_MX, ids=_MIDS, token=_MTOKEN, **kw):
    return lambda: fastssl.unshuffle(v, ids, token, **kw)


def _same_as_reference_un(v=_MX, ids=_MIDS, token=_MTOKEN, p=0):
    def check(result) -> bool:
        return torch.equal(result, fastssl.unshuffle(v.contiguous(), ids, token, num_prefix_tokens=p, impl="reference"))

    check.__name__ = "same_as_reference"
    return check


_ids_keep3 = torch.tensor([[0, 3, 1, 4, 2], [4, 3, 2, 1, 0]])  # keep 3 of 5
row("unshuffle/2-d x_visible", _un(_MX[0]), raises(ValueError, "x_visible"))
row("unshuffle/empty batch", _un(_MX[:0], _MIDS[:0]), raises(ValueError, "x_visible.*empty"))
row("unshuffle/no features", _un(_MX[..., :0], token=_MTOKEN[:0]), raises(ValueError, "x_visible.*features"))
row("unshuffle/one sample", _un(_MX[:1], _MIDS[:1]), gives(_same_as_reference_un(_MX[:1], _MIDS[:1])))
row("unshuffle/nothing visible", _un(_MX[:, :0], _ids_keep3), gives(_same_as_reference_un(_MX[:, :0], _ids_keep3)))
row("unshuffle/3 of 5 visible", _un(_MX[:, :3], _ids_keep3), gives(_same_as_reference_un(_MX[:, :3], _ids_keep3)))
row("unshuffle/more visible than L", _un(_MX, _MIDS[:, :4]), raises(ValueError, "x_visible"))
row("unshuffle/ids_restore batch", _un(ids=_MIDS[:1]), raises(ValueError, "ids_restore"))
row("unshuffle/1-d ids_restore", _un(ids=_MIDS[0]), raises(ValueError, "ids_restore"))
row("unshuffle/ids_restore on meta", _un(ids=_MIDS.to(_META)), raises(ValueError, "ids_restore"))
row("unshuffle/ids_restore list", _un(ids=_MIDS.tolist()), raises(TypeError, "ids_restore"))
for _dt in (torch.float32, torch.bool, torch.complex64):
    row(f"unshuffle/{_dt} ids_restore", _un(ids=_MIDS.to(_dt)), raises(TypeError, "ids_restore"))
row("unshuffle/int32 ids_restore", _un(ids=_MIDS.int()), gives(_same_as_reference_un()))
row("unshuffle/transposed ids_restore", _un(ids=_MIDS.T.contiguous().T), gives(_same_as_reference_un()))
row("unshuffle/out-of-range ids_restore", _un(_MX[:, :3], torch.tensor([[0, -7, 10**12, 2, 1]] * 2)),
    gives(lambda out: torch.equal(out[:, 1], torch.zeros(2, 3)) and torch.equal(out[:, 0], _MX[:, 0])))  # fmt: skip
for _dt in (torch.int64, torch.bool, torch.complex64):
    row(f"unshuffle/{_dt} x_visible", _un(_MX.to(_dt)), raises(TypeError, "x_visible"))
for _dt in (torch.float16, torch.bfloat16, torch.float64):
    row(f"unshuffle/{_dt} x_visible", _un(_MX.to(_dt)), gives(_same_as_reference_un(_MX.to(_dt))))
row("unshuffle/transposed x_visible", _un(_xt, torch.arange(3).expand(5, 3), token=torch.zeros(2)),
    gives(_same_as_reference_un(_xt, torch.arange(3).expand(5, 3), torch.zeros(2))))  # fmt: skip
row("unshuffle/expanded x_visible", _un(_xe), gives(_same_as_reference_un(_xe)))
row("unshuffle/NaN x_visible", _un(torch.full((2, 5, 3), _NAN)), gives(nonfinite))
row("unshuffle/inf mask_token", _un(_MX[:, :3], _ids_keep3, torch.full((3,), _INF)), gives(nonfinite))
row("unshuffle/1e30 x_visible", _un(_MX * 1e30), gives(_same_as_reference_un(_MX * 1e30)))
row("unshuffle/mask_token [1, 1, D]", _un(token=_MTOKEN.view(1, 1, 3)), gives(_same_as_reference_un()))
row("unshuffle/mask_token expanded", _un(token=torch.zeros(1).expand(3)), gives(_same_as_reference_un()))
row("unshuffle/mask_token fp64", _un(_MX[:, :3], _ids_keep3, torch.ones(3, dtype=torch.float64)),
    gives(lambda out: out.dtype == torch.float32 and torch.equal(out[0, 1], torch.ones(3))))  # fmt: skip
row("unshuffle/mask_token wrong D", _un(token=torch.zeros(4)), raises(ValueError, "mask_token"))
row("unshuffle/mask_token [D, 1]", _un(token=torch.zeros(3, 1)), raises(ValueError, "mask_token"))
row("unshuffle/mask_token int", _un(token=torch.zeros(3, dtype=torch.long)), raises(TypeError, "mask_token"))
row("unshuffle/mask_token complex", _un(token=torch.zeros(3, dtype=torch.complex64)), raises(TypeError, "mask_token"))
row("unshuffle/mask_token list", _un(token=[0.0] * 3), raises(TypeError, "mask_token"))
row("unshuffle/mask_token on meta", _un(token=_MTOKEN.to(_META)), raises(ValueError, "mask_token"))
row("unshuffle/num_prefix_tokens -1", _un(num_prefix_tokens=-1), raises(ValueError, "num_prefix_tokens"))
row("unshuffle/num_prefix_tokens too many", _un(num_prefix_tokens=6), raises(ValueError, "x_visible"))
row("unshuffle/num_prefix_tokens 1.0", _un(num_prefix_tokens=1.0), raises(TypeError, "num_prefix_tokens"))
row("unshuffle/impl", _un(impl="fast"), raises(ValueError, "impl"))

# masked_mse_loss
row("masked_mse_loss/2-d pred", _mse(_MX[0], mask=torch.ones(5)), raises(ValueError, "pred"))
row("masked_mse_loss/empty batch", _mse(_MX[:0], mask=_MONES[:0]), raises(ValueError, "pred.*empty"))
row("masked_mse_loss/no values", _mse(_MX[..., :0]), raises(ValueError, "pred.*features"))
row("masked_mse_loss/one sample, one patch", _mse(_MX[:1, :1], mask=_MONES[:1, :1]),
    gives(close_to(_mse_ref(_MX[:1, :1], mask=_MONES[:1, :1]))))  # fmt: skip
row("masked_mse_loss/target shape", _mse(_MX, _MX[:, :4]), raises(ValueError, "target"))
row("masked_mse_loss/target on meta", _mse(_MX, _MX.to(_META)), raises(ValueError, "target"))
row("masked_mse_loss/target fp64", _mse(_MX, _MX.double() + 1), gives(close_to(_mse_ref(_MX))))
row("masked_mse_loss/target int", _mse(_MX, _MX.long()), raises(TypeError, "target"))
row("masked_mse_loss/mask shape", _mse(_MX, mask=torch.ones(2, 4)), raises(ValueError, "mask"))
row("masked_mse_loss/mask 1-d", _mse(_MX, mask=torch.ones(10)), raises(ValueError, "mask"))
row("masked_mse_loss/mask on meta", _mse(_MX, mask=_MONES.to(_META)), raises(ValueError, "mask"))
row("masked_mse_loss/mask list", _mse(_MX, mask=_MONES.tolist()), raises(TypeError, "mask"))
row("masked_mse_loss/mask complex", _mse(_MX, mask=_MONES.to(torch.complex64)), raises(TypeError, "mask"))
for _dt in (torch.bool, torch.int32, torch.float16, torch.float64):
    row(f"masked_mse_loss/{_dt} mask", _mse(_MX, mask=_MONES.to(_dt)), gives(close_to(_mse_ref(_MX))))
for _dt in (torch.int64, torch.bool, torch.complex64):
    row(f"masked_mse_loss/{_dt} pred", _mse(_MX.to(_dt), _MX), raises(TypeError, "pred"))
for _dt in (torch.float16, torch.bfloat16):
    row(f"masked_mse_loss/{_dt} pred", _mse(_MX.to(_dt)), gives(close_to(_mse_ref(_MX.to(_dt)), rtol=1e-2)))
row("masked_mse_loss/fp64 pred", _mse(_MX.double()),
    gives(lambda r: r.dtype == torch.float64 and close_to(_mse_ref(_MX), 1e-12)(r)))  # fmt: skip
row("masked_mse_loss/transposed pred", _mse(_xt), gives(close_to(_mse_ref(_xt))))
row("masked_mse_loss/strided pred", _mse(_MX[:, :, ::2]), gives(close_to(_mse_ref(_MX[:, :, ::2]))))
row("masked_mse_loss/expanded pred and target", _mse(_xe, _xe.transpose(0, 1).transpose(0, 1) * 2),
    gives(close_to(_mse_ref(_xe, _xe * 2))))  # fmt: skip
row("masked_mse_loss/expanded mask", _mse(_MX, mask=torch.ones(1, 5).expand(2, 5)), gives(close_to(_mse_ref(_MX))))
_mbad = _MX.clone()
_mbad[1, 2, 0] = _NAN
row("masked_mse_loss/NaN in a masked patch", _mse(_mbad), gives(nonfinite))
row("masked_mse_loss/inf target in a masked patch", _mse(_MX, _mbad.nan_to_num(_INF)), gives(nonfinite))
_mhalf = torch.tensor([[1.0, 1, 0, 0, 0], [0, 1, 0, 1, 1]])
row("masked_mse_loss/NaN in an unmasked patch is not read", _mse(_mbad, _MX, _mhalf),
    gives(close_to(_mse_ref(_MX, _MX, _mhalf))))  # fmt: skip
row("masked_mse_loss/NaN target with norm_pix", _mse(_MX, _mbad, norm_pix=True), gives(nonfinite))
row("masked_mse_loss/1e20 fp32 pred overflows as MAE's code", _mse(_MX * 1e20, _MX), gives(lambda r: bool(r.isinf())))
for _scale in (1e30, 1e-30):
    row(f"masked_mse_loss/{_scale:g} fp64", _mse(_MX.double() * _scale, _MX.double() * _scale * 2),
        gives(close_to(_mse_ref(_MX.double() * _scale, _MX.double() * _scale * 2), rtol=1e-10, atol=0)))  # fmt: skip
row("masked_mse_loss/1e-15 fp32", _mse(_MX * 1e-15, _MX * 2e-15),
    gives(close_to(_mse_ref(_MX * 1e-15, _MX * 2e-15), atol=0)))  # fmt: skip
row("masked_mse_loss/1e15 target with norm_pix", _mse(_MX, _MX * 1e15, norm_pix=True),
    gives(close_to(_mse_ref(_MX, _MX * 1e15, norm_pix=True), rtol=1e-4)))  # fmt: skip
row("masked_mse_loss/constant target with norm_pix", _mse(_MX, torch.ones(2, 5, 3), norm_pix=True),
    gives(close_to(_mse_ref(_MX, torch.ones(2, 5, 3), norm_pix=True))))  # fmt: skip
row("masked_mse_loss/all-zero mask", _mse(_MX, mask=torch.zeros(2, 5)), raises(ValueError, "mask"))
row("masked_mse_loss/all-False mask", _mse(_MX, mask=torch.zeros(2, 5, dtype=torch.bool)), raises(ValueError, "mask"))
for _v in (-1.0, _NAN, _INF, 3e38):
    row(f"masked_mse_loss/mask weight {_v}", _mse(_MX, mask=torch.full((2, 5), _v)), raises(ValueError, "mask"))
_mw = _MONES.clone()
_mw[0, 0] = _INF
row("masked_mse_loss/one infinite weight", _mse(_MX, mask=_mw.clone()), raises(ValueError, "mask"))
_mw[0, 0] = -1e-30
row("masked_mse_loss/one tiny negative weight", _mse(_MX, mask=_mw), raises(ValueError, "mask"))
for _v in (1e-30, 1e30):  # the loss is a weighted mean: the scale of the weights drops out
    row(f"masked_mse_loss/mask weights {_v:g}", _mse(_MX, mask=torch.full((2, 5), _v)), gives(close_to(_mse_ref(_MX))))
row("masked_mse_loss/mask with grad is not differentiated", _mse(_MX, mask=torch.ones(2, 5, requires_grad=True)),
    gives(close_to(_mse_ref(_MX))))  # fmt: skip
row("masked_mse_loss/norm_pix 1", _mse(_MX, norm_pix=1), raises(TypeError, "norm_pix"))
row("masked_mse_loss/norm_pix None", _mse(_MX, norm_pix=None), raises(TypeError, "norm_pix"))
row("masked_mse_loss/norm_pix with P = 1", _mse(_MX[..., :1], norm_pix=True), raises(ValueError, "P"))
row("masked_mse_loss/impl", _mse(_MX, impl="fast"), raises(ValueError, "impl"))

# patchify, unpatchify
_IMG = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(1))


def _patchify_ref(images, p):
    return lambda result: torch.equal(result, fastssl.reference.masking.patchify(images, p))


row("patchify/3-d images", lambda: fastssl.patchify(_IMG[0], 4), raises(ValueError, "images"))
row("patchify/list images", lambda: fastssl.patchify(_IMG.tolist(), 4), raises(TypeError, "images"))
row("patchify/empty batch", lambda: fastssl.patchify(_IMG[:0], 4), gives(_shape(0, 6, 48)))
row("patchify/one image, one patch", lambda: fastssl.patchify(_IMG[:1, :, :4, :4], 4), gives(_shape(1, 1, 48)))
for _dt in (torch.int64, torch.bool, torch.complex64, torch.float16, torch.bfloat16, torch.float64):
    row(f"patchify/{_dt} images (a reshape)", lambda _dt=_dt: fastssl.patchify(_IMG.to(_dt), 4),
        gives(_patchify_ref(_IMG.to(_dt), 4)))  # fmt: skip
row("patchify/transposed images", lambda: fastssl.patchify(_IMG.transpose(2, 3), 4),
    gives(_patchify_ref(_IMG.transpose(2, 3), 4)))  # fmt: skip
row("patchify/NaN images", lambda: fastssl.patchify(_IMG * _NAN, 4), gives(nonfinite))
for _v in (0, -4):
    row(f"patchify/patch_size {_v}", lambda _v=_v: fastssl.patchify(_IMG, _v), raises(ValueError, "patch_size"))
for _v in (4.0, _NAN, True, torch.tensor(4)):
    row(f"patchify/patch_size {_v!r}", lambda _v=_v: fastssl.patchify(_IMG, _v), raises(TypeError, "patch_size"))
row("patchify/patch_size 3 does not divide", lambda: fastssl.patchify(_IMG, 3), raises(ValueError, "patch_size"))
row("patchify/patch_size huge", lambda: fastssl.patchify(_IMG, 2**62), raises(ValueError, "patch_size"))
_PATCHES = fastssl.reference.masking.patchify(_IMG, 4)  # [2, 6, 48], grid (2, 3)
row("unpatchify/round trip", lambda: fastssl.unpatchify(_PATCHES, 4, (2, 3)), gives(lambda r: torch.equal(r, _IMG)))
row("unpatchify/2-d patches", lambda: fastssl.unpatchify(_PATCHES[0], 4, (2, 3)), raises(ValueError, "patches"))
row("unpatchify/list patches", lambda: fastssl.unpatchify(_PATCHES.tolist(), 4), raises(TypeError, "patches"))
row("unpatchify/empty batch", lambda: fastssl.unpatchify(_PATCHES[:0], 4, (2, 3)), gives(_shape(0, 3, 8, 12)))
row("unpatchify/int patches", lambda: fastssl.unpatchify(_PATCHES.long(), 4, (2, 3)),
    gives(lambda r: torch.equal(r, _IMG.long())))  # fmt: skip
row("unpatchify/non-square without grid", lambda: fastssl.unpatchify(_PATCHES, 4), raises(ValueError, "grid"))
row("unpatchify/grid count", lambda: fastssl.unpatchify(_PATCHES, 4, (2, 2)), raises(ValueError, "grid"))
row("unpatchify/grid 0", lambda: fastssl.unpatchify(_PATCHES, 4, (0, 6)), raises(ValueError, "grid"))
row("unpatchify/grid -2", lambda: fastssl.unpatchify(_PATCHES, 4, (-2, -3)), raises(ValueError, "grid"))
row("unpatchify/grid float", lambda: fastssl.unpatchify(_PATCHES, 4, (2.0, 3.0)), raises(TypeError, "grid"))
row("unpatchify/grid triple", lambda: fastssl.unpatchify(_PATCHES, 4, (1, 2, 3)), raises(ValueError, "grid"))
row("unpatchify/patch_size 5", lambda: fastssl.unpatchify(_PATCHES, 5, (2, 3)), raises(ValueError, "patch_size"))
row("unpatchify/patch_size 0", lambda: fastssl.unpatchify(_PATCHES, 0, (2, 3)), raises(ValueError, "patch_size"))
row("unpatchify/patch_size 4.0", lambda: fastssl.unpatchify(_PATCHES, 4.0, (2, 3)), raises(TypeError, "patch_size"))


# block_masking, noise_masking
def _bm(*args, **kw):
    return lambda: fastssl.block_masking(*args, generator=kw.pop("generator", _mgen()), **kw)


def _nm(*args, **kw):
    return lambda: fastssl.noise_masking(*args, generator=kw.pop("generator", _mgen()), **kw)


row("block_masking/defaults", _bm(4), gives(_counts(75)))
row("block_masking/one sample", _bm(1), gives(_counts(75)))
for _name, _fn in (("block_masking", _bm), ("noise_masking", _nm)):
    for _v in (0, -1):
        row(f"{_name}/batch_size {_v}", _fn(_v), raises(ValueError, "batch_size"))
    for _v in (4.0, True, torch.tensor(4), None):
        row(f"{_name}/batch_size {_v!r}", _fn(_v), raises(TypeError, "batch_size"))
    for _g in ((0, 14), (-1, 14)):
        row(f"{_name}/grid {_g}", _fn(4, _g), raises(ValueError, "grid"))
    for _g in (14, (14,), (14, 14, 1), None):
        row(f"{_name}/grid {_g!r}", _fn(4, _g), raises(ValueError, "grid"))
    row(f"{_name}/grid floats", _fn(4, (14.0, 14.0)), raises(TypeError, "grid"))
    row(f"{_name}/generator int", lambda _name=_name: getattr(fastssl, _name)(4, generator=0),
        raises(TypeError, "generator"))  # fmt: skip
    row(f"{_name}/cpu generator, meta device", _fn(4, device="meta"), raises(ValueError, "generator"))
    row(f"{_name}/device list", _fn(4, device=["cpu"]), raises(TypeError, "device"))
    row(f"{_name}/device unknown", _fn(4, device="gpu"), raises(ValueError, "device"))
row("block_masking/1x1 grid", _bm(4, (1, 1), 1, min_block=1), gives(_counts(1)))
row("block_masking/num_masked 0", _bm(4, (14, 14), 0), gives(_counts(0)))
row("block_masking/num_masked all", _bm(4, (14, 14), 196), gives(_counts(196)))
row("block_masking/num_masked over the grid", _bm(4, (14, 14), 197), raises(ValueError, "num_masked"))
row("block_masking/num_masked -1", _bm(4, (14, 14), -1), raises(ValueError, "num_masked"))
row("block_masking/num_masked huge", _bm(4, (14, 14), 2**70), raises(ValueError, "num_masked"))
row("block_masking/num_masked 75.0", _bm(4, (14, 14), 75.0), raises(TypeError, "num_masked"))
row("block_masking/min_block 0", _bm(4, min_block=0), raises(ValueError, "min_block"))
row("block_masking/min_block -16", _bm(4, min_block=-16), raises(ValueError, "min_block"))
row("block_masking/min_block 16.0", _bm(4, min_block=16.0), raises(TypeError, "min_block"))
row("block_masking/min_block 1", _bm(4, min_block=1), gives(_counts(75)))
row("block_masking/min_block over the grid (top-up only)", _bm(4, min_block=10**6), gives(_counts(75)))
row("block_masking/min_block past int64", _bm(4, min_block=10**30), gives(_counts(75)))
row("block_masking/grid past int64", _bm(1, (10**30, 10**30), 1), raises(ValueError, "grid"))
if not torch.cuda.is_available():
    row("block_masking/cuda without CUDA", _bm(4, device="cuda", generator=None), raises(ValueError, "device"))
    row("noise_masking/cuda without CUDA", _nm(4, device="cuda", generator=None), raises(ValueError, "device"))
for _ar in ((0.0, 1.0), (-1.0, 2.0), (_NAN, 2.0), (0.3, _INF), (2.0, 1.0)):
    row(f"block_masking/aspect_ratio {_ar}", _bm(4, aspect_ratio=_ar), raises(ValueError, "aspect_ratio"))
for _ar in (0.3, None, (0.3,)):
    row(f"block_masking/aspect_ratio {_ar!r}", _bm(4, aspect_ratio=_ar), raises(ValueError, "aspect_ratio"))
row("block_masking/aspect_ratio strings", _bm(4, aspect_ratio=("a", "b")), raises(TypeError, "aspect_ratio"))
for _ar in ((1e-30, 1e-30), (1e30, 1e30), (1e-300, 1e300), (1.0, 1.0)):
    row(f"block_masking/aspect_ratio {_ar}", _bm(4, aspect_ratio=_ar), gives(_counts(75)))
row("block_masking/aspect_ratio tensors", _bm(4, aspect_ratio=(torch.tensor(0.3), torch.tensor(3.0))),
    gives(_counts(75)))  # fmt: skip
row("noise_masking/defaults", _nm(4), gives(_counts(147)))
row("noise_masking/one sample", _nm(1), gives(_counts(147)))
row("noise_masking/1x1 grid", _nm(4, (1, 1), 0.5), gives(_counts(0)))
row("noise_masking/mask_ratio 0", _nm(4, (14, 14), 0.0), gives(_counts(0)))
row("noise_masking/mask_ratio tiny", _nm(4, (14, 14), 1e-30), gives(_counts(0)))
row("noise_masking/mask_ratio 0.999", _nm(4, (14, 14), 0.999), gives(_counts(195)))
row("noise_masking/mask_ratio tensor", _nm(4, (14, 14), torch.tensor(0.5)), gives(_counts(98)))
for _v in (1.0, -0.5, _NAN, _INF, 1e30):
    row(f"noise_masking/mask_ratio {_v}", _nm(4, (14, 14), _v), raises(ValueError, "mask_ratio"))
row("noise_masking/mask_ratio string", _nm(4, (14, 14), "0.5"), raises(TypeError, "mask_ratio"))
for _c in ("pink", None, "RED"):
    row(f"noise_masking/color {_c!r}", _nm(4, color=_c), raises(ValueError, "color"))
for _c in ("red", "blue", "green", "purple"):
    row(f"noise_masking/color {_c}", _nm(4, color=_c), gives(_counts(147)))


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
    lambda: fastssl.autoattack(_IMODEL, _AIMG, _IY, eps=0.1, steps=3, n_target_classes=3, queries=20, progress=False),
    gives(
        lambda r: (
            bool(torch.equal(r[1], _IMODEL(r[0]).argmax(1) == _IY)) and bool(((r[0] - _AIMG).abs() <= 0.1 + 1e-6).all())
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

_AIMG = torch.rand(4, 1, 5, 5, generator=torch.Generator().manual_seed(0))
_IMODEL = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(25, 5))
_IY = _IMODEL(_AIMG).argmax(1).detach()
row(
    "fab_attack/success is misclassified and in the ball",
    lambda: fastssl.fab_attack(_IMODEL, _AIMG, _IY, eps=0.2, steps=5, n_target_classes=4),
    gives(
        lambda r: (
            bool(torch.equal(r[1], _IMODEL(r[0]).argmax(1) != _IY)) and bool(((r[0] - _AIMG).abs() <= 0.2 + 1e-6).all())
        )
    ),
)
row(
    "fab_attack/one sample",
    lambda: fastssl.fab_attack(_IMODEL, _AIMG[:1], _IY[:1], eps=0.1, steps=2, n_target_classes=4),
    gives(lambda r: r[0].shape == (1, 1, 5, 5)),
)
row("fab_attack/eps 0", lambda: fastssl.fab_attack(_IMODEL, _AIMG, _IY, eps=0.0), raises(ValueError, "eps"))
row(
    "fab_attack/steps 0", lambda: fastssl.fab_attack(_IMODEL, _AIMG, _IY, eps=0.1, steps=0), raises(ValueError, "steps")
)
row("fab_attack/eta 0", lambda: fastssl.fab_attack(_IMODEL, _AIMG, _IY, eps=0.1, eta=0), raises(ValueError, "eta"))
row("fab_attack/float labels", lambda: fastssl.fab_attack(_IMODEL, _AIMG, _IY.float(), eps=0.1), raises(TypeError, "y"))
row(
    "fab_attack/x NaN",
    lambda: fastssl.fab_attack(_IMODEL, _AIMG * math.nan, _IY, eps=0.1),
    raises(ValueError, "non-finite"),
)
row(
    "fab_attack/x outside [0, 1]",
    lambda: fastssl.fab_attack(_IMODEL, _AIMG + 1, _IY, eps=0.1),
    raises(ValueError, "bounds"),
)
row(
    "fab_attack/targets",
    lambda: fastssl.fab_attack(_IMODEL, _AIMG, _IY, eps=0.1, n_target_classes=5),
    raises(ValueError, "n_target_classes"),
)
row(
    "fab_attack/model output 1-D",
    lambda: fastssl.fab_attack(lambda v: v.flatten(1).sum(1), _AIMG, _IY, eps=0.1),
    raises(ValueError, "model"),
)
row(
    "fab_attack/early_stop 1",
    lambda: fastssl.fab_attack(_IMODEL, _AIMG, _IY, eps=0.1, early_stop=1),
    raises(TypeError, "early_stop"),
)
row(
    "square_attack/success is misclassified and in the ball",
    lambda: fastssl.square_attack(_IMODEL, _AIMG, _IY, eps=0.2, queries=30, generator=torch.Generator().manual_seed(0)),
    gives(
        lambda r: (
            bool(torch.equal(r[1], _IMODEL(r[0]).argmax(1) != _IY)) and bool(((r[0] - _AIMG).abs() <= 0.2 + 1e-6).all())
        )
    ),
)
row(
    "square_attack/one query",
    lambda: fastssl.square_attack(_IMODEL, _AIMG, _IY, eps=0.1, queries=1),
    gives(lambda r: r[0].shape == _AIMG.shape),
)
row(
    "square_attack/1x1 images",
    lambda: fastssl.square_attack(
        lambda v: torch.cat([v.flatten(1), -v.flatten(1)], 1),
        _AIMG[:, :, :1, :1],
        torch.ones(4, dtype=torch.long),
        eps=0.1,
        queries=3,
    ),
    gives(lambda r: r[0].shape == (4, 1, 1, 1)),
)
row(
    "square_attack/flat x",
    lambda: fastssl.square_attack(_IMODEL, _AIMG.flatten(1), _IY, eps=0.1),
    raises(ValueError, "images"),
)
row(
    "square_attack/eps negative",
    lambda: fastssl.square_attack(_IMODEL, _AIMG, _IY, eps=-0.1),
    raises(ValueError, "eps"),
)
row(
    "square_attack/queries 0",
    lambda: fastssl.square_attack(_IMODEL, _AIMG, _IY, eps=0.1, queries=0),
    raises(ValueError, "queries"),
)
row(
    "square_attack/p_init NaN",
    lambda: fastssl.square_attack(_IMODEL, _AIMG, _IY, eps=0.1, p_init=math.nan),
    raises(ValueError, "p_init"),
)
row(
    "square_attack/generator type",
    lambda: fastssl.square_attack(_IMODEL, _AIMG, _IY, eps=0.1, generator=1),
    raises(TypeError, "generator"),
)
row(
    "square_attack/x outside [0, 1]",
    lambda: fastssl.square_attack(_IMODEL, _AIMG - 1, _IY, eps=0.1),
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

_TRAIN, _QUERY, _LABELS = torch.randn(40, 6), torch.randn(7, 6), torch.arange(40) % 3


def _knn_classifier(train=_TRAIN, labels=_LABELS, test=_QUERY, test_labels=_LABELS[:7], k=5):
    knn = fastssl.KNNClassifier(k=k)
    knn.update(train_feats=train, train_labels=labels, test_feats=test, test_labels=test_labels)
    return knn.compute()


def _unit_sims(train, query, k):
    """Top-k cosine similarities of the rows normalised in fp64 (what a scale-safe search gives)."""
    t, q = (torch.nn.functional.normalize(v.double(), dim=1) for v in (train, query))
    return (q @ t.T).topk(k, dim=1).values


def _scaled_rows(x, scales):
    return (
        x.double() * torch.tensor(scales, dtype=torch.float64).repeat(x.shape[0] // len(scales) + 1)[: x.shape[0], None]
    )


_HUGE = _TRAIN.double() * 1e20
_TINY_MIX = _scaled_rows(_TRAIN, [1e20, 1e-20, 1.0, 1e-30])
for name, call, expect in [
    ("knn_search/1-D train", lambda: fastssl.knn_search(_TRAIN[0], _QUERY, k=2), raises(ValueError, "train_feats")),
    ("knn_search/int train", lambda: fastssl.knn_search(_TRAIN.long(), _QUERY, k=2), raises(TypeError, "train_feats")),
    (
        "knn_search/complex query",
        lambda: fastssl.knn_search(_TRAIN, _QUERY.cfloat(), k=2),
        raises(TypeError, "query_feats"),
    ),
    ("knn_search/empty query", lambda: fastssl.knn_search(_TRAIN, _QUERY[:0], k=2), raises(ValueError, "query_feats")),
    (
        "knn_search/D mismatch",
        lambda: fastssl.knn_search(_TRAIN, _QUERY[:, :5], k=2),
        raises(ValueError, "query_feats"),
    ),
    (
        "knn_search/mixed dtypes (both searched in fp32)",
        lambda: fastssl.knn_search(_TRAIN, _QUERY.double(), k=2),
        gives(finite),
    ),
    (
        "knn_search/NaN train",
        lambda: fastssl.knn_search(_TRAIN.clone().fill_(float("nan")), _QUERY, k=2),
        raises(ValueError, "train_feats"),
    ),
    ("knn_search/inf query", lambda: fastssl.knn_search(_TRAIN, _QUERY / 0, k=2), raises(ValueError, "query_feats")),
    ("knn_search/k=0", lambda: fastssl.knn_search(_TRAIN, _QUERY, k=0), raises(ValueError, "k")),
    ("knn_search/k > N", lambda: fastssl.knn_search(_TRAIN, _QUERY, k=41), raises(ValueError, "k=41")),
    ("knn_search/k float", lambda: fastssl.knn_search(_TRAIN, _QUERY, k=2.0), raises(TypeError, "k")),
    (
        "knn_search/chunk_size=0",
        lambda: fastssl.knn_search(_TRAIN, _QUERY, k=2, chunk_size=0),
        raises(ValueError, "chunk_size"),
    ),
    (
        "knn_search/impl garbage",
        lambda: fastssl.knn_search(_TRAIN, _QUERY, k=2, impl="triton"),
        raises(ValueError, "impl"),
    ),
    ("knn_search/one train row", lambda: fastssl.knn_search(_TRAIN[:1], _QUERY, k=1), gives(finite)),
    (
        "knn_search/transposed train",
        lambda: fastssl.knn_search(_TRAIN.T.contiguous().T, _QUERY, k=3),
        gives(close_to(lambda: _unit_sims(_TRAIN, _QUERY, 3))),
    ),
    ("knn_search/expanded query", lambda: fastssl.knn_search(_TRAIN, _QUERY[:1].expand(4, -1), k=3), gives(finite)),
    (
        "knn_search/zero rows",
        lambda: fastssl.knn_search(torch.zeros(5, 6), _QUERY, k=2),
        gives(close_to(torch.zeros(7, 2))),
    ),
    # issue 13, item 2: fp64 rows of norm 1e20 were cast to fp32 before normalising (similarities all 0)
    (
        "knn_search/fp64 rows of norm 1e20",
        lambda: fastssl.knn_search(_HUGE, _HUGE[:7], k=3),
        gives(close_to(lambda: _unit_sims(_TRAIN, _TRAIN[:7], 3))),
    ),
    (
        "knn_search/fp64 rows of norm 1e±300",
        lambda: fastssl.knn_search(_scaled_rows(_TRAIN, [1e300, 1e-300]), _QUERY.double(), k=3),
        gives(close_to(lambda: _unit_sims(_TRAIN, _QUERY, 3))),
    ),
    (
        "knn_search/fp32 rows of norm 1e±20 and 1e-30",
        lambda: fastssl.knn_search(_TINY_MIX.float(), _QUERY, k=3),
        gives(close_to(lambda: _unit_sims(_TRAIN, _QUERY, 3))),
    ),
    ("knn_search/fp16 and bf16", lambda: fastssl.knn_search(_TRAIN.half(), _QUERY.half(), k=2), gives(finite)),
    # issue 13, item 5: a query set of the train set's size that is not the train set
    (
        "knn_search/leave_one_out other query set",
        lambda: fastssl.knn_search(_TRAIN, torch.randn(40, 6), k=2, leave_one_out=True),
        raises(ValueError, "leave_one_out"),
    ),
    (
        "knn_search/leave_one_out same-storage view",
        lambda: fastssl.knn_search(_TRAIN, _TRAIN[:], k=2, leave_one_out=True),
        gives(finite),
    ),
    (
        "knn_search/leave_one_out equal copy",
        lambda: fastssl.knn_search(_TRAIN, _TRAIN.clone(), k=2, leave_one_out=True),
        gives(finite),
    ),
    (
        "knn_search/leave_one_out k = N",
        lambda: fastssl.knn_search(_TRAIN, _TRAIN, k=40, leave_one_out=True),
        raises(ValueError, "k=40"),
    ),
    (
        "knn_classify/float labels",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS.float(), _QUERY),
        raises(TypeError, "train_labels"),
    ),
    (
        "knn_classify/bool labels",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS > 0, _QUERY),
        raises(TypeError, "train_labels"),
    ),
    (
        "knn_classify/labels shape",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS[:5], _QUERY),
        raises(ValueError, "train_labels"),
    ),
    (
        "knn_classify/negative label",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS - 1, _QUERY),
        raises(ValueError, "train_labels"),
    ),
    (
        "knn_classify/label >= num_classes",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS, _QUERY, num_classes=2),
        raises(ValueError, "num_classes=2"),
    ),
    (
        "knn_classify/num_classes=0",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS, _QUERY, num_classes=0),
        raises(ValueError, "num_classes"),
    ),
    # issue 13, item 8: huge labels allocated gigabytes, overflowed, or raised an unrelated TypeError
    *[
        (
            f"knn_classify/label 2^{b}",
            (lambda b=b: fastssl.knn_classify(_TRAIN, _LABELS.clone().index_fill_(0, torch.tensor([3]), 2**b), _QUERY)),
            raises(ValueError, "train_labels"),
        )
        for b in (31, 62)
    ],
    (
        "knn_classify/label 2^63-1",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS.clone().index_fill_(0, torch.tensor([3]), 2**63 - 1), _QUERY),
        raises(ValueError, "train_labels"),
    ),
    (
        "knn_classify/num_classes 2^40",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS, _QUERY, num_classes=2**40),
        raises(ValueError, "num_classes"),
    ),
    ("knn_classify/int32 labels", lambda: fastssl.knn_classify(_TRAIN, _LABELS.int(), _QUERY, k=3), gives(finite)),
    (
        "knn_classify/temperature 0",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS, _QUERY, temperature=0),
        raises(ValueError, "temperature"),
    ),
    (
        "knn_classify/temperature -1",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS, _QUERY, temperature=-1.0),
        raises(ValueError, "temperature"),
    ),
    (
        "knn_classify/temperature NaN",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS, _QUERY, temperature=float("nan")),
        raises(ValueError, "temperature"),
    ),
    (
        "knn_classify/temperature inf",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS, _QUERY, temperature=float("inf")),
        raises(ValueError, "temperature"),
    ),
    (
        "knn_classify/temperature tensor",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS, _QUERY, temperature=torch.tensor(0.1)),
        gives(finite),
    ),
    (
        "knn_classify/temperature [2] tensor",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS, _QUERY, temperature=torch.ones(2)),
        raises(ValueError, "temperature"),
    ),
    (
        "knn_classify/temperature tiny",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS, _QUERY, temperature=1e-30),
        gives(finite),
    ),
    (
        "knn_classify/temperature huge",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS, _QUERY, temperature=1e30),
        gives(finite),
    ),
    (
        "knn_classify/rows sum to 1",
        lambda: fastssl.knn_classify(_TRAIN, _LABELS, _QUERY).sum(1),
        gives(close_to(torch.ones(7))),
    ),
    # issue 13, item 9: the error did not name threshold
    (
        "knn_pseudo_labels/threshold None",
        lambda: fastssl.knn_pseudo_labels(_TRAIN, _LABELS, _QUERY, threshold=None),
        raises(TypeError, "threshold"),
    ),
    (
        "knn_pseudo_labels/threshold 'high'",
        lambda: fastssl.knn_pseudo_labels(_TRAIN, _LABELS, _QUERY, threshold="high"),
        raises(TypeError, "threshold"),
    ),
    (
        "knn_pseudo_labels/threshold NaN",
        lambda: fastssl.knn_pseudo_labels(_TRAIN, _LABELS, _QUERY, threshold=float("nan")),
        raises(ValueError, "threshold"),
    ),
    (
        "knn_pseudo_labels/threshold 1.5",
        lambda: fastssl.knn_pseudo_labels(_TRAIN, _LABELS, _QUERY, threshold=1.5),
        raises(ValueError, "threshold"),
    ),
    (
        "knn_pseudo_labels/threshold -0.1",
        lambda: fastssl.knn_pseudo_labels(_TRAIN, _LABELS, _QUERY, threshold=-0.1),
        raises(ValueError, "threshold"),
    ),
    (
        "knn_pseudo_labels/threshold bool",
        lambda: fastssl.knn_pseudo_labels(_TRAIN, _LABELS, _QUERY, threshold=True),
        raises(TypeError, "threshold"),
    ),
    (
        "knn_pseudo_labels/threshold tensor",
        lambda: fastssl.knn_pseudo_labels(_TRAIN, _LABELS, _QUERY, threshold=torch.tensor(0.5)),
        gives(finite),
    ),
    (
        "knn_pseudo_labels/threshold 1",
        lambda: fastssl.knn_pseudo_labels(_TRAIN, _LABELS, _QUERY, threshold=1.0),
        gives(finite),
    ),
    (
        "knn_pseudo_labels/NaN unlabeled",
        lambda: fastssl.knn_pseudo_labels(_TRAIN, _LABELS, _QUERY / 0),
        raises(ValueError, "query_feats"),
    ),
    (
        "knn_pseudo_labels/huge label",
        lambda: fastssl.knn_pseudo_labels(_TRAIN, _LABELS * 2**40, _QUERY),
        raises(ValueError, "train_labels"),
    ),
    ("KNNClassifier/k=0", lambda: fastssl.KNNClassifier(k=0), raises(ValueError, "k")),
    ("KNNClassifier/temperature 0", lambda: fastssl.KNNClassifier(temperature=0.0), raises(ValueError, "temperature")),
    ("KNNClassifier/impl garbage", lambda: fastssl.KNNClassifier(impl="cuda"), raises(ValueError, "impl")),
    (
        "KNNClassifier/feats without labels",
        lambda: fastssl.KNNClassifier().update(train_feats=_TRAIN),
        raises(ValueError, "train_labels"),
    ),
    ("KNNClassifier/no test features", lambda: fastssl.KNNClassifier().compute(), raises(ValueError, "train")),
    ("KNNClassifier/D mismatch", lambda: _knn_classifier(test=_QUERY[:, :5]), raises(ValueError, "test_feats")),
    (
        "KNNClassifier/negative test label",
        lambda: _knn_classifier(test_labels=_LABELS[:7] - 1),
        raises(ValueError, "test_labels"),
    ),
    (
        "KNNClassifier/huge test label",
        lambda: _knn_classifier(test_labels=_LABELS[:7] * 2**62),
        raises(ValueError, "test_labels"),
    ),
    (
        "KNNClassifier/huge train label",
        lambda: _knn_classifier(labels=_LABELS * 2**31),
        raises(ValueError, "train_labels"),
    ),
    ("KNNClassifier/k > N", lambda: _knn_classifier(k=41), raises(ValueError, "k=41")),
    ("KNNClassifier/NaN test", lambda: _knn_classifier(test=_QUERY / 0), raises(ValueError, "query_feats")),
    (
        "KNNClassifier/one class",
        lambda: _knn_classifier(labels=_LABELS * 0, test_labels=_LABELS[:7] * 0),
        gives(lambda r: r == (1.0, 1.0)),
    ),
    ("kmeans/1-D", lambda: fastssl.kmeans(_TRAIN[0], 2), raises(ValueError, "feats")),
    ("kmeans/int feats", lambda: fastssl.kmeans(_TRAIN.long(), 2), raises(TypeError, "feats")),
    ("kmeans/empty", lambda: fastssl.kmeans(_TRAIN[:0], 2), raises(ValueError, "feats")),
    ("kmeans/NaN", lambda: fastssl.kmeans(_TRAIN / 0, 2), raises(ValueError, "feats")),
    ("kmeans/num_clusters 0", lambda: fastssl.kmeans(_TRAIN, 0), raises(ValueError, "num_clusters")),
    ("kmeans/num_clusters > N", lambda: fastssl.kmeans(_TRAIN, 41), raises(ValueError, "num_clusters=41")),
    ("kmeans/num_clusters float", lambda: fastssl.kmeans(_TRAIN, 2.0), raises(TypeError, "num_clusters")),
    ("kmeans/niter 0", lambda: fastssl.kmeans(_TRAIN, 2, niter=0), raises(ValueError, "niter")),
    ("kmeans/tol -1", lambda: fastssl.kmeans(_TRAIN, 2, tol=-1.0), raises(ValueError, "tol")),
    ("kmeans/tol NaN", lambda: fastssl.kmeans(_TRAIN, 2, tol=float("nan")), raises(ValueError, "tol")),
    ("kmeans/tol None", lambda: fastssl.kmeans(_TRAIN, 2, tol=None), raises(TypeError, "tol")),
    ("kmeans/seed -1", lambda: fastssl.kmeans(_TRAIN, 2, seed=-1), raises(ValueError, "seed")),
    ("kmeans/seed 2^31", lambda: fastssl.kmeans(_TRAIN, 2, seed=2**31), raises(ValueError, "seed")),
    ("kmeans/seed float", lambda: fastssl.kmeans(_TRAIN, 2, seed=0.5), raises(TypeError, "seed")),
    ("kmeans/init garbage", lambda: fastssl.kmeans(_TRAIN, 2, init="kmeans++"), raises(ValueError, "init")),
    (
        "kmeans/gather without a process group",
        lambda: fastssl.kmeans(_TRAIN, 2, gather=True),
        raises(RuntimeError, "gather=True"),
    ),
    ("kmeans/one row", lambda: fastssl.kmeans(_TRAIN[:1], 1), gives(close_to(_TRAIN[:1]))),
    ("kmeans/K = N", lambda: fastssl.kmeans(_TRAIN, 40)[1].unique().numel(), gives(lambda r: r == 40)),
    ("kmeans/all-zero rows", lambda: fastssl.kmeans(torch.zeros(10, 3), 3), gives(close_to(torch.zeros(3, 3)))),
    ("kmeans/fp16", lambda: fastssl.kmeans(_TRAIN.half(), 3), gives(finite)),
    ("kmeans/bf16", lambda: fastssl.kmeans(_TRAIN.bfloat16(), 3), gives(finite)),
    ("kmeans/transposed", lambda: fastssl.kmeans(_TRAIN.T.contiguous().T, 3), gives(finite)),
    ("kmeans/expanded rows", lambda: fastssl.kmeans(_TRAIN[:1].expand(10, -1), 2), gives(finite)),
    ("kmeans/random init", lambda: fastssl.kmeans(_TRAIN, 3, init="random"), gives(finite)),
    # issue 13, item 2: spherical k-means put every row of norm 1e±20 in cluster 0
    (
        "kmeans/spherical rows of norm 1e±20",
        lambda: fastssl.kmeans(_TINY_MIX.float(), 4, spherical=True)[1],
        gives(lambda a: torch.equal(a, fastssl.kmeans(_TRAIN, 4, spherical=True)[1])),
    ),
    ("kmeans/fp64 at 1e300", lambda: fastssl.kmeans(_TRAIN.double() * 1e300, 3)[0], gives(finite)),
    (
        "cluster_pseudo_labels/num_clusters > N",
        lambda: fastssl.cluster_pseudo_labels(_TRAIN, 41),
        raises(ValueError, "num_clusters"),
    ),
    ("cluster_pseudo_labels/NaN", lambda: fastssl.cluster_pseudo_labels(_TRAIN / 0, 2), raises(ValueError, "feats")),
    (
        "cluster_pseudo_labels/tol -1",
        lambda: fastssl.cluster_pseudo_labels(_TRAIN, 2, tol=-1.0),
        raises(ValueError, "tol"),
    ),
    (
        "cluster_pseudo_labels/init garbage",
        lambda: fastssl.cluster_pseudo_labels(_TRAIN, 2, init="x"),
        raises(ValueError, "init"),
    ),
    (
        "cluster_pseudo_labels/gather without a process group",
        lambda: fastssl.cluster_pseudo_labels(_TRAIN, 2, gather=True),
        raises(RuntimeError, "gather=True"),
    ),
    (
        "cluster_pseudo_labels/repeated rows",
        lambda: fastssl.cluster_pseudo_labels(_TRAIN[:3].repeat(4, 1), 6)[0].unique().numel(),
        gives(lambda r: r == 6),
    ),
    (
        "cluster_pseudo_labels/weights mean 1",
        lambda: fastssl.cluster_pseudo_labels(_TRAIN, 4)[1].mean(),
        gives(close_to(torch.tensor(1.0))),
    ),
    (
        "cluster_metrics/float pred",
        lambda: fastssl.cluster_metrics(_LABELS.float(), _LABELS),
        raises(TypeError, "pred"),
    ),
    ("cluster_metrics/list pred", lambda: fastssl.cluster_metrics([0, 1], _LABELS), raises(TypeError, "pred")),
    (
        "cluster_metrics/shape mismatch",
        lambda: fastssl.cluster_metrics(_LABELS, _LABELS[:5]),
        raises(ValueError, "target"),
    ),
    ("cluster_metrics/empty", lambda: fastssl.cluster_metrics(_LABELS[:0], _LABELS[:0]), raises(ValueError, "empty")),
    ("cluster_metrics/2-D pred", lambda: fastssl.cluster_metrics(_LABELS[None], _LABELS), raises(ValueError, "pred")),
    (
        "cluster_metrics/one sample",
        lambda: fastssl.cluster_metrics(_LABELS[:1], _LABELS[:1]),
        gives(lambda r: r == {"nmi": 1.0, "ari": 1.0, "acc": 1.0}),
    ),
    (
        "cluster_metrics/huge labels",
        lambda: fastssl.cluster_metrics(_LABELS * 2**62, _LABELS),
        gives(lambda r: r["acc"] == 1.0),
    ),
]:
    row(name, call, expect)

# issue 13, item 1: FAISS threw inside an OpenMP region on |x| >= ~1.8e19 and aborted the interpreter
_KMEANS_SCALE = """
    import torch, fastssl
    x = torch.randn(200, 8)
    big = x.clone()
    big[7] = 1e20
    for call in (fastssl.kmeans, fastssl.cluster_pseudo_labels):
        for feats, k in ((x * 1e20, 5), (big, 5), (x / x.abs().max() * 3e38, 5), (x.double() * 1e300, 5)):
            out = call(feats, k)
            assert all(torch.isfinite(t).all() for t in out), call
    assert torch.equal(fastssl.kmeans(x * 1e20, 5)[1], fastssl.kmeans(x, 5)[1])
    print("ok")
"""
subprocess_row("kmeans/finite features of magnitude 1e20 to 3e38", _KMEANS_SCALE, "^ok")
subprocess_row(
    "cluster_pseudo_labels/one row of 1e20",
    """
    import torch, fastssl
    x = torch.randn(300, 16)
    x[0] = 1e20
    labels, weights = fastssl.cluster_pseudo_labels(x, 8, spherical=False)
    labels_s, _ = fastssl.cluster_pseudo_labels(x, 8, spherical=True)
    print("ok", int(labels.unique().numel()), int(labels_s.unique().numel()), bool(torch.isfinite(weights).all()))
""",
    "^ok 8 8 True",
)
subprocess_row(
    "knn_search/features of magnitude 1e20 to 3e38",
    """
    import torch, fastssl
    x = torch.randn(100, 8)
    for scale in (1e20, 3e38 / float(x.abs().max())):
        sims, idx = fastssl.knn_search(x * scale, x * scale, k=3, leave_one_out=True)
        ref = fastssl.knn_search(x, x, k=3, leave_one_out=True)
        assert torch.equal(idx, ref[1]) and torch.allclose(sims, ref[0], atol=1e-6)
    print("ok")
""",
    "^ok",
)


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
        "random_masking": lambda **kw: fastssl.random_masking(x, 0.5, generator=torch.Generator().manual_seed(0), **kw)[
            0
        ],
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
# semi-supervised: fixmatch_loss, FlexMatchLoss, FreeMatchLoss, freematch_fairness_loss, SoftMatchLoss,
# uda_loss, tsa_threshold


def _logits(b=6, c=4, *, seed=0, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, c, generator=g)).to(dtype)


def _set_logit(x, i, value):
    x = x.clone()
    x[i] = value
    return x


def _classes(w):
    return max(1, w.shape[-1])  # of the module: the logits' own number, so that their checks speak


_LW, _LS = _logits(), _logits(seed=1)
_IDX = torch.arange(6)
_SEMISUP = {  # the functions and modules, each as f(weak, strong)
    "fixmatch_loss": lambda w, s: fastssl.fixmatch_loss(w, s),
    "uda_loss": lambda w, s: fastssl.uda_loss(w, s),
    "FlexMatchLoss": lambda w, s: fastssl.FlexMatchLoss(_classes(w), 10)(w, s, torch.arange(w.shape[0])),
    "FreeMatchLoss": lambda w, s: fastssl.FreeMatchLoss(_classes(w))(w, s),
    "SoftMatchLoss": lambda w, s: fastssl.SoftMatchLoss(_classes(w))(w, s),
}
for _name, _f in _SEMISUP.items():
    row(f"{_name}/1-D logits", lambda f=_f: f(_LW[0], _LS[0]), raises(ValueError, "logits_weak"))
    row(f"{_name}/views of different shapes", lambda f=_f: f(_LW, _LS[:, :3]), raises(ValueError, "logits_strong"))
    row(f"{_name}/views of different dtypes", lambda f=_f: f(_LW, _LS.double()), raises(TypeError, "logits_strong"))
    row(f"{_name}/integer logits", lambda f=_f: f(_LW.long(), _LS.long()), raises(TypeError, "logits_weak"))
    row(f"{_name}/empty batch", lambda f=_f: f(_LW[:0], _LS[:0]), raises(ValueError, "logits_weak"))
    row(f"{_name}/no classes", lambda f=_f: f(_LW[:, :0], _LS[:, :0]), raises(ValueError, "logits_weak"))
    # one class: every row is certain of it, so the consistency loss is 0
    row(f"{_name}/C = 1", lambda f=_f: f(_LW[:, :1], _LS[:, :1]), gives(close_to(0.0)))
    row(f"{_name}/NaN in the weak view", lambda f=_f: f(_set_logit(_LW, (2, 1), math.nan), _LS), gives(nonfinite))
    row(f"{_name}/inf in the strong view", lambda f=_f: f(_LW, _set_logit(_LS, (0, 3), math.inf)), gives(nonfinite))
    row(
        f"{_name}/-inf logit in the weak view",
        lambda f=_f: f(_set_logit(_LW, (4, 0), -math.inf), _LS),
        gives(nonfinite),
    )
    row(
        f"{_name}/fp16 logits",
        lambda f=_f: f(_LW.half(), _LS.half()),
        gives(lambda r: finite(r) and r[0].dtype == torch.float32),
    )
    row(f"{_name}/bf16 logits", lambda f=_f: f(_LW.bfloat16(), _LS.bfloat16()), gives(finite))

for _t in (-0.1, 1.5, math.nan):
    row(
        f"fixmatch_loss/threshold {_t}",
        lambda t=_t: fastssl.fixmatch_loss(_LW, _LS, threshold=t),
        raises(ValueError, "threshold"),
    )
    row(
        f"uda_loss/threshold {_t}",
        lambda t=_t: fastssl.uda_loss(_LW, _LS, threshold=t),
        raises(ValueError, "threshold"),
    )
    row(
        f"FlexMatchLoss/threshold {_t}",
        lambda t=_t: fastssl.FlexMatchLoss(4, 6, threshold=t),
        raises(ValueError, "threshold"),
    )
row(
    "fixmatch_loss/threshold True",
    lambda: fastssl.fixmatch_loss(_LW, _LS, threshold=True),
    raises(TypeError, "threshold"),
)
row("fixmatch_loss/threshold 0 keeps every row", lambda: fastssl.fixmatch_loss(_LW, _LS, threshold=0.0)[1],
    gives(lambda m: bool((m == 1).all())))  # fmt: skip
row("fixmatch_loss/threshold 1 keeps only certain rows",
    lambda: fastssl.fixmatch_loss(_LW, _LS, threshold=1.0)[1], gives(lambda m: bool((m == 0).all())))  # fmt: skip
for _tau in (0.0, -1.0, math.inf):
    row(f"fixmatch_loss/temperature {_tau}", lambda t=_tau: fastssl.fixmatch_loss(_LW, _LS, temperature=t),
        raises(ValueError, "temperature"))  # fmt: skip
    row(f"uda_loss/temperature {_tau}", lambda t=_tau: fastssl.uda_loss(_LW, _LS, temperature=t),
        raises(ValueError, "temperature"))  # fmt: skip
    row(f"FreeMatchLoss/temperature {_tau}", lambda t=_tau: fastssl.FreeMatchLoss(4, temperature=t),
        raises(ValueError, "temperature"))  # fmt: skip
row(
    "fixmatch_loss/hard_label 1", lambda: fastssl.fixmatch_loss(_LW, _LS, hard_label=1), raises(TypeError, "hard_label")
)
row(
    "fixmatch_loss/soft labels",
    lambda: fastssl.fixmatch_loss(_LW, _LS, hard_label=False, temperature=0.5),
    gives(finite),
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
row("FlexMatchLoss/classes differ from num_classes", lambda: fastssl.FlexMatchLoss(5, 6)(_LW, _LS, _IDX),
    raises(ValueError, "num_classes"))  # fmt: skip
row(
    "FlexMatchLoss/float indices",
    lambda: fastssl.FlexMatchLoss(4, 6)(_LW, _LS, _IDX.float()),
    raises(TypeError, "indices"),
)
row("FlexMatchLoss/indices of the wrong length", lambda: fastssl.FlexMatchLoss(4, 6)(_LW, _LS, _IDX[:3]),
    raises(ValueError, "indices"))  # fmt: skip
row("FlexMatchLoss/index past num_unlabeled", lambda: fastssl.FlexMatchLoss(4, 5)(_LW, _LS, _IDX),
    raises(ValueError, "indices"))  # fmt: skip
row(
    "FlexMatchLoss/negative index",
    lambda: fastssl.FlexMatchLoss(4, 6)(_LW, _LS, _IDX - 1),
    raises(ValueError, "indices"),
)
row("FlexMatchLoss/state in state_dict", lambda: sorted(fastssl.FlexMatchLoss(4, 6).state_dict()),
    gives(lambda k: k == ["classwise_acc", "selected_label"]))  # fmt: skip


def _poisoned(module, *extra):
    """The loss of a finite batch after a batch with a NaN row went into the module's state."""
    module(_set_logit(_LW, (0, 0), math.nan), _LS, *extra)
    return module(_LW, _LS, *extra)


for _ema in (1.0, -0.1, math.nan):
    row(f"FreeMatchLoss/ema {_ema}", lambda e=_ema: fastssl.FreeMatchLoss(4, ema=e), raises(ValueError, "ema"))
    row(f"SoftMatchLoss/ema {_ema}", lambda e=_ema: fastssl.SoftMatchLoss(4, ema=e), raises(ValueError, "ema"))
row("FreeMatchLoss/classes differ from num_classes", lambda: fastssl.FreeMatchLoss(3)(_LW, _LS),
    raises(ValueError, "num_classes"))  # fmt: skip
row("FreeMatchLoss/a NaN in the state stays visible", lambda: _poisoned(fastssl.FreeMatchLoss(4)), gives(nonfinite))
row("FreeMatchLoss/ema 0 (no memory)", lambda: fastssl.FreeMatchLoss(4, ema=0.0)(_LW, _LS), gives(finite))

_P = torch.full((4,), 0.25)
_fair = fastssl.freematch_fairness_loss
_ONES = torch.ones(6)
row(
    "freematch_fairness_loss/mask of the wrong length",
    lambda: _fair(_ONES[:3], _LS, _P, _P),
    raises(ValueError, "mask"),
)
row("freematch_fairness_loss/p_model too short", lambda: _fair(_ONES, _LS, _P[:3], _P), raises(ValueError, "p_model"))
row(
    "freematch_fairness_loss/label_hist a list",
    lambda: _fair(_ONES, _LS, _P, [0.25] * 4),
    raises(ValueError, "label_hist"),
)
row("freematch_fairness_loss/1-D logits", lambda: _fair(_ONES, _LS[0], _P, _P), raises(ValueError, "logits_strong"))
row("freematch_fairness_loss/empty mask gives 0", lambda: _fair(0 * _ONES, _LS, _P, _P), gives(close_to(0.0)))
row("freematch_fairness_loss/NaN in a masked row", lambda: _fair(_ONES, _set_logit(_LS, (1, 1), math.nan), _P, _P),
    gives(nonfinite))  # fmt: skip
row(
    "freematch_fairness_loss/NaN mask entry",
    lambda: _fair(_set_logit(0 * _ONES, 2, math.nan), _LS, _P, _P),
    gives(finite),
)
row("freematch_fairness_loss/a class never predicted",
    lambda: _fair(_ONES, _LS, _P, torch.tensor([0.5, 0.5, 0.0, 0.0])), gives(finite))  # fmt: skip

row("SoftMatchLoss/n_sigma 0", lambda: fastssl.SoftMatchLoss(4, n_sigma=0), raises(ValueError, "n_sigma"))
row("SoftMatchLoss/dist_align None", lambda: fastssl.SoftMatchLoss(4, dist_align=None), raises(TypeError, "dist_align"))
row("SoftMatchLoss/one row (no variance)", lambda: fastssl.SoftMatchLoss(4)(_LW[:1], _LS[:1]),
    raises(ValueError, "at least 2 rows"))  # fmt: skip
row("SoftMatchLoss/a NaN in the state stays visible", lambda: _poisoned(fastssl.SoftMatchLoss(4)), gives(nonfinite))
row("SoftMatchLoss/identical rows, ema 0 (variance 0)",
    lambda: fastssl.SoftMatchLoss(4, ema=0.0)(_LW[:1].repeat(3, 1), _LS[:3]), gives(finite))  # fmt: skip
row("SoftMatchLoss/weights in (0, 1]", lambda: fastssl.SoftMatchLoss(4)(_LW, _LS)[1],
    gives(lambda w: bool(((w > 0) & (w <= 1)).all())))  # fmt: skip
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


_DS, _DT, _DW, _DTW = _dino_inputs()
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
row("dino_loss/NaN student", _dino(student=_nan_at(_DS)), gives(nonfinite))
row("dino_loss/NaN teacher, sinkhorn", _dino(teacher=_nan_at(_DT), centering="sinkhorn"), gives(nonfinite))
row("dino_loss/inf weight", _dino(weight=_DW.index_fill(0, torch.tensor([2]), float("inf"))), gives(nonfinite))
row(
    "dino_loss/K = 1 gives 0",
    _dino(weight=torch.randn(1, 6), teacher_weight=torch.randn(1, 6)),
    gives(close_to(0.0, atol=1e-5)),
)
row("dino_loss/huge logits stay finite", _dino(student=1e4 * _DS, teacher=1e4 * _DT, centering="none"), gives(finite))
row("DINOLoss/center_momentum > 1", lambda: fastssl.DINOLoss(10, center_momentum=1.5),
    raises(ValueError, "center_momentum"))  # fmt: skip
row("DINOLoss/forward updates the center",
    lambda: (lambda m: (m(_DS, _DT, _DW, _DTW), m.center)[1])(fastssl.DINOLoss(10)),
    gives(lambda c: bool(c.abs().sum() > 0)))  # fmt: skip
row("ibot_loss/teacher rows differ from student", lambda: fastssl.ibot_loss(_DS, _DT, _DW, _DTW),
    raises(ValueError, "teacher"))  # fmt: skip
row("ibot_loss/token_weights of the wrong length", lambda: fastssl.ibot_loss(_DS, _DS, _DW, _DTW,
    token_weights=torch.ones(5)), raises(ValueError, "token_weights"))  # fmt: skip
row("ibot_loss/n_images 0", lambda: fastssl.ibot_loss(_DS, _DS, _DW, _DTW, n_images=0), raises(ValueError, "n_images"))
row("ibot_loss/NaN teacher", lambda: fastssl.ibot_loss(_DS, _nan_at(_DS), _DW, _DTW), gives(nonfinite))
row("IBOTLoss/unknown centering", lambda: fastssl.IBOTLoss(10, centering="ema"), raises(ValueError, "centering"))
row("IBOTLoss/forward", lambda: fastssl.IBOTLoss(10)(_DS, _DS, _DW, _DTW), gives(finite))
row("swav_loss/rows not a multiple of n_crops", lambda: fastssl.swav_loss(torch.randn(10, 6), _DW, n_crops=4),
    raises(ValueError, "n_crops"))  # fmt: skip
row("swav_loss/n_crops_for_assign > n_crops", lambda: fastssl.swav_loss(_DS, _DW, n_crops=2, n_crops_for_assign=3),
    raises(ValueError, "n_crops_for_assign"))  # fmt: skip
row("swav_loss/epsilon 0", lambda: fastssl.swav_loss(_DS, _DW, n_crops=4, epsilon=0.0), raises(ValueError, "epsilon"))
row("swav_loss/queue d mismatch", lambda: fastssl.swav_loss(_DS, _DW, n_crops=4, queue=torch.randn(7, 5)),
    raises(ValueError, "queue"))  # fmt: skip
row("swav_loss/queue per crop, wrong count",
    lambda: fastssl.swav_loss(_DS, _DW, n_crops=4, queue=torch.randn(3, 7, 6)),
    raises(ValueError, "queue"))  # fmt: skip
row("swav_loss/NaN z", lambda: fastssl.swav_loss(_nan_at(_DS), _DW, n_crops=4), gives(nonfinite))
row("koleo_loss/one row", lambda: fastssl.koleo_loss(torch.randn(1, 4)), raises(ValueError, "2 rows"))
row("koleo_loss/eps 0", lambda: fastssl.koleo_loss(torch.randn(3, 4), eps=0.0), raises(ValueError, "eps"))
row("koleo_loss/duplicate rows are finite", lambda: fastssl.koleo_loss(torch.ones(4, 3)), gives(finite))
row("koleo_loss/NaN", lambda: fastssl.koleo_loss(_nan_at(torch.randn(5, 3))), gives(nonfinite))
row("teacher_temperature_schedule/warmup longer than training",
    lambda: fastssl.teacher_temperature_schedule(0.04, 0.07, 30, 10), raises(ValueError, "warmup_epochs"))  # fmt: skip
row("teacher_temperature_schedule/final 0", lambda: fastssl.teacher_temperature_schedule(0.04, 0.0, 3, 10),
    raises(ValueError, "final"))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# pairwise and redundancy: siglip_loss, SigLIPLoss, alignment_loss, hypersphere_loss,
# negative_cosine_similarity, barlow_twins_loss, vicreg_loss, dcl_loss, uniformity_loss

_PA, _PB = torch.randn(6, 4), torch.randn(6, 4)


def _with_value(x, i, value):
    x = x.clone()
    x.view(-1)[i] = value
    return x


row("siglip_loss/empty image", lambda: fastssl.siglip_loss(_PA[:0], _PB[:0]), raises(ValueError, "image"))
row("siglip_loss/1-D image", lambda: fastssl.siglip_loss(_PA[0], _PB[0]), raises(ValueError, "image"))
row("siglip_loss/integer image", lambda: fastssl.siglip_loss(_PA.long(), _PB.long()), raises(TypeError, "image"))
row("siglip_loss/text rows differ", lambda: fastssl.siglip_loss(_PA, _PB[:5]), raises(ValueError, "text"))
row("siglip_loss/text dtype differs", lambda: fastssl.siglip_loss(_PA, _PB.double()), raises(TypeError, "text"))
row("siglip_loss/scale nan", lambda: fastssl.siglip_loss(_PA, _PB, scale=float("nan")), raises(ValueError, "scale"))
row("siglip_loss/scale string", lambda: fastssl.siglip_loss(_PA, _PB, scale="10"), raises(TypeError, "scale"))
row(
    "siglip_loss/scale two values",
    lambda: fastssl.siglip_loss(_PA, _PB, scale=torch.ones(2)),
    raises(ValueError, "scale"),
)
row(
    "siglip_loss/scale integer tensor",
    lambda: fastssl.siglip_loss(_PA, _PB, scale=torch.tensor(3)),
    raises(TypeError, "scale"),
)
row("siglip_loss/bias inf", lambda: fastssl.siglip_loss(_PA, _PB, bias=float("inf")), raises(ValueError, "bias"))
row("siglip_loss/reduction", lambda: fastssl.siglip_loss(_PA, _PB, reduction="avg"), raises(ValueError, "reduction"))
row("siglip_loss/impl", lambda: fastssl.siglip_loss(_PA, _PB, impl="fast"), raises(ValueError, "impl"))
row("siglip_loss/gather not bool", lambda: fastssl.siglip_loss(_PA, _PB, gather=1), raises(TypeError, "gather"))
row(
    "siglip_loss/gather without group",
    lambda: fastssl.siglip_loss(_PA, _PB, gather=True),
    raises(RuntimeError, "process group"),
)
row("siglip_loss/nan image", lambda: fastssl.siglip_loss(_with_value(_PA, 3, float("nan")), _PB), gives(nonfinite))
row("siglip_loss/inf text", lambda: fastssl.siglip_loss(_PA, _with_value(_PB, 0, float("inf"))), gives(nonfinite))
row(
    "siglip_loss/nan image triton",
    lambda: fastssl.siglip_loss(_with_value(_PA, 3, float("nan")), _PB, impl="triton"),
    gives(nonfinite),
)
row(
    "siglip_loss/nan scale tensor",
    lambda: fastssl.siglip_loss(_PA, _PB, scale=torch.tensor(float("nan"))),
    gives(nonfinite),
)
row("siglip_loss/zero row", lambda: fastssl.siglip_loss(_with_value(_PA, slice(0, 4), 0.0), _PB), gives(finite))
row(
    "siglip_loss/one pair",
    lambda: fastssl.siglip_loss(_PA[:1], _PB[:1], scale=1.0, bias=0.0),
    gives(close_to(lambda: torch.nn.functional.softplus(-torch.cosine_similarity(_PA[:1], _PB[:1])).sum())),
)
row("SigLIPLoss/scale_init zero", lambda: fastssl.SigLIPLoss(scale_init=0.0), raises(ValueError, "scale_init"))
row("SigLIPLoss/bias_init nan", lambda: fastssl.SigLIPLoss(bias_init=float("nan")), raises(ValueError, "bias_init"))
row("SigLIPLoss/learnable not bool", lambda: fastssl.SigLIPLoss(learnable="yes"), raises(TypeError, "learnable"))
row("SigLIPLoss/forward", lambda: fastssl.SigLIPLoss()(_PA, _PB), gives(finite))
row("alignment_loss/alpha zero", lambda: fastssl.alignment_loss(_PA, _PB, alpha=0), raises(ValueError, "alpha"))
row("alignment_loss/y rows differ", lambda: fastssl.alignment_loss(_PA, _PB[:2]), raises(ValueError, "y"))
row("alignment_loss/nan x", lambda: fastssl.alignment_loss(_with_value(_PA, 0, float("nan")), _PB), gives(nonfinite))
row("alignment_loss/same rows", lambda: fastssl.alignment_loss(_PA, 3 * _PA), gives(close_to(0.0, atol=1e-6)))
row("hypersphere_loss/one row", lambda: fastssl.hypersphere_loss(_PA[:1], _PB[:1]), raises(ValueError, "z1"))
row("hypersphere_loss/t zero", lambda: fastssl.hypersphere_loss(_PA, _PB, t=0.0), raises(ValueError, "t"))
row("hypersphere_loss/lam negative", lambda: fastssl.hypersphere_loss(_PA, _PB, lam=-1.0), raises(ValueError, "lam"))
row("hypersphere_loss/z2 dtype differs", lambda: fastssl.hypersphere_loss(_PA, _PB.half()), raises(TypeError, "z2"))
row(
    "hypersphere_loss/nan z2",
    lambda: fastssl.hypersphere_loss(_PA, _with_value(_PB, 5, float("nan"))),
    gives(nonfinite),
)
row("hypersphere_loss/coincident rows", lambda: fastssl.hypersphere_loss(_PA[:1].repeat(4, 1), _PB[:4]), gives(finite))
row(
    "negative_cosine_similarity/3-D p",
    lambda: fastssl.negative_cosine_similarity(_PA[None], _PB[None]),
    raises(ValueError, "p"),
)
row(
    "negative_cosine_similarity/z rows differ",
    lambda: fastssl.negative_cosine_similarity(_PA, _PB[:3]),
    raises(ValueError, "z"),
)
row(
    "negative_cosine_similarity/zero row",
    lambda: fastssl.negative_cosine_similarity(_PA * 0, _PB),
    gives(close_to(0.0)),
)
row(
    "negative_cosine_similarity/nan p",
    lambda: fastssl.negative_cosine_similarity(_with_value(_PA, 1, float("nan")), _PB),
    gives(nonfinite),
)
row("barlow_twins_loss/one row", lambda: fastssl.barlow_twins_loss(_PA[:1], _PB[:1]), raises(ValueError, "z1"))
row("barlow_twins_loss/z2 rows differ", lambda: fastssl.barlow_twins_loss(_PA, _PB[:4]), raises(ValueError, "z2"))
row(
    "barlow_twins_loss/lambda_ negative",
    lambda: fastssl.barlow_twins_loss(_PA, _PB, lambda_=-1.0),
    raises(ValueError, "lambda_"),
)
row(
    "barlow_twins_loss/gather without group",
    lambda: fastssl.barlow_twins_loss(_PA, _PB, gather=True),
    raises(RuntimeError, "process group"),
)
row(
    "barlow_twins_loss/nan z1",
    lambda: fastssl.barlow_twins_loss(_with_value(_PA, 2, float("nan")), _PB),
    gives(nonfinite),
)
row(
    "barlow_twins_loss/constant column",
    lambda: fastssl.barlow_twins_loss(_with_value(_PA, slice(0, None, 4), 1.0), _PB),
    gives(finite),
)
row("vicreg_loss/one row", lambda: fastssl.vicreg_loss(_PA[:1], _PB[:1]), raises(ValueError, "z1"))
row("vicreg_loss/eps zero", lambda: fastssl.vicreg_loss(_PA, _PB, eps=0.0), raises(ValueError, "eps"))
row(
    "vicreg_loss/invariance negative",
    lambda: fastssl.vicreg_loss(_PA, _PB, invariance=-1.0),
    raises(ValueError, "invariance"),
)
row("vicreg_loss/gather not bool", lambda: fastssl.vicreg_loss(_PA, _PB, gather="no"), raises(TypeError, "gather"))
row("vicreg_loss/inf z2", lambda: fastssl.vicreg_loss(_PA, _with_value(_PB, 0, float("inf"))), gives(nonfinite))
row(
    "vicreg_loss/constant views", lambda: fastssl.vicreg_loss(_PA * 0, _PB * 0), gives(close_to(25.0 * (1 - 1e-2)))
)  # only the variance hinge: 1 − √eps per column

row("dcl_loss/one row", lambda: fastssl.dcl_loss(_PA[:1], _PB[:1]), raises(ValueError, "z1"))
row("dcl_loss/empty z1", lambda: fastssl.dcl_loss(_PA[:0], _PB[:0]), raises(ValueError, "z1"))
row("dcl_loss/z2 rows differ", lambda: fastssl.dcl_loss(_PA, _PB[:4]), raises(ValueError, "z2"))
row("dcl_loss/z2 dtype differs", lambda: fastssl.dcl_loss(_PA, _PB.double()), raises(TypeError, "z2"))
row("dcl_loss/integer z1", lambda: fastssl.dcl_loss(_PA.long(), _PB.long()), raises(TypeError, "z1"))
row("dcl_loss/temperature zero", lambda: fastssl.dcl_loss(_PA, _PB, temperature=0.0), raises(ValueError, "temperature"))
row(
    "dcl_loss/temperature two values",
    lambda: fastssl.dcl_loss(_PA, _PB, temperature=torch.ones(2)),
    raises(ValueError, "temperature"),
)
row("dcl_loss/sigma negative", lambda: fastssl.dcl_loss(_PA, _PB, sigma=-1.0), raises(ValueError, "sigma"))
row("dcl_loss/sigma string", lambda: fastssl.dcl_loss(_PA, _PB, sigma="1"), raises(TypeError, "sigma"))
row("dcl_loss/impl", lambda: fastssl.dcl_loss(_PA, _PB, impl="fast"), raises(ValueError, "impl"))
row("dcl_loss/gather not bool", lambda: fastssl.dcl_loss(_PA, _PB, gather=1), raises(TypeError, "gather"))
row(
    "dcl_loss/gather without group",
    lambda: fastssl.dcl_loss(_PA, _PB, gather=True),
    raises(RuntimeError, "process group"),
)
row("dcl_loss/nan z1", lambda: fastssl.dcl_loss(_with_value(_PA, 3, float("nan")), _PB), gives(nonfinite))
row(
    "dcl_loss/inf z2 triton",
    lambda: fastssl.dcl_loss(_PA, _with_value(_PB, 0, float("inf")), impl="triton"),
    gives(nonfinite),
)
row("dcl_loss/zero row", lambda: fastssl.dcl_loss(_with_value(_PA, slice(0, 4), 0.0), _PB), gives(finite))
row(
    "dcl_loss/two rows",  # z1 = z2 = two orthogonal rows: each row's negatives are s = 0 twice, its positive 1/τ
    lambda: fastssl.dcl_loss(torch.eye(2), torch.eye(2), temperature=0.5),
    gives(close_to(math.log(2.0) - 2.0)),
)
row("uniformity_loss/one row", lambda: fastssl.uniformity_loss(_PA[:1]), raises(ValueError, "x"))
row("uniformity_loss/1-D x", lambda: fastssl.uniformity_loss(_PA[0]), raises(ValueError, "x"))
row("uniformity_loss/t zero", lambda: fastssl.uniformity_loss(_PA, t=0.0), raises(ValueError, "t"))
row("uniformity_loss/t string", lambda: fastssl.uniformity_loss(_PA, t="2"), raises(TypeError, "t"))
row("uniformity_loss/nan x", lambda: fastssl.uniformity_loss(_with_value(_PA, 2, float("nan"))), gives(nonfinite))
row(
    "uniformity_loss/coincident rows",
    lambda: fastssl.uniformity_loss(_PA[:1].repeat(4, 1)),
    gives(close_to(0.0, atol=1e-6)),
)
row(
    "uniformity_loss/two opposite rows",  # ‖x̂_1 − x̂_2‖² = 4
    lambda: fastssl.uniformity_loss(torch.tensor([[1.0, 0.0], [-2.0, 0.0]]), t=2.0),
    gives(close_to(-8.0)),
)
row("uniformity_loss/large t", lambda: fastssl.uniformity_loss(_PA, t=2000.0), gives(finite))


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


def test_sections_share_no_module_names():
    """The rows' lambdas read module-level names when they run: a name assigned twice at module
    level would silently change an earlier section's rows."""
    import ast
    from collections import Counter
    from pathlib import Path

    tree = ast.parse(Path(__file__).read_text())
    names = Counter()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] += 1
        while targets:  # names bound, through tuples; x[i] = ... mutates, it does not rebind
            target = targets.pop()
            if isinstance(target, ast.Name):
                names[target.id] += 1
            elif isinstance(target, (ast.Tuple, ast.List)):
                targets.extend(target.elts)
    loops = [node.target for node in tree.body if isinstance(node, ast.For)]
    loop_vars = {n.id for target in loops for n in ast.walk(target) if isinstance(n, ast.Name)}
    twice = sorted(n for n, c in names.items() if c > 1 and n not in loop_vars)
    assert not twice, f"module-level names assigned more than once: {twice}"


def test_every_public_name_has_rows():
    ids = [p.id for p in ROWS + SUBPROCESS_ROWS]
    missing = [name for name in fastssl.__all__ if not name.startswith("_") and not any(
        re.match(rf"{re.escape(name)}\b", i) for i in ids
    )]  # fmt: skip
    assert not missing, f"public names without a row in the input catalogue: {missing}"
