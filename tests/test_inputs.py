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
        lambda: fastssl.knn_search(_TRAIN, _QUERY, k=2, impl="cpp"),
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
