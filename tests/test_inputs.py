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
# adversarial: pgd_step_, random_start, pgd_attack, instance_attack, feature_attack, robust_accuracy


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
