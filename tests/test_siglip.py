"""SigLIP: the C++ and Triton kernels against the eager reference, open_clip's SigLipLoss (whole,
chunked as its distributed variants compute it, and over gloo), gradcheck, opcheck, gather=True over
2 and 4 gloo processes. The Triton kernels' compilation for sm_90 and sm_80 is scripts/compile_check.py's
(through the selftest case "siglip_loss")."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _assertions import assert_lowprec_close, assert_verbose_allclose, zero_fills_in_backward
from _dist import free_port
from _peers import peer

import fastssl
from fastssl.ops.siglip import siglip_fused, siglip_rows, siglip_rows_backward


def _inputs(m, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=gen, dtype=torch.float64)
    y = x + 0.8 * torch.randn(m, d, generator=gen, dtype=torch.float64)  # correlated towers
    return x.to(dtype), y.to(dtype)


def _loss_and_grads(x, y, scale=10.0, bias=-10.0, *, reduction="mean", **kw):
    """The loss and the gradients of x, y, a learnable scale and bias (fp64 leaves for fp64 rows)."""
    sdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    leaves = [x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()]
    s = torch.tensor(scale, dtype=sdtype, requires_grad=True)
    b = torch.tensor(bias, dtype=sdtype, requires_grad=True)
    loss = fastssl.siglip_loss(*leaves, scale=s, bias=b, reduction=reduction, **kw)
    weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view_as(loss) if loss.dim() else 1.0
    return loss, torch.autograd.grad((loss * weight).sum(), [*leaves, s, b])


NAMES = ("loss", "grad image", "grad text", "grad scale", "grad bias")


def _check(impl, x, y, *, rtol=1e-10, atol=1e-12, **kw):
    """fp32/fp64: against the reference in the same dtype; fp16/bf16: flash-attention's check."""
    loss, grads = _loss_and_grads(x, y, impl=impl, **kw)
    assert loss.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    if x.dtype in (torch.float32, torch.float64):
        ref_loss, ref_grads = _loss_and_grads(x, y, impl="reference", **kw)
        for a, b, name in zip((loss, *grads), (ref_loss, *ref_grads), NAMES, strict=True):
            assert_verbose_allclose(a, b, rtol=rtol, atol=atol, name=f"{impl} {name}")
        return
    ref32 = _loss_and_grads(x.float(), y.float(), impl="reference", **kw)
    lowp = _loss_and_grads(x, y, impl="reference", **kw)
    for a, r, lp, name in zip((loss, *grads), (ref32[0], *ref32[1]), (lowp[0], *lowp[1]), NAMES, strict=True):
        assert_lowprec_close(a.float(), r.float(), lp.float(), atol=1e-3, name=f"{impl} {name}")


@pytest.fixture
def small_triton_blocks(monkeypatch):
    """Tiles of 16 so that small inputs span many tiles and runs of column blocks."""
    from fastssl.kernels import siglip as kernels

    monkeypatch.setattr(kernels, "_CONFIGS", {key: ((16, 16, 4, 1), (16, 16, 4, 1)) for key in kernels._CONFIGS})


# -- against the reference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("m, d", [(1, 1), (3, 3), (37, 64), (300, 20), (600, 7)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpp_shapes(m, d, reduction):
    _check("cpp", *_inputs(m, d), reduction=reduction)


@pytest.mark.parametrize("scale, bias", [(10.0, -10.0), (1.0, 0.0), (100.0, -10.0), (30.0, 15.0), (0.5, -40.0)])
@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_scale_bias(impl, scale, bias, small_triton_blocks):
    """Saturated sigmoids both ways (far negatives, log σ of large logits) stay exact in fp64."""
    _check(impl, *_inputs(21, 6), scale=scale, bias=bias, reduction="sum")


@pytest.mark.parametrize("m, d", [(1, 1), (5, 3), (37, 20), (40, 70)])
def test_triton_shapes(m, d, small_triton_blocks):
    """Interpreted: ragged tiles, D in one chunk and in several (fp64 chunks of 32)."""
    _check("triton", *_inputs(m, d), reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_dtypes(impl, dtype, small_triton_blocks):
    _check(impl, *_inputs(37, 24, dtype), rtol=1e-5, atol=1e-5)


def test_non_contiguous_rows():
    x, y = _inputs(30, 16)
    xt, yt = x.T.contiguous().T, y.repeat_interleave(2, dim=1)[:, ::2]  # column-major, strided
    for impl in ("cpp", "triton"):
        assert_verbose_allclose(
            fastssl.siglip_loss(xt, yt, impl=impl), fastssl.siglip_loss(x, y, impl="reference"), rtol=1e-12
        )


# -- against open_clip ---------------------------------------------------------------------------------------


def _open_clip_grads(fn, x, y, scale, bias):
    """fn(x̂, ŷ, scale, bias) on normalised leaf copies; open_clip takes normalised features."""
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    s = torch.tensor(scale, dtype=x.dtype, requires_grad=True)
    b = torch.tensor(bias, dtype=x.dtype, requires_grad=True)
    loss = fn(F.normalize(leaves[0], dim=1), F.normalize(leaves[1], dim=1), s, b)
    return loss, torch.autograd.grad(loss, [*leaves, s, b])


def _chunked_open_clip(chunks):
    """open_clip's distributed SigLIP run in one process: rank r's images against its own texts, then
    every other rank's texts as negatives only (its `_loss(..., negative_only=True)`), each block
    kept for backward; the mean of the ranks' losses is the whole batch's."""
    loss_fn = peer("open_clip.loss").SigLipLoss()

    def fn(x, y, s, b):
        xs, ys = x.chunk(chunks), y.chunk(chunks)
        total = 0
        for r, xr in enumerate(xs):
            for o, yo in enumerate(ys):
                total = total + loss_fn._loss(xr, yo, s, b, negative_only=o != r)
        return total / chunks

    return fn


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("chunks", [1, 3])
def test_equals_open_clip(impl, chunks):
    x, y = _inputs(24, 10)
    scale, bias = 9.0, -7.5
    whole = peer("open_clip.loss").SigLipLoss()
    fn = whole if chunks == 1 else _chunked_open_clip(chunks)
    theirs = _open_clip_grads(fn, x, y, scale, bias)
    ours = _loss_and_grads(x, y, scale, bias, impl=impl)
    for a, b, name in zip((ours[0], *ours[1]), (theirs[0], *theirs[1]), NAMES, strict=True):
        assert_verbose_allclose(a, b, rtol=1e-10, atol=1e-12, name=f"{name} vs open_clip, {chunks} chunks")


def test_module_learns_log_scale():
    """SigLIPLoss holds t′ = log scale and the bias; its gradients are those of exp(t′) and b."""
    x, y = _inputs(12, 5)
    module = fastssl.SigLIPLoss(scale_init=10.0, bias_init=-10.0).double()
    loss = module(x, y)
    loss.backward()
    t = torch.tensor(10.0, dtype=torch.float64).log().requires_grad_()
    b = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    ref = peer("open_clip.loss").SigLipLoss()(F.normalize(x, dim=1), F.normalize(y, dim=1), t.exp(), b)
    ref.backward()
    assert_verbose_allclose(loss, ref, rtol=1e-12, name="loss")
    assert_verbose_allclose(module.logit_scale.grad, t.grad, rtol=1e-10, name="grad log scale")
    assert_verbose_allclose(module.logit_bias.grad, b.grad, rtol=1e-10, name="grad bias")
    fixed = fastssl.SigLIPLoss(learnable=False)
    assert not list(fixed.parameters()) and len(list(fixed.buffers())) == 2


# -- autograd, torch.library ----------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_gradcheck(impl):
    x, y = _inputs(6, 4)
    s = torch.tensor(3.0, dtype=torch.float64)
    b = torch.tensor(-2.0, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, y, s, b)]
    torch.autograd.gradcheck(
        lambda x, y, s, b: fastssl.siglip_loss(x, y, scale=s, bias=b, reduction="none", impl=impl), leaves
    )


def test_opcheck():
    x, y = (F.normalize(t, dim=1) for t in _inputs(9, 5))
    s, b = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    torch.library.opcheck(siglip_rows, (x.requires_grad_(), y.requires_grad_(), s.requires_grad_(), b, 0, "cpp"))
    torch.library.opcheck(siglip_fused, (x, y, s, b, 0, "cpp"))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_gradients_equal_backward_pass(reduction, monkeypatch):
    """A mean or sum takes its gradients in the forward (siglip_fused); they equal those of the
    backward pass (siglip_rows) in fp64, with scale and bias learnable."""
    from fastssl.ops import siglip as op

    x, y = _inputs(300, 20)
    leaves = [t.clone().requires_grad_() for t in (x, y, torch.tensor(7.0, dtype=torch.float64),
                                                    torch.tensor(-3.0, dtype=torch.float64))]  # fmt: skip

    def grads():
        loss = fastssl.siglip_loss(leaves[0], leaves[1], scale=leaves[2], bias=leaves[3], reduction=reduction)
        return loss, torch.autograd.grad(loss, leaves)

    calls, passes = [], []
    monkeypatch.setattr(op, "siglip_fused", lambda *a: calls.append(1) or siglip_fused(*a))
    monkeypatch.setattr(op, "siglip_rows_backward", lambda *a: passes.append(1) or siglip_rows_backward(*a))
    fused = grads()
    assert calls and not passes, "the fused path did not run, or its backward ran the backward pass"
    monkeypatch.setattr(op, "_fuse_gradients", lambda *a: False)
    plain = grads()
    assert_verbose_allclose(fused[0], plain[0], rtol=1e-13, atol=0)
    for a, b in zip(fused[1], plain[1], strict=True):
        assert_verbose_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_large_scale_matches_fp64():
    """scale = 100 (SigLIP's learnt scale grows to about that): the fp32 kernels' loss and gradients,
    whose small terms are flushed to 0 below FLT_MIN (csrc/cpu/vec_math.h), against fp64."""
    x, y = _inputs(300, 20)
    got_loss, got = _loss_and_grads(x.float(), y.float(), 100.0, -100.0)
    want_loss, want = _loss_and_grads(x, y, 100.0, -100.0)
    assert_verbose_allclose(got_loss, want_loss, rtol=1e-5, atol=0, name="loss")
    for a, b, name in zip(got, want, NAMES[1:], strict=True):
        assert_verbose_allclose(a, b, rtol=1e-4, atol=1e-6, name=name)


def test_fused_backward_makes_no_zero_gradients():
    """siglip_fused's gradient outputs get no gradient: autograd must not fill x- and y-sized zero
    tensors for them on every backward."""
    x, y = (t.clone().requires_grad_() for t in _inputs(40, 6))
    assert not zero_fills_in_backward(fastssl.siglip_loss(x, y), x.shape)


def test_fused_with_a_non_uniform_upstream_gradient():
    """siglip_fused's backward under an upstream gradient that differs between rows takes the
    backward pass: gradients equal siglip_rows' (tested against open_clip above)."""
    x, y = (F.normalize(t, dim=1) for t in _inputs(37, 6))
    s, b = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    w = torch.linspace(0.5, 2.0, 37, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, y, s, b)]
    got = torch.autograd.grad((siglip_fused(*leaves, 0, "cpp")[0] * w).sum(), leaves)
    ref = [t.clone().requires_grad_() for t in (x, y, s, b)]
    want = torch.autograd.grad((siglip_rows(*ref, 0, "cpp") * w).sum(), ref)
    for a, b in zip(got, want, strict=True):
        assert_verbose_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_scale_tensor_on_host_stays_unread():
    """A tensor scale with a NaN is not read or checked: the loss is NaN (never a finite number)."""
    x, y = _inputs(5, 3)
    for impl in ("cpp", "triton", "reference"):
        assert torch.isnan(fastssl.siglip_loss(x, y, scale=torch.tensor(float("nan")), impl=impl))


# -- gather=True across processes (gloo) ------------------------------------------------------------------------




def _check_gather(rank, counts, impl, reduction):
    total, first, m = sum(counts), sum(counts[:rank]), counts[rank]
    mine = slice(first, first + m)
    x_all, y_all = _inputs(total, 6, seed=7)
    x_all = x_all * (1 + torch.arange(total, dtype=torch.float64)[:, None] % 3)  # rows on different scales
    w_whole = torch.linspace(0.5, 1.5, total, dtype=torch.float64) if reduction == "none" else 1.0
    w_mine = w_whole[mine] if reduction == "none" else 1.0

    def run(x, y, gather, weight):
        leaves = [x.clone().requires_grad_(), y.clone().requires_grad_()]
        s = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
        loss = fastssl.siglip_loss(*leaves, scale=s, bias=b, gather=gather, reduction=reduction, impl=impl)
        return loss.detach(), torch.autograd.grad((loss * weight).sum(), [*leaves, s, b])

    whole, (gx, gy, gs, gb) = run(x_all, y_all, False, w_whole)
    ours, (lx, ly, ls, lb) = run(x_all[mine], y_all[mine], True, w_mine)
    tag = f"rank {rank}/{len(counts)} {impl} {reduction}"
    assert_verbose_allclose(ours, whole[mine] if reduction == "none" else whole, rtol=1e-10, name=f"loss, {tag}")
    assert_verbose_allclose(lx, gx[mine], rtol=1e-9, atol=1e-12, name=f"grad image, {tag}")
    assert_verbose_allclose(ly, gy[mine], rtol=1e-9, atol=1e-12, name=f"grad text, {tag}")
    for mine_grad, whole_grad, name in ((ls, gs, "scale"), (lb, gb, "bias")):  # shares add up
        total_grad = mine_grad.clone()
        dist.all_reduce(total_grad)
        assert_verbose_allclose(total_grad, whole_grad, rtol=1e-9, atol=1e-12, name=f"grad {name}, {tag}")


def _check_open_clip_distributed(rank, world, dist_impl):
    """open_clip's SigLipLoss(rank, world_size) over gloo: each rank's loss is its images' rows over
    its batch size, so ours (the whole batch's) is their mean, and their per-rank backward gives
    every rank's features world × our gradients (their losses sum to world × ours)."""
    b = 3
    x_all, y_all = _inputs(world * b, 5, seed=11)
    mine = slice(rank * b, (rank + 1) * b)
    loss_fn = peer("open_clip.loss").SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl)
    theirs, (tx, ty, ts, tb) = _open_clip_grads(loss_fn, x_all[mine], y_all[mine], 8.0, -6.0)
    ours, (ox, oy, os_, ob) = _loss_and_grads(x_all[mine], y_all[mine], 8.0, -6.0, gather=True, impl="cpp")
    mean = theirs.detach().clone()
    dist.all_reduce(mean)
    tag = f"rank {rank}/{world} open_clip {dist_impl}"
    assert_verbose_allclose(ours, mean / world, rtol=1e-10, name=f"loss, {tag}")
    assert_verbose_allclose(world * ox, tx, rtol=1e-9, atol=1e-12, name=f"grad image, {tag}")
    assert_verbose_allclose(world * oy, ty, rtol=1e-9, atol=1e-12, name=f"grad text, {tag}")
    for o, t, name in ((os_, ts, "scale"), (ob, tb, "bias")):
        assert_verbose_allclose(world * o, t, rtol=1e-9, atol=1e-12, name=f"grad {name}, {tag}")


def _gather_worker(rank, world, port, counts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for reduction in ("mean", "sum", "none"):
            _check_gather(rank, counts, "cpp", reduction)
        _check_gather(rank, counts, "reference", "mean")
        if world == 2:  # the Triton kernels' positive offset, interpreted
            _check_gather(rank, counts, "triton", "none")
        if world == 2:  # open_clip's "shift" sends with P2P ops; at 4 ranks a rank aborted at exit once under load
            for dist_impl in ("gather", "shift"):
                _check_open_clip_distributed(rank, world, dist_impl)
        dist.barrier()  # every rank done before any tears the group down
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_gather_matches_single_process(world):
    """On every rank, loss and gradients equal one process on the concatenated batch (ranks with
    different row counts), and open_clip's distributed SigLipLoss gives the same numbers."""
    counts = [3, 5, 1, 4][:world]
    mp.spawn(_gather_worker, args=(world, free_port(), counts), nprocs=world)
