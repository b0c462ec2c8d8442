"""InfoNCE (MoCo, CLIP): fused kernels against the eager reference, a peer (pytorch-metric-learning),
known values, and gather=True across gloo processes for info_nce and nt_xent."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _assertions import assert_lowprec_close, assert_verbose_allclose
from _dist import free_port

import fastssl
from fastssl.ops.info_nce import info_nce_lse, info_nce_lse_op


def _inputs(m, d, k=0, dtype=torch.float32, device="cpu"):
    q = torch.randn(m, d, dtype=dtype, device=device)
    key = (q.float() + 0.7 * torch.randn(m, d, device=device)).to(dtype)  # correlated towers
    neg = torch.randn(k, d, dtype=dtype, device=device) if k else None
    return q, key, neg


def _loss_and_grads(q, key, neg=None, *, temperature=0.1, **kw):
    """Loss and the gradients of query, key, (negatives,) and a learnable temperature."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, key)]
    if neg is not None:
        leaves.append(neg.detach().clone().requires_grad_())
    tau_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    tau = torch.tensor(temperature, dtype=tau_dtype, device=q.device, requires_grad=True)
    loss = fastssl.info_nce(
        leaves[0], leaves[1], negatives=leaves[2] if neg is not None else None, temperature=tau, **kw
    )
    weight = torch.linspace(0.5, 1.5, loss.numel(), device=q.device).view_as(loss) if loss.dim() else 1.0
    grads = torch.autograd.grad((loss * weight).sum(), [*leaves, tau])
    # compared as ∂L/∂(1/τ) = −τ²·∂L/∂τ, the logit scale the kernels see: the ∂L/∂τ of a saturated
    # softmax at τ = 0.01 is a difference of O(1/τ²) terms, so its fp32 rounding scales by 1/τ²
    return loss, (*grads[:-1], -grads[-1] * temperature**2)


def _check_against_reference(impl, q, key, neg=None, atol=1e-5, rtol=1e-5, **kw):
    """fp32/fp64: close to the reference in the same dtype; fp16/bf16: flash-attention's check."""
    loss, grads = _loss_and_grads(q, key, neg, impl=impl, **kw)
    assert loss.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    names = (
        ["loss", "grad query", "grad key"] + (["grad negatives"] if neg is not None else []) + ["grad 1/temperature"]
    )
    if q.dtype in (torch.float32, torch.float64):
        ref_loss, ref_grads = _loss_and_grads(q, key, neg, impl="reference", **kw)
        for a, b, name in zip((loss, *grads), (ref_loss, *ref_grads), names, strict=True):
            assert_verbose_allclose(a, b, rtol=rtol, atol=atol, name=name)
        return
    up = None if neg is None else neg.float()
    ref32 = _loss_and_grads(q.float(), key.float(), up, impl="reference", **kw)
    lowp = _loss_and_grads(q, key, neg, impl="reference", **kw)
    for a, r, lp, name in zip((loss, *grads), (ref32[0], *ref32[1]), (lowp[0], *lowp[1]), names, strict=True):
        assert_lowprec_close(a.float(), r, lp.float(), atol=1e-3, name=name)


# -- against the reference: C++ kernel -----------------------------------------------------------------------


@pytest.mark.parametrize("m, d", [(1, 1), (3, 3), (37, 64), (300, 300), (600, 20)])
@pytest.mark.parametrize("n_neg", [0, 5])
@pytest.mark.parametrize("symmetric", [False, True])
def test_cpp_shapes(m, d, n_neg, symmetric):
    q, key, neg = _inputs(m, d, n_neg)
    _check_against_reference("cpp", q, key, neg, symmetric=symmetric, temperature=0.2)


@pytest.mark.parametrize("temperature", [0.01, 0.07, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_cpp_temperature_dtype(temperature, dtype, symmetric):
    q, key, neg = _inputs(37, 64, 11, dtype)
    _check_against_reference("cpp", q, key, neg, symmetric=symmetric, temperature=temperature, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_cpp_reductions(reduction, symmetric):
    q, key, neg = _inputs(300, 48, 40)
    _check_against_reference("cpp", q, key, neg, reduction=reduction, symmetric=symmetric, temperature=0.3)


def test_cpp_tiles_and_threads():
    """Several row stripes and column tiles (256), a long queue, and the 1-thread path agree."""
    q, key, neg = _inputs(520, 20, 700)
    _check_against_reference("cpp", q, key, neg, symmetric=True, temperature=0.1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _check_against_reference("cpp", q, key, neg, symmetric=True, temperature=0.1)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_non_contiguous(impl):
    base = torch.randn(30, 3, 40)
    q, key, neg = base[:, 0, ::2], base[:, 1, 1::2], base[:7, 2, ::2]  # strided in both dims
    assert not q.is_contiguous()
    _check_against_reference(impl, q, key, neg, symmetric=True, temperature=0.3)
    _check_against_reference(impl, q.t().contiguous().t(), key, neg, temperature=0.3)  # column-major


# -- against the reference: Triton kernel (interpreter on CPU) ---------------------------------------------


@pytest.mark.parametrize("m, d, n_neg", [(1, 3, 0), (37, 64, 5), (20, 150, 30)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("temperature", [0.01, 0.5])
def test_triton_shapes(m, d, n_neg, symmetric, temperature):
    q, key, neg = _inputs(m, d, n_neg)
    _check_against_reference("triton", q, key, neg, symmetric=symmetric, temperature=temperature, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_triton_dtype(dtype, symmetric):
    q, key, neg = _inputs(20, 40, 9, dtype)
    _check_against_reference("triton", q, key, neg, symmetric=symmetric, temperature=0.07, atol=1e-4, rtol=1e-4)


def test_triton_many_tiles(monkeypatch):
    """Blocks shrunk to 16 rows: many row blocks and column runs, with the self-pair mask of gather."""
    from fastssl.kernels import info_nce as kernels

    monkeypatch.setattr(kernels, "_CONFIGS", {key: ((16, 16, 4, 1), (16, 16, 4, 1)) for key in kernels._CONFIGS})
    q, key, neg = _inputs(50, 24, 21)
    _check_against_reference("triton", q, key, neg, symmetric=True, temperature=0.2, atol=1e-4, rtol=1e-4)
    z = F.normalize(torch.randn(70, 24, dtype=torch.float64), dim=1)
    for inv_tau in (5.0, 60.0):  # fixed shift, and the per-row shift
        for with_cols in (False, True):
            inv_tau_t = torch.tensor(inv_tau, dtype=torch.float64)
            ours = info_nce_lse(z[20:50], z, inv_tau_t, with_cols, 20, "triton")
            ref = info_nce_lse(z[20:50], z, inv_tau_t, with_cols, 20, "cpp")
            for a, b in zip(ours, ref, strict=True):
                assert_verbose_allclose(a, b, rtol=1e-12, atol=1e-12, name="lse")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 37, 1000, 4100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.01, 0.1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_triton_gpu(m, dtype, temperature, symmetric):
    q, key, neg = _inputs(m, 128, 300, dtype, device="cuda")
    _check_against_reference("auto", q, key, neg, symmetric=symmetric, temperature=temperature, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_matches_inf_cl_gpu():
    from inf_cl import cal_inf_loss

    q, key, _ = _inputs(2048, 128, device="cuda")
    q, key = F.normalize(q, dim=1).requires_grad_(), F.normalize(key, dim=1).requires_grad_()
    scale = torch.tensor(1 / 0.07, device="cuda", requires_grad=True)
    # Inf-CL's own scale= goes through a gather whose backward calls dist.all_reduce, which needs a
    # process group: the scale enters through the queries instead (its gradient is the same)
    theirs = cal_inf_loss(scale * q, key, head_dim=128)
    their_grads = torch.autograd.grad(theirs, (q, key, scale))
    ours = fastssl.info_nce(q, key, temperature=1 / scale)
    our_grads = torch.autograd.grad(ours, (q, key, scale))
    assert_verbose_allclose(ours, theirs, rtol=1e-4, atol=1e-4, name="loss")
    for a, b in zip(our_grads, their_grads, strict=True):
        assert_verbose_allclose(a, b, rtol=1e-3, atol=1e-5, name="grad")


# -- known values and a peer -------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "cpp", "triton"])
def test_known_values(impl):
    m, tau = 4, 0.5
    e = torch.eye(m)
    # q = k = orthonormal rows: s_ii = 1/τ, every other logit 0, and both directions alike
    expected = math.log(math.exp(1 / tau) + m - 1) - 1 / tau
    for symmetric in (False, True):
        got = fastssl.info_nce(e, e.clone(), temperature=tau, symmetric=symmetric, impl=impl)
        assert got.item() == pytest.approx(expected, rel=1e-6)
    # a queue of K copies of −q_i's neighbours adds K·exp(−1/τ)... here: K rows orthogonal to all
    neg = torch.cat([torch.zeros(3, m), torch.ones(3, 1)], 1)
    got = fastssl.info_nce(F.pad(e, (0, 1)), F.pad(e, (0, 1)), negatives=neg, temperature=tau, impl=impl)
    assert got.item() == pytest.approx(math.log(math.exp(1 / tau) + m - 1 + 3) - 1 / tau, rel=1e-6)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_symmetric_is_mean_of_both_directions(impl):
    q, key, _ = _inputs(23, 16)
    both = fastssl.info_nce(q, key, symmetric=True, reduction="none", impl=impl)
    one = fastssl.info_nce(q, key, reduction="none", impl=impl)
    other = fastssl.info_nce(key, q, reduction="none", impl=impl)
    assert_verbose_allclose(both, (one + other) / 2, name="symmetric rows")


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_matches_pytorch_metric_learning(impl):
    """MoCo's loss is pytorch-metric-learning's NTXentLoss of queries against reference keys."""
    from pytorch_metric_learning.losses import NTXentLoss

    m, k = 24, 10
    q, key, neg = _inputs(m, 32, k)
    ours = fastssl.info_nce(q, key, negatives=neg, temperature=0.1, impl=impl)
    theirs = NTXentLoss(temperature=0.1)(
        q, torch.arange(m), ref_emb=torch.cat([key, neg]), ref_labels=torch.arange(m + k)
    )
    assert_verbose_allclose(ours, theirs, rtol=1e-5, atol=1e-5, name="NTXentLoss")


# -- numerics ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_small_temperature_is_exact(impl):
    """τ = 0.01 with every key nearly opposite every query: each exp(s − 1/τ) ≈ exp(−200) of a fixed
    shift would underflow in fp32, leaving log 0 for every row and column."""
    q = torch.randn(1, 16) * torch.linspace(1, 2, 8)[:, None]
    key = -q + 1e-3 * torch.randn(8, 16)
    assert (F.normalize(q, dim=1) @ F.normalize(key, dim=1).T).max() < -0.99
    _check_against_reference(impl, q, key, symmetric=True, temperature=0.01, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_gradcheck_fp64(impl):
    q = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    key = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    neg = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    for tau, symmetric in ((0.5, False), (0.02, True)):  # fixed shift, and the per-row shift
        t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)

        def fn(a, b, c, t, symmetric=symmetric):
            return fastssl.info_nce(a, b, negatives=c, temperature=t, symmetric=symmetric, reduction="none", impl=impl)

        assert torch.autograd.gradcheck(fn, (q, key, neg, t))


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_opcheck(impl):
    q, key = F.normalize(torch.randn(9, 5), dim=1), F.normalize(torch.randn(12, 5), dim=1)
    for inv_tau in (2.0, 100.0):
        for with_cols, self_offset in ((False, -1), (True, -1), (True, 2)):
            q_, k_ = q.clone().requires_grad_(), key.clone().requires_grad_()
            for tau_args in ((torch.tensor(inv_tau, requires_grad=True), 0.0), (None, inv_tau)):
                torch.library.opcheck(info_nce_lse_op, (q_, k_, *tau_args, with_cols, self_offset, impl))


def test_torch_compile_fullgraph():
    def step(q, key, neg):
        return fastssl.info_nce(q, key, negatives=neg, symmetric=True, temperature=0.2) * 2

    q, key, neg = _inputs(33, 16, 7)
    q.requires_grad_()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    out = compiled(q, key, neg)
    (g,) = torch.autograd.grad(out, q)
    (ref_g,) = torch.autograd.grad(step(q, key, neg), q)
    assert_verbose_allclose(out, step(q, key, neg), name="compiled loss")
    assert_verbose_allclose(g, ref_g, name="compiled grad")


def test_convergence_matches_reference():
    """Two small towers and CLIP's learnable temperature, trained with the fused loss and with the
    reference, end in the same place."""
    torch.manual_seed(1)
    x = torch.randn(48, 10)
    finals = {}
    for impl in ("cpp", "reference"):
        torch.manual_seed(2)
        towers = torch.nn.ModuleList([torch.nn.Linear(10, 16), torch.nn.Linear(10, 16)]).double()
        loss_fn = fastssl.InfoNCELoss(temperature=0.2, learnable_temperature=True, symmetric=True, impl=impl).double()
        opt = torch.optim.SGD([*towers.parameters(), *loss_fn.parameters()], lr=0.5)
        gen = torch.Generator().manual_seed(3)
        losses = []
        for _ in range(25):
            v1 = x + 0.1 * torch.randn(x.shape, generator=gen)
            v2 = x + 0.1 * torch.randn(x.shape, generator=gen)
            loss = loss_fn(towers[0](v1.double()), towers[1](v2.double()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        params = torch.cat([p.detach().flatten() for p in [*towers.parameters(), *loss_fn.parameters()]])
        finals[impl] = (torch.tensor(losses), params)
    assert finals["cpp"][0][-1] < finals["cpp"][0][0] - 0.5  # it learned
    assert_verbose_allclose(finals["cpp"][0], finals["reference"][0], rtol=1e-9, atol=1e-9, name="losses")
    assert_verbose_allclose(finals["cpp"][1], finals["reference"][1], rtol=1e-8, atol=1e-9, name="params")


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_give_non_finite_loss(impl, bad):
    q, key, neg = _inputs(6, 4, 3)
    q[3, 1] = bad
    assert not torch.isfinite(fastssl.info_nce(q, key, negatives=neg, impl=impl))
    rows = fastssl.info_nce(q, key, negatives=neg, symmetric=True, impl=impl, reduction="none")
    assert not torch.isfinite(rows[3])


# -- module --------------------------------------------------------------------------------------------------


def test_module_matches_function():
    q, key, neg = _inputs(10, 6, 4)
    module = fastssl.InfoNCELoss(temperature=0.3, symmetric=True, reduction="sum")
    assert "temperature=0.3" in repr(module) and not list(module.parameters())
    expected = fastssl.info_nce(q, key, negatives=neg, temperature=0.3, symmetric=True, reduction="sum")
    assert module(q, key, neg).item() == pytest.approx(expected.item())


def test_module_learnable_temperature():
    module = fastssl.InfoNCELoss(temperature=0.07, learnable_temperature=True)
    assert module.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    q, key, _ = _inputs(12, 8)
    module(q, key).backward()
    t = torch.tensor(0.07, requires_grad=True)
    fastssl.info_nce(q, key, temperature=t).backward()
    # dL/dlogit_scale = dL/dτ · dτ/dlogit_scale = −τ·dL/dτ
    assert module.logit_scale.grad.item() == pytest.approx(-0.07 * t.grad.item(), rel=1e-5)


# -- bad input ------------------------------------------------------------------------------------------------

Q = torch.randn(4, 3)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((Q, torch.randn(5, 3)), {}, ValueError, "key"),
        ((Q, torch.randn(4, 2)), {}, ValueError, "key"),
        ((Q, Q.double()), {}, TypeError, "key"),
        ((Q, Q), {"negatives": torch.randn(6, 2)}, ValueError, "negatives"),
        ((Q, Q), {"negatives": torch.randn(6)}, ValueError, "negatives"),
        ((Q, Q), {"negatives": torch.randn(0, 3)}, ValueError, "negatives"),
        ((Q, Q), {"negatives": torch.randn(6, 3).double()}, TypeError, "negatives"),
        ((torch.randn(4), Q), {}, ValueError, "query"),
        ((torch.ones(4, 3, dtype=torch.int64), Q), {}, TypeError, "query"),
        (([[1.0, 2.0]], Q), {}, TypeError, "query"),
        ((Q, Q), {"temperature": 0.0}, ValueError, "temperature"),
        ((Q, Q), {"temperature": -1.0}, ValueError, "temperature"),
        ((Q, Q), {"temperature": torch.tensor(-0.1, requires_grad=True)}, ValueError, "temperature"),
        ((Q, Q), {"temperature": float("nan")}, ValueError, "temperature"),
        ((Q, Q), {"temperature": torch.ones(2)}, ValueError, "temperature"),
        ((Q, Q), {"temperature": "0.5"}, TypeError, "temperature"),
        ((Q, Q), {"symmetric": 1}, TypeError, "symmetric"),
        ((torch.randn(0, 3), torch.randn(0, 3)), {}, ValueError, "empty"),
        ((torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, "features"),
        ((Q, Q), {"reduction": "avg"}, ValueError, "reduction"),
        ((Q, Q), {"impl": "fast"}, ValueError, "impl"),
        ((Q, Q), {"gather": True}, RuntimeError, "process group"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastssl.info_nce(*args, **kwargs)


def test_nt_xent_gather_needs_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        fastssl.nt_xent(Q, Q, gather=True)


# -- gather=True across processes (gloo) ------------------------------------------------------------------------


def _rank_blocks(rows_per_rank, d, seed):
    """The whole batch, rank by rank, each rank's features on their own scale and offset."""
    gen = torch.Generator().manual_seed(seed)
    return [(1 + r) * torch.randn(n, d, generator=gen, dtype=torch.float64) + r for r, n in enumerate(rows_per_rank)]


def _value_and_grads(fn, tensors, weight):
    """fn's value on leaf copies of tensors, and the gradients of (value · weight).sum()."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad((out * weight).sum(), leaves, allow_unused=True, materialize_grads=True)


def _all_reduced(x):
    x = x.clone()
    dist.all_reduce(x)
    return x


def _weights(reduction, total, mine):
    """Row weights of the whole batch's objective and of this rank's (its rows' weights)."""
    if reduction != "none":
        return 1.0, 1.0
    w = torch.linspace(0.5, 1.5, total, dtype=torch.float64)
    return w, w[mine]


def _check_info_nce(rank, counts, impl, symmetric, with_negatives, reduction):
    total, first, m = sum(counts), sum(counts[:rank]), counts[rank]
    mine = slice(first, first + m)
    q_all, k_all = (torch.cat(_rank_blocks(counts, 6, seed)) for seed in (1, 2))
    neg = torch.randn(5, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tau = torch.tensor(0.3, dtype=torch.float64)

    def loss(gather):
        return lambda q, k, n, t: fastssl.info_nce(
            q, k, negatives=n if with_negatives else None, temperature=t, symmetric=symmetric, reduction=reduction,
            gather=gather, impl=impl,
        )  # fmt: skip

    w_whole, w_mine = _weights(reduction, total, mine)
    whole, (gq, gk, gn, gt) = _value_and_grads(loss(False), (q_all, k_all, neg, tau), w_whole)
    ours, (lq, lk, ln, lt) = _value_and_grads(loss(True), (q_all[mine], k_all[mine], neg, tau), w_mine)
    tag = f"rank {rank}/{len(counts)} {impl} symmetric={symmetric} negatives={with_negatives} {reduction}"
    assert_verbose_allclose(
        ours, whole[mine] if reduction == "none" else whole, rtol=1e-10, atol=1e-12, name=f"loss, {tag}"
    )
    assert_verbose_allclose(lq, gq[mine], rtol=1e-9, atol=1e-12, name=f"grad query, {tag}")
    assert_verbose_allclose(lk, gk[mine], rtol=1e-9, atol=1e-12, name=f"grad key, {tag}")
    # tensors every rank holds (temperature, queue): each rank's gradient is its share
    assert_verbose_allclose(_all_reduced(lt), gt, rtol=1e-9, atol=1e-12, name=f"grad temperature, {tag}")
    if with_negatives:
        assert_verbose_allclose(_all_reduced(ln), gn, rtol=1e-9, atol=1e-12, name=f"grad negatives, {tag}")
    if reduction != "none":
        assert_verbose_allclose(_all_reduced(ours), len(counts) * whole, name=f"same loss on every rank, {tag}")


def _check_nt_xent(rank, counts, impl, mode, reduction):
    """mode: "views" (z1, z2), "views+labels" (SupCon over both views), "labels" (z1 and labels only)."""
    total, first, m = sum(counts), sum(counts[:rank]), counts[rank]
    mine = slice(first, first + m)
    z1_all, z2_all = (torch.cat(_rank_blocks(counts, 5, seed)) for seed in (4, 5))
    y_all = torch.randint(0, 4, (total,), generator=torch.Generator().manual_seed(6))

    def loss(labels, gather):
        def fn(z1, z2=None):
            return fastssl.nt_xent(
                z1, z2, labels=labels, temperature=0.4, reduction=reduction, gather=gather, impl=impl
            )  # fmt: skip

        return fn

    tag = f"rank {rank}/{len(counts)} nt_xent {impl} {mode} {reduction}"
    if mode == "labels":
        w_whole, w_mine = _weights(reduction, total, mine)
        whole, (g1,) = _value_and_grads(loss(y_all, False), (z1_all,), w_whole)
        ours, (l1,) = _value_and_grads(loss(y_all[mine], True), (z1_all[mine],), w_mine)
        whole_rows, grads, our_grads = whole[mine] if reduction == "none" else whole, [g1[mine]], [l1]
    else:
        labels = None if mode == "views" else y_all
        # rows: the whole batch's are [z1; z2], this rank's are [z1 of its samples; z2 of its samples]
        rows = torch.cat([torch.arange(total)[mine], total + torch.arange(total)[mine]])
        w_whole, w_mine = _weights(reduction, 2 * total, rows)
        whole, (g1, g2) = _value_and_grads(loss(labels, False), (z1_all, z2_all), w_whole)
        mine_labels = None if labels is None else labels[mine]
        ours, (l1, l2) = _value_and_grads(loss(mine_labels, True), (z1_all[mine], z2_all[mine]), w_mine)
        whole_rows, grads, our_grads = whole[rows] if reduction == "none" else whole, [g1[mine], g2[mine]], [l1, l2]
    assert_verbose_allclose(ours, whole_rows, rtol=1e-10, atol=1e-12, name=f"loss, {tag}")
    for a, b in zip(our_grads, grads, strict=True):
        assert_verbose_allclose(a, b, rtol=1e-9, atol=1e-12, name=f"grad, {tag}")


def _gather_worker(rank, world, port, counts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for symmetric in (False, True):
            for with_negatives in (False, True):
                for reduction in ("mean", "none"):
                    _check_info_nce(rank, counts, "cpp", symmetric, with_negatives, reduction)
        _check_info_nce(rank, counts, "cpp", True, True, "sum")
        _check_info_nce(rank, counts, "reference", True, True, "mean")
        for mode in ("views", "views+labels", "labels"):
            for reduction in ("mean", "none"):
                _check_nt_xent(rank, counts, "cpp", mode, reduction)
        _check_nt_xent(rank, counts, "reference", "views+labels", "mean")
        if world == 2:  # the Triton kernels' self-pair mask, interpreted
            _check_nt_xent(rank, counts, "triton", "views", "none")
            _check_info_nce(rank, counts, "triton", True, True, "mean")
        # every rank done before any tears the group down (gloo aborts a peer whose
        # connection closes under it: "terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_gather_matches_single_process(world):
    """On every rank, loss and gradients equal those of one process on the concatenated batch
    (ranks with different row counts, and features on different scales)."""
    counts = [3, 5, 1, 4][:world]
    mp.spawn(_gather_worker, args=(world, free_port(), counts), nprocs=world)


# -- the temperature never makes the host wait (issue 12, item 7) -----------------------------------------------


def _recording(monkeypatch, name):
    """Records the 1/τ argument the Triton launcher `name` of kernels/info_nce.py receives."""
    from fastssl.kernels import info_nce as kernels

    seen, launch = [], getattr(kernels, name)

    def record(*args):
        seen.append(args[2] if name == "info_nce_lse_fwd" else args[6])
        return launch(*args)

    monkeypatch.setattr(kernels, name, record)
    return seen


def test_float_temperature_puts_nothing_on_the_device(monkeypatch):
    """A float τ reaches the kernels as a Python float (no 1/τ tensor is made), forward and backward."""
    seen = _recording(monkeypatch, "info_nce_lse_fwd")
    seen_bwd = _recording(monkeypatch, "info_nce_lse_bwd")
    q, key, neg = _inputs(9, 8, 5)
    q.requires_grad_()
    fastssl.info_nce(q, key, negatives=neg, temperature=0.3, symmetric=True, impl="triton").backward()
    assert len(seen) == len(seen_bwd) == 1 and type(seen[0]) is float and type(seen_bwd[0]) is float


@pytest.mark.parametrize("temperature", [0.3, 0.02])  # the kernels' fixed shift for a float τ, and the row shift
def test_float_and_tensor_temperature_agree(monkeypatch, temperature):
    """A tensor τ reaches the Triton kernels as a device tensor (read there, never with .item()) and
    takes the row shift; a float τ takes the fixed shift where it is exact: the same loss and gradients."""
    seen = _recording(monkeypatch, "info_nce_lse_fwd")
    q, key, neg = _inputs(21, 8, 5, torch.float64)
    results = []
    for tau in (temperature, torch.tensor(temperature, dtype=torch.float64, requires_grad=True)):
        leaves = [x.clone().requires_grad_() for x in (q, key)]
        loss = fastssl.info_nce(*leaves, negatives=neg, temperature=tau, symmetric=True, impl="triton")
        results.append((loss, *torch.autograd.grad(loss, leaves)))
    assert [type(x) for x in seen] == [float, torch.Tensor]
    for a, b in zip(*results, strict=True):
        assert_verbose_allclose(a, b, rtol=1e-10, atol=1e-12, name="float vs tensor τ")


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_compiled_learnable_temperature_equals_eager(impl):
    """torch.compile(fullgraph=True) of a training step with InfoNCELoss(learnable_temperature=True) and
    of info_nce with a tensor τ: no graph break (nothing reads τ on the host), same loss and gradients."""
    q, key, _ = _inputs(17, 8)
    module = fastssl.InfoNCELoss(temperature=0.1, learnable_temperature=True, symmetric=True, impl=impl)
    tau = torch.tensor(0.2, requires_grad=True)

    def step(q):
        return module(q, key) + fastssl.info_nce(q, key, temperature=tau, impl=impl)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaf = q.clone().requires_grad_()
        loss = fn(leaf)
        results.append((loss, *torch.autograd.grad(loss, (leaf, module.logit_scale, tau))))
    for a, b in zip(*results, strict=True):
        assert_verbose_allclose(a, b, rtol=1e-5, atol=1e-6, name="compiled vs eager")
