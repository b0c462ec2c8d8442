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


# ---------------------------------------------------------------------------------------------
# adversarial: pgd_step_, random_start, pgd_attack, instance_attack, feature_attack, robust_accuracy


# ---------------------------------------------------------------------------------------------
# neighbors: knn_search, knn_classify, knn_pseudo_labels, KNNClassifier, kmeans, cluster_pseudo_labels,
# cluster_metrics


# ---------------------------------------------------------------------------------------------
# environment: FASTSSL_IMPL


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
