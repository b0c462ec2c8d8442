"""MoCHi and MemoryQueue: the kernels against the materialising reference (same draws), MoCo's
InfoNCE as a known special case, the draws themselves, and the queue (wrap-around, state_dict,
all-gather over gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _assertions import assert_lowprec_close, assert_training_matches_reference, assert_verbose_allclose

import fastssl
from fastssl import _checks
from fastssl._rows import inverse_norms, power_of_two_scales, row_scales
from fastssl.ops import mochi as ops


def _inputs(b, k, d, dtype=torch.float32, device="cpu"):
    q = torch.randn(b, d, device=device)
    key = (q + 0.5 * torch.randn(b, d, device=device)).to(dtype)  # correlated with its query
    queue = (torch.randn(k, d, device=device) * torch.rand(k, 1, device=device) * 3).to(dtype)  # any row norms
    return q.to(dtype), key, queue


def _recording_draw(n_mix, n_mix_query, seed=0, device="cpu"):
    """A draw (as mochi_loss builds it) that keeps what it drew, so a reference can replay it."""
    gen = torch.Generator(device=device).manual_seed(seed)
    drawn = []

    def draw(b, n_hard):
        drawn.append(ops.draw_negatives(b, n_hard, n_mix=n_mix, n_mix_query=n_mix_query, generator=gen, device=device))
        return drawn[-1]

    return draw, drawn


def _outputs(which, impl, q, k, queue, n_hard, draw, temperature):
    """Logits or per-query losses of one impl, and the gradients of q and k under a weighted sum."""
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    fn = ops._logits if which == "logits" else ops._loss_rows
    out = fn(q, k, queue, n_hard, draw, 1.0 / temperature, impl)
    weight = torch.linspace(0.5, 1.5, out.numel(), device=out.device).view_as(out)
    return out, torch.autograd.grad((out * weight).sum(), (q, k))


def _check_against_reference(impl, b, k, d, n_hard, n_mix, n_mix_query, dtype=torch.float32, device="cpu",
                             temperature=0.2, atol=2e-5, rtol=1e-5, inputs=None):  # fmt: skip
    """Logits, per-query losses and both gradients against the reference, given the same draws."""
    q, key, queue = inputs or _inputs(b, k, d, dtype, device)
    for which in ("logits", "loss"):
        draw, drawn = _recording_draw(n_mix, n_mix_query, device=device)
        out, grads = _outputs(which, impl, q, key, queue, n_hard, draw, temperature)
        replay = lambda b, n, drawn=drawn: drawn[0]
        if dtype in (torch.float32, torch.float64):
            ref, ref_grads = _outputs(which, "reference", q, key, queue, n_hard, replay, temperature)
            assert_verbose_allclose(out, ref, rtol=rtol, atol=atol, name=which)
            # gradients sum K + S terms (9000 in one case): fp32 rounding grows with them
            for g, rg, name in zip(grads, ref_grads, ("grad q", "grad k"), strict=True):
                assert_verbose_allclose(g, rg, rtol=max(rtol, 1e-4), atol=atol, name=f"{which} {name}")
            continue
        # low precision: flash-attention's error-relative check against the fp32 reference
        ref32 = _outputs(which, "reference", q.float(), key.float(), queue.float(), n_hard, replay, temperature)
        lowp = _outputs(which, "reference", q, key, queue, n_hard, replay, temperature)
        assert out.dtype == torch.float32
        assert_lowprec_close(out, ref32[0], lowp[0], atol=atol, name=which)
        for g, r, lp in zip(grads, ref32[1], lowp[1], strict=True):
            assert_lowprec_close(g.float(), r, lp.float(), atol=atol, name=f"{which} grad")


# -- against the reference, same draws: C++ kernel -----------------------------------------------------------


@pytest.mark.parametrize(
    "b, k, d, n_hard, n_mix, n_mix_query",
    [
        (1, 2, 1, 2, 3, 1),
        (3, 37, 5, 7, 11, 4),
        (37, 423, 64, 31, 50, 9),
        (5, 100, 130, 100, 17, 0),
        (4, 61, 17, 61, 0, 13),  # the hard set is the whole queue
        (6, 29, 3, 1000, 8, 2),  # n_hard > K: capped at K
        (2, 9000, 8, 5, 6, 3),  # K past one chunk of rows (2M scores per chunk)
    ],
)
def test_cpp_against_reference(b, k, d, n_hard, n_mix, n_mix_query):
    _check_against_reference("cpp", b, k, d, n_hard, n_mix, n_mix_query)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_low_precision(dtype):
    _check_against_reference("cpp", 13, 211, 48, 23, 40, 7, dtype=dtype, atol=2e-2)


def test_cpp_fused_queue_rows():
    """The C++ loss takes each row of the queue products through scale, hard set, exp and weights in
    one pass (csrc/cpu/mochi.cpp, mochi_queue_rows_cpu): against the reference past the sampled
    selection's size (K > 16384) and below τ = 0.025, where the fixed shift ‖q̂‖/τ would underflow
    and the row's max is found first."""
    _check_against_reference("cpp", 3, 20000, 8, 50, 20, 4)
    _check_against_reference("cpp", 5, 300, 16, 20, 10, 3, temperature=0.01)


def test_cpp_fp64_tight():
    _check_against_reference("cpp", 9, 77, 33, 12, 20, 6, dtype=torch.float64, atol=1e-12, rtol=1e-12)


def test_cpp_threads():
    """The 1-thread path gives the same numbers."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _check_against_reference("cpp", 7, 50, 20, 9, 12, 3)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_non_contiguous(impl):
    base = torch.randn(5, 2, 24)
    q, key = base[:, 0, ::2], base[:, 1, 1::2]
    queue = torch.randn(12, 40)[:, 3:15]  # rows strided
    assert not q.is_contiguous() and not queue.is_contiguous()
    _check_against_reference(impl, 0, 0, 0, 6, 9, 4, inputs=(q, key, queue))
    _check_against_reference(impl, 0, 0, 0, 6, 9, 4, inputs=(q, key, queue.t().contiguous().t()))


# -- against the reference, same draws: Triton kernel (interpreter on CPU) -------------------------------------


@pytest.mark.parametrize(
    "b, k, d, n_hard, n_mix, n_mix_query",
    [
        (1, 2, 1, 2, 3, 1),
        (1, 40, 5, 9, 40, 9),  # S = 49 > BLOCK_S: two forward blocks, the backward split in parts
        (3, 23, 130, 7, 5, 2),  # D > BLOCK_D: two chunks of features
        (2, 15, 6, 4, 0, 3),
    ],
)
def test_triton_against_reference(b, k, d, n_hard, n_mix, n_mix_query):
    _check_against_reference("triton", b, k, d, n_hard, n_mix, n_mix_query)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_triton_dtypes(dtype):
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-12
    _check_against_reference("triton", 3, 31, 20, 8, 10, 3, dtype=dtype, atol=atol, rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, k, d", [(7, 1000, 64), (256, 65536, 128)])
def test_triton_gpu(dtype, b, k, d):
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    _check_against_reference("auto", b, k, d, 1024, 1024, 128, dtype=dtype, device="cuda", atol=atol, rtol=1e-4)


_COMPILE_FOR_H100 = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastssl.kernels import mochi as K

assert isinstance(K._mochi_mix_fwd_kernel, triton.runtime.JITFunction)  # not the interpreter's stand-in
for rows, acc, acc_name in (("fp32", tl.float32, "fp32"), ("bf16", tl.float32, "fp32"), ("fp64", tl.float64, "fp64")):
    for kernel, consts in (
        (K._mochi_mix_fwd_kernel, dict(ACC=acc, EPS=K._EPS, BLOCK_S=K._BLOCK_S, BLOCK_D=128)),
        (K._mochi_mix_bwd_kernel, dict(ACC=acc, BLOCK_S=K._BLOCK_S, BLOCK_D=128)),
    ):
        kinds = {"First_ptr": "*i64", "Second_ptr": "*i64", "W_ptr": "*fp32"}
        kinds.update(dict.fromkeys(("Q_ptr", "QBar_ptr", "Queue_ptr"), "*" + rows))
        signature = {
            name: "constexpr" if name in consts else kinds.get(name, "*" + acc_name if name.endswith("_ptr") else "i32")
            for name in kernel.arg_names
        }
        triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32))
print("compiled")
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_h100():
    """Without a GPU: the kernels lower to PTX and a cubin for sm_90 (fp32, bf16, fp64 rows)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    cmd = [sys.executable, "-c", _COMPILE_FOR_H100]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# -- known values: MoCo's InfoNCE ------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "cpp", "triton"])
def test_no_mixing_is_moco(impl):
    """n_mix = n_mix_query = 0: MoCo's logits [q̂·k̂, q̂·Q̂ᵀ]/τ and its cross-entropy, written out here."""
    q, key, queue = _inputs(9, 70, 16)
    tau = 0.07
    qn, kn, queue_n = (F.normalize(x, dim=1) for x in (q, key, queue))
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ queue_n.T], dim=1) / tau
    target = torch.zeros(9, dtype=torch.long)
    kw = dict(n_mix=0, n_mix_query=0, temperature=tau, impl=impl)
    assert_verbose_allclose(fastssl.mochi_logits(q, key, queue, **kw), logits, atol=1e-4, name="logits")
    for reduction in ("mean", "sum", "none"):
        expected = F.cross_entropy(logits, target, reduction=reduction)
        got = fastssl.mochi_loss(q, key, queue, reduction=reduction, **kw)
        assert_verbose_allclose(got, expected, rtol=1e-5, atol=1e-5, name=f"loss {reduction}")
    # and the gradients of the plain formula
    q1, k1 = q.clone().requires_grad_(), key.clone().requires_grad_()
    q2, k2 = q.clone().requires_grad_(), key.clone().requires_grad_()
    grads = torch.autograd.grad(fastssl.mochi_loss(q1, k1, queue, **kw), (q1, k1))
    qn2, kn2 = F.normalize(q2, dim=1), F.normalize(k2, dim=1)
    plain = torch.cat([(qn2 * kn2).sum(1, keepdim=True), qn2 @ queue_n.T], dim=1) / tau
    ref_grads = torch.autograd.grad(F.cross_entropy(plain, target), (q2, k2))
    for g, rg in zip(grads, ref_grads, strict=True):
        assert_verbose_allclose(g, rg, rtol=1e-5, atol=1e-6, name="grad")


def test_known_mixed_logit():
    """Two orthogonal queue rows mixed half and half: h = (e0 + e1)/√2, so a query along e0 scores 1/√2."""
    queue = torch.eye(3)[:2] * torch.tensor([[2.0], [5.0]])  # row norms do not matter
    q = torch.tensor([[1.0, 0.0, 0.0]])
    first, second, weight = torch.tensor([[0]]), torch.tensor([[1]]), torch.tensor([[0.5]])
    for impl in ("cpp", "triton"):
        logits, coef = ops.mochi_mix(q, q, queue, first, second, weight, power_of_two_scales(queue), impl)
        assert logits.item() == pytest.approx(2**-0.5, rel=1e-6)
        # h = k_a a + k_n n with a, n the raw rows
        assert coef[0, 0].tolist() == pytest.approx([0.5 / 2 * 2**0.5, 0.5 / 5 * 2**0.5], rel=1e-6)


# -- the draws ----------------------------------------------------------------------------------------------------


def _draws(q, queue, n_hard, n_mix, n_mix_query, seed=0):
    """The C++ loss's draws, as queue rows through the hard sets (torch.topk's, in column order)."""
    draw, drawn = _recording_draw(n_mix, n_mix_query, seed)
    ops._loss_rows(q, q, queue, n_hard, draw, 5.0, "cpp")
    first, second, weight = drawn[0]
    hard = (F.normalize(q, dim=1) @ F.normalize(queue, dim=1).T).topk(n_hard, dim=1).indices.sort(1).values
    return (*ops.in_queue(hard, first, second), weight)


def test_pairs_distinct_and_in_own_hard_set():
    """Each query draws from its own top-n_hard (not query 0's), pairs are two distinct rows."""
    b, k, n_hard, n_mix, n_mix_query = 12, 300, 10, 200, 50
    q, _, queue = _inputs(b, k, 16)
    first, second, weight = _draws(q, queue, n_hard, n_mix, n_mix_query)
    sim = F.normalize(q, dim=1) @ F.normalize(queue, dim=1).T
    top = sim.topk(n_hard, dim=1).indices
    in_hard = lambda idx: (idx[:, :, None] == top[:, None, :]).any(2)
    pairs_a, pairs_n = first[:, :n_mix], second[:, :n_mix]
    assert (pairs_a != pairs_n).all()
    assert in_hard(pairs_a).all() and in_hard(pairs_n).all() and in_hard(second[:, n_mix:]).all()
    assert (first[:, n_mix:] == -1).all()
    alpha, beta = weight[:, :n_mix], weight[:, n_mix:]
    assert (alpha >= 0).all() and (alpha < 1).all() and alpha.std() > 0.25  # ~U(0, 1): std 0.29
    assert (beta >= 0).all() and (beta < 0.5).all() and beta.max() > 0.45
    # every query's draws cover its hard set (200 pairs over 10 rows), so none are borrowed from another's
    for row in range(b):
        assert set(pairs_a[row].tolist()) == set(top[row].tolist())


def test_two_hard_rows_give_both_orders():
    q, _, queue = _inputs(4, 30, 8)
    first, second, _ = _draws(q, queue, 2, 64, 0)
    for row in range(4):
        pairs = set(zip(first[row].tolist(), second[row].tolist(), strict=True))
        assert len(pairs) == 2 and {(b, a) for a, b in pairs} == pairs


@pytest.mark.parametrize("b, k, n", [(4, 50, 9), (2, 300, 300), (3, 20000, 100), (2, 70000, 1024), (2, 70000, 9000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_set_matches_topk(b, k, n, dtype):
    """The C++ selection (sampled threshold, then the n-th largest by key bits) gives torch.topk's set,
    in column order; -inf, +inf, -0 and NaN of either sign are ranked as torch.topk ranks them."""
    scores = torch.randn(b, k, dtype=dtype, generator=torch.Generator().manual_seed(k + n))
    scores[0, :4] = torch.tensor([float("inf"), float("-inf"), -0.0, -float("nan")], dtype=dtype)
    scores[-1, 5] = float("nan")
    got = ops.mochi_hard_set(scores, n, "cpp")
    assert torch.equal(got, scores.topk(n, dim=1).indices.sort(dim=1).values)
    assert torch.equal(got, ops.hard_negatives(scores, n, "triton"))  # every path: the same order


def test_hard_set_ties_take_the_lowest_columns():
    for k, n in [(40000, 5000), (70000, 1000)]:  # the whole row; a sampled threshold first
        scores = torch.zeros(2, k)
        scores[:, ::7] = 1.0  # the first n of these tied columns make the set
        scores[1, 3] = 2.0
        got = ops.mochi_hard_set(scores, n, "cpp")
        assert torch.equal(got[0], torch.arange(0, 7 * n, 7))
        assert torch.equal(got[1], torch.cat([torch.tensor([0, 3]), torch.arange(7, 7 * (n - 1), 7)]))


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_seed_reproduces_logits(impl):
    q, key, queue = _inputs(3, 40, 8)
    run = lambda seed: fastssl.mochi_logits(
        q, key, queue, n_hard=8, n_mix=10, n_mix_query=4, generator=torch.Generator().manual_seed(seed), impl=impl
    )
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_is_cross_entropy_of_logits(impl, reduction):
    """mochi_loss's LSE path (no [B, 1 + K + S] logits) equals the cross-entropy of mochi_logits, same seed."""
    q, key, queue = _inputs(17, 9001, 12)  # K past one chunk of rows
    kw = dict(n_hard=20, n_mix=30, n_mix_query=6, temperature=0.1, impl=impl)
    logits = fastssl.mochi_logits(q, key, queue, generator=torch.Generator().manual_seed(5), **kw)
    expected = F.cross_entropy(logits, torch.zeros(17, dtype=torch.long), reduction=reduction)
    got = fastssl.mochi_loss(q, key, queue, generator=torch.Generator().manual_seed(5), reduction=reduction, **kw)
    assert_verbose_allclose(got, expected, rtol=1e-5, atol=1e-5, name="loss")


# -- gradients and the op --------------------------------------------------------------------------------------------


def _mix_args(b=4, k=15, d=6, s=7, dtype=torch.float64):
    q = torch.randn(b, d, dtype=dtype)
    queue = torch.randn(k, d, dtype=dtype)
    first = torch.randint(-1, k, (b, s))
    second = torch.randint(0, k, (b, s))
    weight = torch.rand(b, s, dtype=dtype)
    return q, queue, first, second, weight


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_gradcheck_mix_fp64(impl):
    """The op's gradient wrt q, with the detached query q̄ and the queue held fixed (they are constants)."""
    q, queue, first, second, weight = _mix_args() if impl == "cpp" else _mix_args(b=2, k=6, d=3, s=3)
    q_bar = q.clone()
    fn = lambda x: ops.mochi_mix(x, q_bar, queue, first, second, weight, power_of_two_scales(queue), impl)[0]
    assert torch.autograd.gradcheck(fn, (q.requires_grad_(),))


def test_gradcheck_loss_fp64():
    """The whole loss with pair mixes only (their vectors depend on the queue alone)."""
    q, key, queue = _inputs(4, 25, 5, torch.float64)
    loss = lambda a, b: fastssl.mochi_loss(
        a, b, queue, n_hard=6, n_mix=9, n_mix_query=0, generator=torch.Generator().manual_seed(0), reduction="none"
    )
    assert torch.autograd.gradcheck(loss, (q.requires_grad_(), key.requires_grad_()))


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_opcheck(impl):
    q, queue, first, second, weight = _mix_args(dtype=torch.float32)
    torch.library.opcheck(ops.mochi_mix, (q, q, queue, first, second, weight, power_of_two_scales(queue), impl))
    torch.library.opcheck(
        ops.mochi_mix, (q.clone().requires_grad_(), q, queue, first, second, weight, power_of_two_scales(queue), impl)
    )


def test_opcheck_cpp_queue_ops():
    """The C++ queue passes as ops (torch.compile reaches them): registration, fake shapes, and the
    values against the eager formulas they replace."""
    g = torch.Generator().manual_seed(3)
    queue = torch.randn(70, 9, generator=g) * torch.logspace(-20, 20, 70)[:, None]
    queue[5] = 0
    torch.library.opcheck(row_scales, (queue,))
    scale, inverse = row_scales(queue)
    torch.testing.assert_close(scale, power_of_two_scales(queue), rtol=0, atol=0)
    torch.testing.assert_close(inverse, inverse_norms(queue), rtol=1e-6, atol=0)
    # the C++ loss's chunk pass: queue and synthetic logits' lse, and its gradient's weights, against
    # the eager formulas through autograd (mochi_mix for the synthetic logits); queue rows of every scale
    queue = queue.double()
    scale, inverse = row_scales(queue)
    qs = (F.normalize(torch.randn(4, 9, generator=g, dtype=torch.float64), dim=1) * 5).requires_grad_()
    q_bar = F.normalize(qs.detach(), dim=1)
    b, n, n_mix, n_query = 4, 6, 7, 3
    first, second, weight = ops.draw_negatives(
        b, n, n_mix=n_mix, n_mix_query=n_query, generator=g, device="cpu"
    )
    s = qs.detach() @ queue.T
    bound = qs.detach().norm(dim=1)
    args = (bound, inverse, n, qs.detach(), q_bar, queue, scale, first, second, weight.double(), "cpp")
    torch.library.opcheck(ops.mochi_queue_rows, (s.clone(), *args))
    # bf16: products and weights in the queue's dtype, lse and q_coef in fp32 (the fake's dtypes too)
    low = (queue.bfloat16(), scale.float(), first, second, weight)
    low_args = (bound.float(), inverse.float(), n, qs.detach().float(), q_bar.bfloat16(), *low, "cpp")
    torch.library.opcheck(ops.mochi_queue_rows, ((qs.detach().float() @ queue.T.float()).bfloat16(), *low_args))
    lse, q_coef = ops.mochi_queue_rows(s, *args)
    logits = qs @ (queue * inverse[:, None]).T
    hard = logits.detach().topk(n, dim=1).indices.sort(1).values
    mixed, _ = ops.mochi_mix(qs, q_bar, queue, *ops.in_queue(hard, first, second), weight.double(), scale, "cpp")
    want = torch.cat([logits, mixed], dim=1).logsumexp(1)
    torch.testing.assert_close(lse, want.detach(), rtol=1e-12, atol=1e-12)
    (want_grad,) = torch.autograd.grad(want.sum(), qs)
    torch.testing.assert_close(s @ queue + q_coef[:, None] * q_bar, want_grad, rtol=1e-10, atol=1e-12)
    # without synthetic negatives: the queue's lse and softmax·scale alone
    s = qs.detach() @ queue.T
    none = torch.empty(b, 0, dtype=torch.long)
    args = (bound, inverse, 0, qs.detach(), q_bar, queue, scale, none, none, none.double(), "cpp")
    lse, q_coef = ops.mochi_queue_rows(s, *args)
    torch.testing.assert_close(lse, logits.detach().logsumexp(1))
    torch.testing.assert_close(s, logits.detach().softmax(1) * inverse)
    assert not q_coef.any()


def test_no_double_backward():
    q, key, queue = _inputs(3, 20, 4)
    q.requires_grad_()
    loss = fastssl.mochi_loss(q, key, queue, n_hard=5, n_mix=4, n_mix_query=2)
    (g,) = torch.autograd.grad(loss, q, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_torch_compile_fullgraph():
    """The ops trace (custom ops with fake kernels, the autograd.Function); draws under compile use
    inductor's RNG, so only the unmixed loss is compared with eager."""

    def step(q, k, queue):
        moco = fastssl.mochi_loss(q, k, queue, n_mix=0, n_mix_query=0)
        return moco, fastssl.mochi_loss(q, k, queue, n_hard=10, n_mix=12, n_mix_query=3)

    q, key, queue = _inputs(9, 100, 16)
    q.requires_grad_()
    moco, mixed = torch.compile(step, fullgraph=True)(q, key, queue)
    grads = torch.autograd.grad(moco + mixed, q)
    assert_verbose_allclose(moco, fastssl.mochi_loss(q, key, queue, n_mix=0, n_mix_query=0), name="compiled loss")
    assert torch.isfinite(mixed) and mixed > moco and torch.isfinite(grads[0]).all()


def test_convergence_matches_reference():
    """A small encoder trained with the fused loss and with the reference ends in the same place."""
    queue = torch.randn(96, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def make_loss(impl):
        draws = torch.Generator().manual_seed(4)  # the same draws in both runs

        def loss(model, v1, v2):
            q, k = model(v1), model(v2).detach()
            return fastssl.mochi_loss(q, k, queue, n_hard=16, n_mix=24, n_mix_query=8, generator=draws, impl=impl)

        return loss

    assert_training_matches_reference(32, 15, make_loss)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("where", ["q", "queue"])
def test_non_finite_gives_non_finite_loss(impl, where):
    q, key, queue = _inputs(4, 20, 6)
    (q if where == "q" else queue)[1, 2] = float("nan")
    loss = fastssl.mochi_loss(q, key, queue, n_hard=5, n_mix=6, n_mix_query=2, impl=impl, reduction="none")
    assert not torch.isfinite(loss).all()


# -- MemoryQueue ------------------------------------------------------------------------------------------------------


def test_queue_wraps_around_in_insertion_order():
    queue = fastssl.MemoryQueue(5, 2, store_labels=True)
    assert len(queue) == 0 and queue.get().shape == (0, 2)
    rows = torch.arange(16.0).view(8, 2)
    queue.enqueue(rows[:3], torch.arange(3))
    assert len(queue) == 3 and torch.equal(queue.tensor, rows[:3]) and torch.equal(queue.labels, torch.arange(3))
    queue.enqueue(rows[3:7], torch.arange(3, 7))  # runs past the end: rows 3, 4 at the back, 5, 6 at the front
    assert len(queue) == 5
    assert torch.equal(queue.get(), rows[2:7]) and torch.equal(queue.labels, torch.arange(2, 7))
    queue.enqueue(rows[7:8], torch.tensor([7]))
    assert torch.equal(queue.get(), rows[3:8]) and torch.equal(queue.labels, torch.arange(3, 8))
    queue.enqueue(rows[:5], torch.arange(5))  # a whole queue at once
    assert torch.equal(queue.get(), rows[:5])


def test_queue_state_dict_round_trip():
    queue = fastssl.MemoryQueue(6, 3, store_labels=True)
    queue.enqueue(torch.randn(4, 3), torch.arange(4))
    queue.enqueue(torch.randn(4, 3), torch.arange(4, 8))
    other = fastssl.MemoryQueue(6, 3, store_labels=True)
    other.load_state_dict(queue.state_dict())
    assert len(other) == 6 and torch.equal(other.get(), queue.get()) and torch.equal(other.labels, queue.labels)
    x = torch.randn(2, 3)
    queue.enqueue(x, torch.tensor([8, 9]))
    other.enqueue(x, torch.tensor([8, 9]))  # the write position came along too
    assert torch.equal(other.get(), queue.get())
    moved = other.to(torch.float64)  # buffers follow .to()
    assert moved.get().dtype == torch.float64
    bad = queue.state_dict()
    bad["_extra_state"] = {"next": 9, "filled": 6}
    with pytest.raises(ValueError, match="inconsistent"):
        other.load_state_dict(bad)


def test_queue_as_loss_argument():
    q, key, queue_rows = _inputs(3, 10, 4)
    queue = fastssl.MemoryQueue(10, 4)
    queue.enqueue(queue_rows[:7])
    queue.enqueue(queue_rows[7:])
    kw = dict(n_hard=4, n_mix=5, n_mix_query=2)
    expected = fastssl.mochi_loss(q, key, queue_rows, generator=torch.Generator().manual_seed(0), **kw)
    assert fastssl.mochi_loss(q, key, queue, generator=torch.Generator().manual_seed(0), **kw).item() == expected.item()


def test_enqueue_before_backward_is_an_error_not_a_silent_change():
    queue = fastssl.MemoryQueue(64, 8)
    queue.enqueue(torch.randn(40, 8))
    q = torch.randn(4, 8, requires_grad=True)
    loss = fastssl.mochi_loss(q, torch.randn(4, 8), queue, n_hard=8, n_mix=5, n_mix_query=2)
    queue.enqueue(torch.randn(4, 8))  # the rows the backward needs change
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@pytest.mark.parametrize(
    "x, labels, error, match",
    [
        (torch.randn(2, 4), None, ValueError, "features"),
        (torch.randn(2, 3).double(), None, TypeError, "dtype"),
        (torch.randn(2, 3, device="meta"), None, ValueError, "meta"),
        (torch.randn(9, 3), None, ValueError, "size"),
        (torch.randn(0, 3), None, ValueError, "empty"),
        (torch.randn(2, 3), torch.arange(2), ValueError, "stores none"),
        ([[1.0, 2.0, 3.0]], None, TypeError, "x"),
    ],
)
def test_queue_bad_input(x, labels, error, match):
    with pytest.raises(error, match=match):
        fastssl.MemoryQueue(8, 3).enqueue(x, labels)


def test_queue_bad_construction_and_labels():
    with pytest.raises(ValueError, match="size"):
        fastssl.MemoryQueue(0, 3)
    with pytest.raises(TypeError, match="dtype"):
        fastssl.MemoryQueue(4, 3, dtype=torch.int64)
    labelled = fastssl.MemoryQueue(4, 3, store_labels=True)
    with pytest.raises(ValueError, match="pass labels"):
        labelled.enqueue(torch.randn(2, 3))
    with pytest.raises(ValueError, match="labels"):
        labelled.enqueue(torch.randn(2, 3), torch.arange(3))
    assert fastssl.MemoryQueue(4, 3).labels is None


def test_queue_gather_needs_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        fastssl.MemoryQueue(8, 3).enqueue(torch.randn(2, 3), gather=True)


def _gather_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        queue = fastssl.MemoryQueue(8, 3, store_labels=True)
        result = {}
        for step in range(2):  # 2 + 3 rows per step: the second step wraps around
            x = torch.full((rank + 2, 3), 10.0 * step + rank) + torch.arange(rank + 2.0)[:, None]
            queue.enqueue(x, torch.arange(rank + 2) + 100 * step + 10 * rank, gather=True)
        result["rows"], result["labels"] = queue.get(), queue.labels
        try:  # rank 1 passes a bad batch: every rank raises, none waits in the gather
            queue.enqueue(torch.randn(2, 3 if rank == 0 else 4), torch.arange(2), gather=True)
        except ValueError as exc:
            result["error"] = str(exc)
        torch.save(result, f"{out_dir}/{rank}.pt")
        # every rank done before any tears the group down (gloo aborts a peer whose
        # connection closes under it: "terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_queue_gather_over_gloo(tmp_path):
    ctx = mp.spawn(_gather_worker, args=(2, tmp_path / "init", tmp_path), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the distributed enqueue did not finish (a hang)")
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    expected = fastssl.MemoryQueue(8, 3, store_labels=True)
    for step in range(2):
        for rank in range(2):
            x = torch.full((rank + 2, 3), 10.0 * step + rank) + torch.arange(rank + 2.0)[:, None]
            expected.enqueue(x, torch.arange(rank + 2) + 100 * step + 10 * rank)
    for r in results:
        assert torch.equal(r["rows"], expected.get()) and torch.equal(r["labels"], expected.labels)
    assert "features" in results[1]["error"] and "rank 1 refused" in results[0]["error"]


# -- bad input --------------------------------------------------------------------------------------------------------

Q, K, QUEUE = torch.randn(4, 3), torch.randn(4, 3), torch.randn(20, 3)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((Q, torch.randn(5, 3), QUEUE), {}, ValueError, "k"),
        ((Q, K, torch.randn(20, 2)), {}, ValueError, "queue"),
        ((Q, K, QUEUE.double()), {}, TypeError, "queue"),
        ((Q, K, QUEUE.to("meta")), {}, ValueError, "queue"),
        ((Q, K, torch.randn(0, 3)), {}, ValueError, "queue"),
        ((Q, K, [[1.0, 2.0, 3.0]]), {}, TypeError, "queue"),
        ((torch.randn(4), K, QUEUE), {}, ValueError, "q"),
        ((Q.long(), K, QUEUE), {}, TypeError, "q"),
        ((Q, K, QUEUE), {"n_hard": 1}, ValueError, "n_hard"),
        ((Q, K, QUEUE[:1]), {"n_hard": 5}, ValueError, "queue's length"),
        ((Q, K, QUEUE), {"n_hard": 0, "n_mix": 0, "n_mix_query": 0}, ValueError, "n_hard"),
        ((Q, K, QUEUE), {"n_mix": -1}, ValueError, "n_mix"),
        ((Q, K, QUEUE), {"n_mix_query": 2.0}, TypeError, "n_mix_query"),
        ((Q, K, QUEUE), {"n_hard": True}, TypeError, "n_hard"),
        ((Q, K, QUEUE), {"temperature": 0.0}, ValueError, "temperature"),
        ((Q, K, QUEUE), {"temperature": float("nan")}, ValueError, "temperature"),
        ((Q, K, QUEUE), {"generator": 3}, TypeError, "generator"),
        ((Q, K, QUEUE), {"reduction": "avg"}, ValueError, "reduction"),
        ((Q, K, QUEUE), {"impl": "fast"}, ValueError, "impl"),
        ((Q, K, QUEUE), {"impl": "cuda"}, ValueError, "cuda"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastssl.mochi_loss(*args, **kwargs)
    if "reduction" not in kwargs:
        with pytest.raises(error, match=match):
            fastssl.mochi_logits(*args, **kwargs)


def test_one_hard_row_is_enough_without_pair_mixes():
    loss = fastssl.mochi_loss(Q, K, QUEUE[:1], n_hard=1, n_mix=0, n_mix_query=3)
    assert torch.isfinite(loss)


@pytest.mark.gpu
def test_generator_on_another_device():
    with pytest.raises(ValueError, match="generator"):
        fastssl.mochi_loss(Q.cuda(), K.cuda(), QUEUE.cuda(), generator=torch.Generator())


# -- a tensor temperature (issue 13, item 3) and scale-safe rows (item 2) ----------------------------------------


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_tensor_temperature_gradient(impl):
    """A tensor τ that requires grad gets the exact ∂L/∂τ (it was left None), as the reference's
    autograd, given the same draws."""
    q, key, queue = _inputs(3, 12, 4, torch.float64)
    draw, drawn = _recording_draw(4, 2)
    results = []
    for which, how in ((impl, draw), ("reference", lambda b, n: drawn[0])):
        tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        a = q.clone().requires_grad_()
        inv_tau = _checks.inverse_temperature("temperature", tau, q.device)
        loss = ops._loss_rows(a, key, queue, 5, how, inv_tau, which).sum()
        results.append((loss, *torch.autograd.grad(loss, (a, tau))))
    for got, want in zip(*results, strict=True):
        assert_verbose_allclose(got, want, rtol=1e-10, atol=1e-12, name="loss and grads (q, τ)")
    with pytest.raises(ValueError, match="temperature"):
        fastssl.mochi_loss(q, key, queue, temperature=torch.tensor(-1.0, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("impl", ["reference", "cpp", "triton"])
def test_rows_of_extreme_norm(impl):
    """Rows (and queue rows) of norm 1e±20 in fp32 give the logits of their unit rows, given the same draws."""
    q, key, queue = _inputs(4, 10, 6)
    scale = torch.tensor([1e20, 1e-20, 1e30, 1e-30, 1.0, 2.0, 1e20, 1e-20, 5.0, 1e-25])[:, None]
    draw, drawn = _recording_draw(5, 3)
    want = ops._logits(q, key, queue, 6, draw, 5.0, impl)
    got = ops._logits(q * scale[:4], key * scale[4:8], queue * scale, 6, lambda b, n: drawn[0], 5.0, impl)
    assert_verbose_allclose(got, want, rtol=1e-5, atol=1e-5, name="logits")
