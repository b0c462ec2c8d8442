"""MoCHi hard-negative mixing: checks, random draws, dispatch, autograd.

Kalantidis et al. 2020, "Hard Negative Mixing for Contrastive Learning" (MoCHi). With unit rows
q̂ (query), k̂ (its key) and n̂_1 … n̂_K (the queue), each query's logits are

    [q̂·k̂, q̂·n̂_1, …, q̂·n̂_K, q̂·h_1, …, q̂·h_S] / τ,   loss = −log softmax(·)_0:          (1)

MoCo's InfoNCE plus S = n_mix + n_mix_query synthetic negatives from the query's own hard set
H(q), the n_hard queue rows with the largest q̂·n̂ (torch.topk, detached):

    h  = norm(α n̂_i + (1 − α) n̂_j),  i ≠ j ∈ H(q),  α ~ U(0, 1),                           (2)
    h′ = norm(β q̄ + (1 − β) n̂_j),    j ∈ H(q),      β ~ U(0, 0.5),  q̄ = q̂ detached.       (3)

No mixed vector is built (docs/design.md, "MoCHi"), and no normalised copy of the queue: for a mix
v = w·â + (1 − w)·n̂ of two rows a, n (x̂ = x/‖x‖), with c_a = w/‖a‖ and c_n = (1 − w)/‖n‖,

    q̂·h = (c_a q̂·a + c_n q̂·n) / ‖v‖,   ‖v‖² = c_a² a·a + c_n² n·n + 2 c_a c_n a·n,        (4)

five dot products of the rows involved, O(D) per synthetic negative. h is detached, so
∂(q̂·h)/∂q̂ = h = (c_a a + c_n n)/‖v‖, formed again in backward from a and n. The custom op
`fastssl::mochi_mix` (csrc/cpu/mochi.cpp, kernels/mochi.py) computes (4) and that backward. The
top-n selection is `fastssl::mochi_hard_set` on CPU (an O(K) selection in C++) and torch.topk on
GPU; in the C++ loss, `fastssl::mochi_queue_rows` takes each row of a chunk of queue products through
the scale, the selection, the synthetic negatives (their qs·â and qs·n̂ read from the row's logits)
and the softmax over both at once (docs/design.md, "MoCHi": the C++ queue pass). The positive, the
queue logits (one matmul, the queue's 1/‖n‖ applied to its columns) and the loss are plain PyTorch
here. The loss is LSE(row) − logit₀ per query, with the
queue's LSE and its gradient computed by chunks of rows (_QueueLogSumExp), so that beyond the
[B, K] queue logits no [B, K] buffer is held: the [B, 1 + K + S] logits exist only in mochi_logits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl import _checks, _ext
from fastssl._reductions import check_reduction, reduce_rows
from fastssl._rows import inverse_norms, power_of_two_scales, row_scales, unit_rows
from fastssl.reference import mochi as reference

# draw(B, n_hard) -> (first, second, weight), each [B, S]: positions in the hard sets; see draw_negatives
Draw = Callable[[int, int], tuple[Tensor, Tensor, Tensor]]


@torch.library.custom_op("fastssl::mochi_mix", mutates_args=())
def mochi_mix(
    q: Tensor, q_bar: Tensor, queue: Tensor, first: Tensor, second: Tensor, weight: Tensor, row_scale: Tensor, impl: str
) -> tuple[Tensor, Tensor]:
    """q_b·norm(w â + (1 − w) n̂) for every column s of query b, by (4); x̂ = x/‖x‖ on the fly.

    q, q_bar [B, D] (q_bar: the detached query, a unit row), queue [K, D] (any row norms) and
    row_scale [K] its rows' power-of-two scales (fastssl._rows.power_of_two_scales: the kernels
    scale the rows by them, exactly, before squaring, so that no norm overflows or underflows);
    first, second [B, S] int64 and weight [B, S] name the mix of column s: n = queue[second],
    a = queue[first], or a = q_bar[b] where first = −1. Returns (logits [B, S], coef [B, S, 2])
    in fp32 (fp64 for fp64 q): h = coef₀·a + coef₁·n is the mixed vector, for the backward. 1/τ
    is applied by the caller.
    """
    kernel = _ext.kernel(impl, q.device, cpp="mochi_mix_fwd_cpu", triton="mochi.mochi_mix_fwd")
    return kernel(q, q_bar, queue, first, second, weight, row_scale)


@mochi_mix.register_fake
def _(q, q_bar, queue, first, second, weight, row_scale, impl):
    acc = _checks.accumulate_dtype(q.dtype)
    return q.new_empty(first.shape, dtype=acc), q.new_empty((*first.shape, 2), dtype=acc)


@torch.library.custom_op("fastssl::mochi_mix_backward", mutates_args=())
def mochi_mix_backward(
    grad: Tensor, q_bar: Tensor, queue: Tensor, first: Tensor, second: Tensor, coef: Tensor, impl: str
) -> Tensor:
    """∂L/∂q_b = Σ_s grad_bs·h_bs with h = coef₀·a + coef₁·n (the mixed vector); dtype of q_bar."""
    fn = _ext.kernel(impl, q_bar.device, cpp="mochi_mix_bwd_cpu", triton="mochi.mochi_mix_bwd")
    return fn(grad, q_bar, queue, first, second, coef)


@mochi_mix_backward.register_fake
def _(grad, q_bar, queue, first, second, coef, impl):
    return torch.empty_like(q_bar)


def _setup_context(ctx, inputs, output):
    _, q_bar, queue, first, second, _, _, impl = inputs
    ctx.save_for_backward(q_bar, queue, first, second, output[1])
    ctx.impl = impl
    ctx.set_materialize_grads(False)  # coef gets no gradient: None, not a [B, S, 2] tensor of zeros


def _backward(ctx, grad_logits, grad_coef):
    # the mixed vectors are constants (detached): the gradient reaches q alone
    if grad_logits is None:  # the logits were not used
        return None, None, None, None, None, None, None, None
    q_bar, queue, first, second, coef = ctx.saved_tensors
    grad_q = mochi_mix_backward(grad_logits.contiguous(), q_bar, queue, first, second, coef, ctx.impl)
    return grad_q, None, None, None, None, None, None, None


mochi_mix.register_autograd(_backward, setup_context=_setup_context)


def queue_scores(qs: Tensor, queue: Tensor, scale: Tensor | None, out: Tensor | None = None) -> Tensor:
    """s_bk = qs_b·n_k·scale_k in scale's dtype: the queue logits of (1) for qs = q̂/τ, scale = 1/‖n‖.

    The product runs in the queue's dtype (qs rounded to it) with the matmul's fp32 accumulation.

    Into `out` when given (no autograd there; scale None leaves the products unscaled), else a new
    tensor (autograd-friendly); same values.
    """
    qs = qs.to(queue.dtype)
    if out is None:
        return torch.mm(qs, queue.T).to(scale.dtype) * scale
    if out.dtype == qs.dtype:
        torch.mm(qs, queue.T, out=out)
    else:
        out.copy_(torch.mm(qs, queue.T))
    return out if scale is None else out.mul_(scale)


@torch.library.custom_op("fastssl::mochi_hard_set", mutates_args=())
def mochi_hard_set(scores: Tensor, n_hard: int, impl: str) -> Tensor:
    """The columns [B, n_hard] of each row's n_hard largest scores, in column order (C++: O(K) per row)."""
    return _ext.kernel(impl, scores.device, cpp="mochi_hard_set_cpu")(scores, n_hard)


@mochi_hard_set.register_fake
def _(scores, n_hard, impl):
    return scores.new_empty((scores.shape[0], n_hard), dtype=torch.long)


@torch.library.custom_op("fastssl::mochi_queue_rows", mutates_args=("s",))
def mochi_queue_rows(
    s: Tensor,
    bound: Tensor,
    scale: Tensor,
    n_hard: int,
    qs: Tensor,
    q_bar: Tensor,
    queue: Tensor,
    row_scale: Tensor,
    first: Tensor,
    second: Tensor,
    weight: Tensor,
    impl: str,
) -> tuple[Tensor, Tensor]:
    """The loss's negatives for a chunk of queries, from their raw queue products s [R, K] = qs·queueᵀ
    in the queue's dtype (C++ only): the logits l = s·scale, each row's n_hard largest columns (its
    hard set, as mochi_hard_set), the synthetic negatives of positions first, second [R, S] in it by
    (4), with q_bar [R, D] the query rows in the queue's dtype and row_scale [K] the queue rows'
    power-of-two scales, and their lse [R] over the queue and synthetic logits together; s ← the
    weights of its gradient: ∂lse_r/∂qs_r = Σ_k s_rk·queue_k + q_coef_r·q_bar_r. Every row is taken
    through all of it while it is in cache; bound_r ≥ max_k l_rk (‖qs_r‖) is the exponentials' shift
    where it is exact (csrc/cpu/mochi.cpp). Returns (lse, q_coef) in fp32 (fp64 for fp64)."""
    kernel = _ext.kernel(impl, s.device, cpp="mochi_queue_rows_cpu")
    return kernel(s, bound, scale, n_hard, qs, q_bar, queue, row_scale, first, second, weight)


@mochi_queue_rows.register_fake
def _(s, bound, scale, n_hard, qs, q_bar, queue, row_scale, first, second, weight, impl):
    acc = _checks.accumulate_dtype(s.dtype)
    return s.new_empty(s.shape[0], dtype=acc), s.new_empty(s.shape[0], dtype=acc)


def hard_negatives(scores: Tensor, n_hard: int, impl: str) -> Tensor:
    """H(q): the indices [B, min(n_hard, K)] of each row's largest scores, in increasing column order,
    so that the draws that index them (draw_negatives) are the same on every path for one seed.

    The C++ selection on CPU (torch.topk sorts (value, index) pairs, several times slower there);
    torch.topk's radix select on GPU, its indices then sorted. NaN ranks above every number in both.
    """
    n_hard = min(n_hard, scores.shape[1])
    if impl == "cpp":
        return mochi_hard_set(scores.detach(), n_hard, impl)
    return torch.topk(scores.detach(), n_hard, dim=1, sorted=False).indices.sort(dim=1).values


def _chunk_rows(k: int) -> int:
    """Rows per chunk of the scores [B, K]: about 4M elements (16 MB in fp32)."""
    return max(1, (1 << 22) // max(1, k))


class _QueueLogSumExp(torch.autograd.Function):
    """lse_b = log Σ_k exp(s_bk), s = queue_scores(qs, queue, scale), and the hard sets, by chunks of
    rows through one reused [rows, K] buffer: no [B, K] buffer is ever held (autograd's logsumexp
    keeps three), and nothing is allocated between the chunks' large transients (which would
    fragment the heap).

    The gradient of lse_b is g_b·G_b with G_b = ∂lse_b/∂qs_b = Σ_k softmax(s_b)_k scale_k n_k, which
    does not depend on g: the forward computes G (one matmul per chunk, the one a backward would do)
    while the chunk's scores are at hand, and saves G [B, D] instead of s. Returns (lse [B],
    hard [B, min(n_hard, K)] indices, not differentiable).

    On the C++ path the synthetic negatives join the chunk pass (mochi_queue_rows): given their
    positions first, second and weights [B, S] (draw_negatives) and q_bar (the detached query rows
    in the queue's dtype), lse also covers their logits qs·h (h detached), whose gradient weights
    land on the rows they mix before the matmul, so that one matmul gives the direction of both;
    hard is then None (the hard sets stay in the kernel).
    """

    @staticmethod
    def forward(ctx, qs, queue, scale, n_hard, impl, q_bar=None, row_scale=None, first=None, second=None, weight=None):
        (b, d), k = qs.shape, queue.shape[0]
        step, n_hard = _chunk_rows(k), min(n_hard, k)
        lse = scale.new_empty(b)
        hard = None if impl == "cpp" else torch.empty((b, n_hard), dtype=torch.long, device=qs.device)
        grad_dir = scale.new_empty((b, d)) if ctx.needs_input_grad[0] else None
        # the C++ pass reads the products and writes the weights in the queue's dtype (no conversions)
        buf = (queue if impl == "cpp" else scale).new_empty((min(step, b), k))
        for r0 in range(0, b, step):
            r1, q_coef = min(b, r0 + step), None
            if impl == "cpp":
                # the raw products, then each row through scale, hard set, synthetic negatives, exp and
                # weights while it is in cache, ‖qs_b‖ its shift (csrc/cpu/mochi.cpp)
                s = queue_scores(qs[r0:r1], queue, None, out=buf[: r1 - r0])
                bound = torch.linalg.vector_norm(qs[r0:r1], dim=1)
                rows = (qs[r0:r1], q_bar[r0:r1], queue, row_scale, first[r0:r1], second[r0:r1], weight[r0:r1])
                lse[r0:r1], q_coef = mochi_queue_rows(s, bound, scale, n_hard, *rows, impl)
                p = s  # the gradient's weights
            else:
                s = queue_scores(qs[r0:r1], queue, scale, out=buf[: r1 - r0])
                hard[r0:r1] = hard_negatives(s, n_hard, impl)
                # lse = m + log Σ exp(s − m), m the row max; s becomes exp(s − m) in place
                m = s.amax(1, keepdim=True)
                total = s.sub_(m).exp_().sum(1, keepdim=True)
                lse[r0:r1] = (total.log() + m).squeeze(1)
                p = s.div_(total).mul_(scale)  # softmax·scale
            if grad_dir is not None:
                g = grad_dir[r0:r1]
                if g.dtype == queue.dtype:
                    torch.mm(p, queue, out=g)
                else:  # a low-precision queue: the weights rounded to it, the matmul's fp32 sums kept
                    g.copy_(torch.mm(p.to(queue.dtype), queue))
                if q_coef is not None:
                    g.addcmul_(q_coef[:, None], q_bar[r0:r1].to(g.dtype))
        # the queue is saved though the backward does not read it, so that enqueueing before backward
        # raises (fastssl.MemoryQueue's contract)
        ctx.save_for_backward(grad_dir, queue)
        if hard is not None:
            ctx.mark_non_differentiable(hard)
        return lse, hard

    @staticmethod
    @torch.autograd.function.once_differentiable  # G is a constant here: no second derivative
    def backward(ctx, grad_lse, _):
        grad_dir, _queue = ctx.saved_tensors
        return grad_lse[:, None] * grad_dir.to(grad_lse.dtype), *[None] * 9


def draw_negatives(
    b: int,
    n_hard: int,
    *,
    n_mix: int,
    n_mix_query: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The synthetic negatives of B queries, as (first, second, weight), each [B, n_mix + n_mix_query].

    Positions in each query's hard set H(q) of n_hard rows (hard_negatives: in column order). Column
    s mixes w·a + (1 − w)·n with w = weight, n = H(q)[second] and a = H(q)[first]: in the first n_mix
    columns a ≠ n are two distinct members of H(q) and w = α ~ U(0, 1) (2); in the last n_mix_query,
    first = −1 stands for the query itself and w = β ~ U(0, 0.5) (3). The draws do not depend on
    the hard sets' contents, so the C++ loss can draw them before it finds the sets. Every draw
    comes from `generator` on `device`, in a fixed order, so a seed reproduces them.
    """
    randint = functools.partial(torch.randint, generator=generator, device=device)
    rand = functools.partial(torch.rand, generator=generator, device=device)
    first = torch.empty((b, n_mix + n_mix_query), dtype=torch.long, device=device)
    second, weight = torch.empty_like(first), torch.empty(first.shape, device=device)
    # each draw straight into its columns (one [B, n] temporary at a time, in this fixed order):
    # i uniform, then j = i + 1 + U{0, …, n_hard − 2} (mod n_hard) is uniform over the others
    first[:, :n_mix] = randint(max(n_hard, 1), (b, n_mix))
    second[:, :n_mix] = randint(max(n_hard - 1, 1), (b, n_mix))
    second[:, :n_mix].add_(first[:, :n_mix]).add_(1).remainder_(max(n_hard, 1))
    weight[:, :n_mix] = rand((b, n_mix))  # α
    second[:, n_mix:] = randint(max(n_hard, 1), (b, n_mix_query))
    weight[:, n_mix:] = rand((b, n_mix_query)).mul_(0.5)  # β
    first[:, n_mix:] = -1
    return first, second, weight


def in_queue(hard: Tensor, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    """draw_negatives' positions as queue rows, through the hard sets hard [B, n_hard] (first −1 stays)."""
    picked = hard.gather(1, first.clamp(min=0))
    return torch.where(first < 0, first, picked), hard.gather(1, second)


def mochi_logits(
    q: Tensor,
    k: Tensor,
    queue,
    *,
    n_hard: int = 1024,
    n_mix: int = 1024,
    n_mix_query: int = 128,
    temperature: float = 0.2,
    generator: torch.Generator | None = None,
    impl: str = "auto",
) -> Tensor:
    """MoCHi logits [B, 1 + K + n_mix + n_mix_query] in fp32: positive, queue, then synthetic negatives, over τ.

    Args:
        q: [B, D] queries; k: [B, D] their keys (the positive, column 0).
        queue: [K, D] negatives, treated as a constant: no gradient flows to it (the public
            :func:`fastssl.mochi_logits` also takes a :class:`fastssl.MemoryQueue`: its filled rows).
        n_hard: size of each query's hard set, its own top-n_hard queue rows by similarity; capped at K.
        n_mix: synthetic negatives per query mixing two distinct hard rows, α ~ U(0, 1).
        n_mix_query: synthetic negatives per query mixing the detached query with one hard row,
            β ~ U(0, 0.5) (the query's share).
        temperature: τ > 0, a float or a one-element tensor; every logit is divided by it. When
            it requires grad its gradient is exact; a tensor is never read on the host on CUDA
            (there a non-positive or non-finite one gives NaN).
        generator: a torch.Generator on q's device for the draws (hard-set positions, α, β);
            the same seed gives the same logits, on every impl (the hard sets, which the positions
            index, are in column order everywhere; they can differ only by ties at the n_hard-th score).
        impl: "auto", "reference", "cpp", "triton" or "cuda" (see README); $FASTSSL_IMPL overrides "auto".

    Rows of q, k and queue are L2-normalised inside, at any scale (a zero row stays zero).
    Synthetic negatives are detached and never built in memory (no [B, S, D] tensor); gradients
    flow to q (through every logit) and to k (through the positive). With n_mix = n_mix_query = 0
    these are MoCo's logits. n_mix > 0 needs at least 2 hard rows (n_hard ≥ 2 and K ≥ 2); a
    ValueError says so otherwise.
    """
    q, k, queue, n_hard, draw, inv_tau, impl = _prepare(
        q, k, queue, n_hard, n_mix, n_mix_query, temperature, generator, impl
    )
    return _logits(q, k, queue, n_hard, draw, inv_tau, impl)


def mochi_loss(
    q: Tensor,
    k: Tensor,
    queue,
    *,
    n_hard: int = 1024,
    n_mix: int = 1024,
    n_mix_query: int = 128,
    temperature: float = 0.2,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    impl: str = "auto",
) -> Tensor:
    """MoCHi loss: cross-entropy of :func:`mochi_logits` with the positive (column 0) as target.

    Same arguments as :func:`mochi_logits`, plus ``reduction``: "mean", "sum", or "none" for the
    per-query losses [B]. The loss is fp32 for every input dtype; with n_mix = n_mix_query = 0 it
    is MoCo's InfoNCE loss. Non-finite inputs give a non-finite loss. Memory beyond the inputs is
    O(B·(D + n_hard + S)) plus one [rows, K] work buffer: neither the logits nor the mixed
    vectors are held.
    """
    check_reduction(reduction)
    q, k, queue, n_hard, draw, inv_tau, impl = _prepare(
        q, k, queue, n_hard, n_mix, n_mix_query, temperature, generator, impl
    )
    rows = _loss_rows(q, k, queue, n_hard, draw, inv_tau, impl)
    return reduce_rows(rows, reduction)


def _prepare(q, k, queue, n_hard, n_mix, n_mix_query, temperature, generator, impl):
    """Checks every argument; returns (q, k, queue tensor, n_hard (0: no hard set needed), draw, 1/τ, impl)."""
    _checks.features("q", q)
    _checks.features("k", k)
    _checks.like("k", k, "q", q)
    _checks.features("queue", queue)
    _checks.like("queue", queue, "q", q, dims=[1])
    n_hard = _checks.integer("n_hard", n_hard, minimum=1)
    n_mix = _checks.integer("n_mix", n_mix)
    n_mix_query = _checks.integer("n_mix_query", n_mix_query)
    if n_mix > 0 and min(n_hard, queue.shape[0]) < 2:
        raise ValueError(
            f"n_mix > 0 mixes two distinct hard negatives, so n_hard and the queue's length must be >= 2; "
            f"got n_hard={n_hard} and a queue of {queue.shape[0]} rows"
        )
    inv_tau = _checks.inverse_temperature("temperature", temperature, q.device)
    generator = _checks.generator("generator", generator, q.device)
    impl = _ext.resolve_impl(impl, q.device)
    draw = functools.partial(
        draw_negatives, n_mix=n_mix, n_mix_query=n_mix_query, generator=generator, device=q.device
    )
    n_hard = n_hard if n_mix + n_mix_query > 0 else 0  # no hard set needed
    return q, k, queue, n_hard, draw, inv_tau, impl


def _normalised(q: Tensor, k: Tensor, queue: Tensor, impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q̂, k̂, 1/‖n_k‖ [K] and the queue rows' power-of-two scales [K], in fp32 (fp64 for fp64),
    scale-safe (fastssl/_rows.py; the scales are found once, one pass over the queue).

    The query side stays in fp32 for bf16/fp16 inputs, so that the gradients of the three terms
    of (1) are summed in fp32; the matmul and the kernel read q̂ rounded to the queue's dtype.
    """
    acc = _checks.accumulate_dtype(q.dtype)
    qn, kn = (unit_rows(x.to(acc)) for x in (q, k))
    if impl == "cpp":  # both in one pass over the queue (in acc, as the queue has q's dtype)
        row_scale, inverse = row_scales(queue)
        return qn, kn, inverse, row_scale
    row_scale = power_of_two_scales(queue, acc)
    return qn, kn, inverse_norms(queue, acc, row_scale), row_scale


def _positive_and_mixed(qn, kn, queue, row_scale, hard, draw, inv_tau, impl) -> tuple[Tensor, Tensor]:
    """q̂·k̂/τ [B] and the synthetic logits [B, S] of (2)-(4), drawn from the hard sets; 1/τ (a
    tensor temperature's gradient included) enters outside the kernel."""
    first, second, weight = draw(*hard.shape)
    first, second = in_queue(hard, first, second)
    q_rows = qn.to(queue.dtype)
    mixed, _ = mochi_mix(q_rows, q_rows.detach(), queue, first, second, weight, row_scale, impl)
    return (qn * kn).sum(1) * inv_tau, mixed * inv_tau


def _logits(q: Tensor, k: Tensor, queue: Tensor, n_hard: int, draw: Draw, inv_tau: float | Tensor, impl: str) -> Tensor:
    """(1) for checked inputs, with the synthetic negatives that `draw` picks from the hard sets."""
    queue = queue.detach()
    if impl == "reference":
        return reference.mochi_logits(q, k, queue, n_hard, draw, inv_tau)
    qn, kn, scale, row_scale = _normalised(q, k, queue, impl)
    # q̂·n̂/τ [B, K], by the same chunks as _QueueLogSumExp (so the same hard sets as mochi_loss);
    # the queue is never normalised in memory
    step = _chunk_rows(queue.shape[0])
    neg = torch.cat([queue_scores(c, queue, scale) for c in (qn * inv_tau).split(step)])
    hard = torch.cat([hard_negatives(c, n_hard, impl) for c in neg.split(step)])
    pos, mixed = _positive_and_mixed(qn, kn, queue, row_scale, hard, draw, inv_tau, impl)
    return torch.cat([pos[:, None], neg, mixed], dim=1)


def _loss_rows(
    q: Tensor, k: Tensor, queue: Tensor, n_hard: int, draw: Draw, inv_tau: float | Tensor, impl: str
) -> Tensor:
    """−log softmax(1)₀ per query, as LSE(logits) − logit₀ without the [B, 1 + K + S] logits."""
    queue = queue.detach()
    if impl == "reference":
        logits = reference.mochi_logits(q, k, queue, n_hard, draw, inv_tau)
        return F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long), reduction="none")
    qn, kn, scale, row_scale = _normalised(q, k, queue, impl)
    if impl == "cpp":  # the synthetic negatives within the queue pass, drawn first (their draws do not read H(q))
        first, second, weight = draw(q.shape[0], min(n_hard, queue.shape[0]))
        rows = (qn.detach().to(queue.dtype), row_scale, first, second, weight)
        lse_neg, _ = _QueueLogSumExp.apply(qn * inv_tau, queue, scale, n_hard, impl, *rows)
        pos = (qn * kn).sum(1) * inv_tau
        return torch.stack([pos, lse_neg]).logsumexp(0) - pos
    lse_neg, hard = _QueueLogSumExp.apply(qn * inv_tau, queue, scale, n_hard, impl)
    pos, mixed = _positive_and_mixed(qn, kn, queue, row_scale, hard, draw, inv_tau, impl)
    return torch.stack([pos, lse_neg, mixed.logsumexp(1)]).logsumexp(0) - pos
