"""fastssl.semisup against the references written from USB (fastssl/reference/semisup.py): loss,
mask, gradient and state, step by step over a short run of batches; the state's reduction over two
gloo processes against one process on the concatenated batch. Bad inputs: tests/test_inputs.py."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _assertions import assert_verbose_allclose
from _dist import free_port

import fastssl
import fastssl.cli
from fastssl.reference import semisup as ref

B, C, N = 7, 5, 24  # rows per batch, classes, size of the unlabeled set (FlexMatch)
TOL = dict(rtol=1e-11, atol=1e-13)


def _batches(steps, b=B, seed=0, dtype=torch.float64):
    """(weak, strong, indices) per step: confidence grows over the steps, so that thresholds and
    state move; indices are distinct within a batch."""
    g = torch.Generator().manual_seed(seed)
    for s in range(steps):
        weak = (1 + 1.5 * s) * torch.randn(b, C, generator=g, dtype=torch.float64)
        strong = weak + torch.randn(b, C, generator=g, dtype=torch.float64)
        yield weak.to(dtype), strong.to(dtype), torch.randperm(N, generator=g)[:b]


def _run(ours, theirs, steps=4, dtype=torch.float64, tol=TOL, state=None):
    """Both losses over the same batches: loss, mask, the strong view's gradient (the weak view's is
    none), and the state after every step (`state` maps our buffer to a function of the reference)."""
    for step, (weak, strong, idx) in enumerate(_batches(steps, dtype=dtype)):
        w, s = weak.clone().requires_grad_(), strong.clone().requires_grad_()
        loss, mask = ours(w, s, idx)
        grad_w, grad_s = torch.autograd.grad(loss, (w, s), allow_unused=True)
        assert grad_w is None, "the weak view only makes targets"
        s64 = strong.double().requires_grad_()
        ref_loss, ref_mask = theirs(weak.double(), s64, idx)
        (ref_grad,) = torch.autograd.grad(ref_loss, s64)
        assert_verbose_allclose(loss, ref_loss, **tol, name=f"loss, step {step}")
        assert_verbose_allclose(mask, ref_mask, **tol, name=f"mask, step {step}")
        assert_verbose_allclose(grad_s, ref_grad, **tol, name=f"grad, step {step}")
        for name, value in (state or {}).items():
            assert_verbose_allclose(name(), value(), **tol, name=f"state, step {step}")


@pytest.mark.parametrize(("hard_label", "temperature"), [(True, 1.0), (False, 1.0), (False, 0.5)])
def test_fixmatch(hard_label, temperature):
    _run(
        lambda w, s, _: fastssl.fixmatch_loss(w, s, threshold=0.7, temperature=temperature, hard_label=hard_label),
        lambda w, s, _: ref.fixmatch(w, s, 0.7, temperature, hard_label),
    )


def test_fixmatch_fp32():
    _run(lambda w, s, _: fastssl.fixmatch_loss(w, s, threshold=0.7), lambda w, s, _: ref.fixmatch(w, s, 0.7, 1, True),
         dtype=torch.float32, tol=dict(rtol=1e-5, atol=1e-6))  # fmt: skip


@pytest.mark.parametrize(("thresh_warmup", "hard_label"), [(True, True), (False, True), (True, False)])
def test_flexmatch(thresh_warmup, hard_label):
    kw = dict(threshold=0.7, thresh_warmup=thresh_warmup, temperature=0.5, hard_label=hard_label)
    ours = fastssl.FlexMatchLoss(C, N, **kw).double()
    theirs = ref.FlexMatch(C, N, 0.7, thresh_warmup, 0.5, hard_label)
    _run(ours, theirs, steps=5, state={
        lambda: ours.selected_label: lambda: theirs.selected_label,
        lambda: ours.classwise_acc: lambda: theirs.classwise_acc,
    })  # fmt: skip
    assert bool((ours.classwise_acc > 0).any()), "the run should have left warm-up"


@pytest.mark.parametrize("hard_label", [True, False])
def test_freematch(hard_label):
    ours = fastssl.FreeMatchLoss(C, ema=0.3, temperature=0.5, hard_label=hard_label).double()
    theirs = ref.FreeMatch(C, 0.3, 0.5, hard_label)
    masks = []
    _run(lambda w, s, _: masks.append(ours(w, s)) or masks[-1], lambda w, s, _: theirs(w, s), state={
        lambda: ours.time_p: lambda: theirs.time_p,
        lambda: ours.p_model: lambda: theirs.p_model,
        lambda: ours.label_hist: lambda: theirs.label_hist,
    })  # fmt: skip
    assert 0 < float(torch.cat([m for _, m in masks]).mean()) < 1


@pytest.mark.parametrize(("dist_align", "n_sigma", "hard_label"), [(True, 2, True), (False, 3, True), (True, 2, False)])
def test_softmatch(dist_align, n_sigma, hard_label):
    ours = fastssl.SoftMatchLoss(C, ema=0.9, n_sigma=n_sigma, temperature=0.5, hard_label=hard_label,
                                 dist_align=dist_align).double()  # fmt: skip
    theirs = ref.SoftMatch(C, 0.9, n_sigma, 0.5, hard_label, dist_align)
    state = {
        lambda: ours.prob_max_mu_t: lambda: theirs.prob_max_mu_t,
        lambda: ours.prob_max_var_t: lambda: theirs.prob_max_var_t,
    }
    if dist_align:
        state[lambda: ours.p_model] = lambda: theirs.p_model
    _run(lambda w, s, _: ours(w, s), lambda w, s, _: theirs(w, s), state=state)


def test_uda():
    def ours(w, s, _):
        return fastssl.uda_loss(w, s, temperature=0.4, threshold=0.6)

    _run(ours, lambda w, s, _: ref.uda(w, s, 0.6, 0.4))
    # USB's cross-entropy form is larger by the masked targets' entropy, a constant: the same gradient
    for weak, strong, _ in _batches(2):
        grads = []
        for loss in (ours, lambda w, s, _: ref.uda_usb(w, s, 0.6, 0.4)):
            s = strong.clone().requires_grad_()
            grads.append(torch.autograd.grad(loss(weak, s, None)[0], s)[0])
        assert_verbose_allclose(*grads, **TOL, name="grad against USB's form")


@pytest.mark.parametrize("schedule", ["linear", "log", "exp", "none"])
def test_tsa_threshold(schedule):
    for step in (0, 1, 37, 100):
        want = ref.tsa(schedule, step, 100, 10)
        assert fastssl.tsa_threshold(schedule, step, 100, 10) == pytest.approx(want, abs=1e-15)
    # known values at 37 % of training: α = 0.37, 1 − e^{−1.85}, e^{−3.15}
    known = {"linear": 0.37, "log": 1 - 0.1572371663136276, "exp": 0.04285212686704019, "none": None}[schedule]
    want = 1.0 if known is None else known * 0.9 + 0.1
    assert fastssl.tsa_threshold(schedule, 37, 100, 10) == pytest.approx(want, abs=1e-15)


def test_freematch_fairness_loss():
    module = fastssl.FreeMatchLoss(C, ema=0.9).double()
    for weak, strong, _ in _batches(3):
        _, mask = module(weak, strong)
        s = strong.clone().requires_grad_()
        ours = fastssl.freematch_fairness_loss(mask, s, module.p_model, module.label_hist)
        s_ref = strong.clone().requires_grad_()
        theirs = ref.freematch_entropy_loss(mask, s_ref, module.p_model, module.label_hist)
        assert_verbose_allclose(ours, theirs, **TOL, name="fairness loss")
        assert_verbose_allclose(*(torch.autograd.grad(x, t)[0] for x, t in ((ours, s), (theirs, s_ref))), **TOL)
    nothing = torch.zeros(B, dtype=torch.float64)
    assert float(fastssl.freematch_fairness_loss(nothing, strong, module.p_model, module.label_hist)) == 0.0


@pytest.mark.parametrize("make", [
    lambda: fastssl.FlexMatchLoss(C, N, threshold=0.7),
    lambda: fastssl.FreeMatchLoss(C, ema=0.9),
    lambda: fastssl.SoftMatchLoss(C, ema=0.9),
])  # fmt: skip
def test_state_dict_round_trip(make):
    """A module restored from a state_dict continues exactly as the one that wrote it."""
    a, b = make().double(), make().double()
    batches = list(_batches(3))
    for weak, strong, idx in batches[:2]:
        a(weak, strong, idx) if isinstance(a, fastssl.FlexMatchLoss) else a(weak, strong)
    b.load_state_dict(a.state_dict())
    args = batches[2] if isinstance(a, fastssl.FlexMatchLoss) else batches[2][:2]
    for x, y in zip(a(*args), b(*args), strict=True):
        assert torch.equal(x, y)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# -- state reduced over processes (gloo) -----------------------------------------------------------




def _all_reduced(x):
    x = x.clone()
    dist.all_reduce(x)
    return x


def _check_ranks(rank, counts, ours, theirs, state, with_indices):
    """Each rank feeds its rows; the reference feeds the concatenated batch. The state is the same
    on every rank and equal to the reference's, each rank's mask is its rows' of the reference's,
    and the rank losses' row-weighted sum is the reference's loss."""
    total, first = sum(counts), sum(counts[:rank])
    mine = slice(first, first + counts[rank])
    for step, (weak, strong, idx) in enumerate(_batches(4, b=total, seed=1)):
        args = (weak[mine], strong[mine], idx[mine]) if with_indices else (weak[mine], strong[mine])
        loss, mask = ours(*args)
        whole, whole_mask = theirs(weak, strong, idx) if with_indices else theirs(weak, strong)
        tag = f"rank {rank} {type(ours).__name__} step {step}"
        assert_verbose_allclose(mask, whole_mask[mine], **TOL, name=f"mask, {tag}")
        assert_verbose_allclose(_all_reduced(loss * counts[rank]), whole * total, **TOL, name=f"loss, {tag}")
        for name in state:
            assert_verbose_allclose(getattr(ours, name), getattr(theirs, name), **TOL, name=f"{name}, {tag}")


def _state_worker(rank, world, port, counts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        names = ("selected_label", "classwise_acc")
        _check_ranks(rank, counts, fastssl.FlexMatchLoss(C, N, threshold=0.7).double(),
                     ref.FlexMatch(C, N, 0.7, True, 1.0, True), names, True)  # fmt: skip
        _check_ranks(rank, counts, fastssl.FreeMatchLoss(C, ema=0.9).double(), ref.FreeMatch(C, 0.9, 1.0, True),
                     ("time_p", "p_model", "label_hist"), False)  # fmt: skip
        names = ("prob_max_mu_t", "prob_max_var_t", "p_model")
        _check_ranks(rank, counts, fastssl.SoftMatchLoss(C, ema=0.9).double(), ref.SoftMatch(C, 0.9, 2, 1.0, True),
                     names, False)  # fmt: skip
        dist.barrier()  # every rank done before any tears the group down
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_state_reduced_over_ranks():
    """Two gloo processes with 3 and 5 rows keep the state of one process on all 8."""
    mp.spawn(_state_worker, args=(2, free_port(), [3, 5]), nprocs=2)


# -- the example (`fastssl demo --method fixmatch`) ------------------------------------------------


def test_fixmatch_demo_tiny_run(tmp_path):
    """Two short epochs of both runs: accuracies and mask rates in range, the JSON and PNG written,
    and `fastssl demo --method` reaching the example."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from examples import fixmatch_digits as demo

    result = demo.run(demo.Config(epochs=2, steps_per_epoch=2, batch_size=16, mu=2), tmp_path)
    assert result["labeled"] == 100 and result["labeled"] + result["unlabeled"] == 1257
    for name in demo.RUNS:
        assert len(result[name]["test_accuracy"]) == 3 and all(0 <= a <= 1 for a in result[name]["test_accuracy"])
    assert len(result["fixmatch"]["mask_rate"]) == 2 and all(0 <= r <= 1 for r in result["fixmatch"]["mask_rate"])
    assert json.loads((tmp_path / "fixmatch_digits.json").read_text())["labeled"] == 100
    assert (tmp_path / "fixmatch_digits.png").read_bytes()[:4] == b"\x89PNG"
    labeled = demo.split_labels(torch.arange(50) % 10, 3, seed=0)
    assert torch.equal(torch.bincount(labeled % 10, minlength=10), torch.full((10,), 3))
    with pytest.raises(SystemExit) as exc:
        fastssl.cli.main(["demo", "--method", "fixmatch", "--epochs", "0"])
    assert exc.value.code == 2
