"""MoCHi synthetic negatives in Triton: their logits and gradient, without building them.

Same contract as the C++ kernel (csrc/cpu/mochi.cpp); fastssl/ops/mochi.py calls
`mochi_mix_fwd` and `mochi_mix_bwd`. Synthetic negative s of query b (Kalantidis et al. 2020,
"Hard Negative Mixing for Contrastive Learning") mixes two rows: n = queue[second_bs] and
a = queue[first_bs], or a = q̄_b (the detached query) where first_bs = −1. The math is
docs/design.md, "MoCHi": a queue row enters scaled by a power of two (RowScale_ptr, from the op:
exact, and its largest entry then in [0.5, 1)), so that its squares neither overflow nor underflow
at any norm; rows are then normalised on the fly, x̂ = x / max(‖x‖, ε) as F.normalize, and the negative is h = v/‖v‖ with
v = w â + (1 − w) n̂ = c_a a + c_n n, c_a = w/‖a‖, c_n = (1 − w)/‖n‖,
q·h = (c_a q·a + c_n q·n)/‖v‖ and ‖v‖² = c_a² a·a + c_n² n·n + 2 c_a c_n a·n: five dot products
of two gathered rows and q, O(D) per negative, and no [B, S, D] tensor (1/τ is applied by the op).
h is a constant (detached): ∂L/∂q_b = Σ_s g_bs (k_a a + k_n n) with k = c·scale/‖v‖ for the
rows as stored, the coefficients the forward saves; the backward gathers a and n again.

Work layout. Forward: program (b, block of BLOCK_S negatives); the rows are gathered as
[BLOCK_S, BLOCK_D] tiles (one row per negative, int64 row offsets) and the five dots are row
sums in fp32 (fp64 for fp64), D in BLOCK_D chunks. The products are row-wise (each negative has
its own two rows), so there is no tile product for tl.dot here: the kernel is bound by the gathers.
Backward: program (b, D chunk, part of the S negatives); it sums its part in registers and adds it
to the fp32 gradient with one tl.atomic_add per program (order-dependent in the last bits).
Non-contiguous inputs are read through their strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastssl.kernels._launch import acc_dtype, block_size, launcher, program_target
from torch import Tensor

# Two gathered [BLOCK_S, BLOCK_D] tiles live per chunk: at most 64 features per chunk (32 for the
# fp64 forward, whose five fp64 sums and tiles take twice the registers), so that no variant spills
# registers on sm_80 or sm_90 (scripts/compile_check.py; docs/design.md, "Tile kernels": launch
# configurations).
_BLOCK_S = 32
_MAX_BLOCK_D = 64
_MAX_BLOCK_D_FWD_FP64 = 32
_EPS = 1e-12  # F.normalize's eps


@triton.jit
def _inv_norm(sq, EPS: tl.constexpr):
    """1 / max(sqrt(sq), eps), as F.normalize; sq ≥ 0 up to rounding."""
    return 1.0 / tl.maximum(tl.sqrt(tl.maximum(sq, 0.0)), EPS)


@triton.jit
def _mix_rows(
    QBar_ptr,
    Queue_ptr,
    b,
    i,  # [BLOCK_S] first: queue row, or −1 for the query
    j,  # [BLOCK_S] second: queue row
    ok,  # [BLOCK_S] mask of real negatives
    dd,  # [BLOCK_D] feature indices
    ok_d,
    QBar_stride_b,
    QBar_stride_d,
    Queue_stride_k,
    Queue_stride_d,
    ACC: tl.constexpr,
):
    """The rows a and n of BLOCK_S mixes, [BLOCK_S, BLOCK_D] each in ACC, zeros outside."""
    from_query = i < 0
    i_row = tl.where(from_query, 0, i)
    ok_n = ok[:, None] & ok_d[None, :]
    a = tl.load(
        Queue_ptr + i_row[:, None] * Queue_stride_k + dd[None, :] * Queue_stride_d,
        mask=ok_n & ~from_query[:, None],
        other=0.0,
    ).to(ACC)
    q_bar = tl.load(QBar_ptr + b * QBar_stride_b + dd * QBar_stride_d, mask=ok_d, other=0.0).to(ACC)
    a = tl.where(from_query[:, None], q_bar[None, :], a)
    n = tl.load(Queue_ptr + j[:, None] * Queue_stride_k + dd[None, :] * Queue_stride_d, mask=ok_n, other=0.0).to(ACC)
    return a, n


@triton.jit
def _mochi_mix_fwd_kernel(
    Q_ptr,
    QBar_ptr,
    Queue_ptr,
    First_ptr,
    Second_ptr,
    W_ptr,
    RowScale_ptr,  # [K] ACC: the queue rows' power-of-two scales
    Out_ptr,  # [B, S] ACC: q·h (times 1/τ outside)
    Coef_ptr,  # [B, S, 2] ACC, contiguous: (k_a, k_n) for the rows as stored
    S,
    D,
    Q_stride_b,
    Q_stride_d,
    QBar_stride_b,
    QBar_stride_d,
    Queue_stride_k,
    Queue_stride_d,
    First_stride_b,
    First_stride_s,
    Second_stride_b,
    Second_stride_s,
    W_stride_b,
    W_stride_s,
    ACC: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = cols < S
    i = tl.load(First_ptr + b * First_stride_b + cols * First_stride_s, mask=ok, other=0).to(tl.int64)
    j = tl.load(Second_ptr + b * Second_stride_b + cols * Second_stride_s, mask=ok, other=0).to(tl.int64)
    w = tl.load(W_ptr + b * W_stride_b + cols * W_stride_s, mask=ok, other=0.0).to(ACC)
    # the rows' scales; the query (i = −1) is a unit row
    s_a = tl.where(i < 0, 1.0, tl.load(RowScale_ptr + tl.where(i < 0, 0, i), mask=ok, other=0.0)).to(ACC)
    s_n = tl.load(RowScale_ptr + j, mask=ok, other=0.0).to(ACC)
    qa = tl.zeros([BLOCK_S], ACC)
    qn = tl.zeros([BLOCK_S], ACC)
    aa = tl.zeros([BLOCK_S], ACC)
    nn = tl.zeros([BLOCK_S], ACC)
    an = tl.zeros([BLOCK_S], ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        ok_d = dd < D
        q = tl.load(Q_ptr + b * Q_stride_b + dd * Q_stride_d, mask=ok_d, other=0.0).to(ACC)
        a, n = _mix_rows(
            QBar_ptr, Queue_ptr, b, i, j, ok, dd, ok_d, QBar_stride_b, QBar_stride_d, Queue_stride_k,
            Queue_stride_d, ACC,
        )  # fmt: skip
        a = a * s_a[:, None]
        n = n * s_n[:, None]
        # the five dot products, as row sums of the gathered tiles
        qa += tl.sum(a * q[None, :], axis=1)
        qn += tl.sum(n * q[None, :], axis=1)
        aa += tl.sum(a * a, axis=1)
        nn += tl.sum(n * n, axis=1)
        an += tl.sum(a * n, axis=1)
    c_a = w * _inv_norm(aa, EPS)
    c_n = (1.0 - w) * _inv_norm(nn, EPS)
    r = _inv_norm(c_a * c_a * aa + c_n * c_n * nn + 2.0 * c_a * c_n * an, EPS)
    tl.store(Out_ptr + b * S + cols, (c_a * qa + c_n * qn) * r, mask=ok)
    tl.store(Coef_ptr + (b * S + cols) * 2, c_a * r * s_a, mask=ok)
    tl.store(Coef_ptr + (b * S + cols) * 2 + 1, c_n * r * s_n, mask=ok)


@triton.jit
def _mochi_mix_bwd_kernel(
    G_ptr,  # [B, S] ACC, contiguous: ∂L/∂(q·h)
    QBar_ptr,
    Queue_ptr,
    First_ptr,
    Second_ptr,
    Coef_ptr,  # [B, S, 2] ACC, contiguous
    Grad_ptr,  # [B, D] ACC, contiguous, zeros in
    S,
    D,
    s_per_part,  # negatives per program along grid axis 2, a multiple of BLOCK_S
    QBar_stride_b,
    QBar_stride_d,
    Queue_stride_k,
    Queue_stride_d,
    First_stride_b,
    First_stride_s,
    Second_stride_b,
    Second_stride_s,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok_d = dd < D
    s_start = tl.program_id(2).to(tl.int64) * s_per_part
    s_end = tl.minimum(s_start + s_per_part, S)
    acc = tl.zeros([BLOCK_D], ACC)
    for s0 in range(s_start, s_end, BLOCK_S):
        cols = s0 + tl.arange(0, BLOCK_S)
        ok = cols < s_end
        i = tl.load(First_ptr + b * First_stride_b + cols * First_stride_s, mask=ok, other=0).to(tl.int64)
        j = tl.load(Second_ptr + b * Second_stride_b + cols * Second_stride_s, mask=ok, other=0).to(tl.int64)
        g = tl.load(G_ptr + b * S + cols, mask=ok, other=0.0)
        k_a = tl.load(Coef_ptr + (b * S + cols) * 2, mask=ok, other=0.0)
        k_n = tl.load(Coef_ptr + (b * S + cols) * 2 + 1, mask=ok, other=0.0)
        a, n = _mix_rows(
            QBar_ptr, Queue_ptr, b, i, j, ok, dd, ok_d, QBar_stride_b, QBar_stride_d, Queue_stride_k,
            Queue_stride_d, ACC,
        )  # fmt: skip
        # g·h = g (k_a a + k_n n), summed over this block of negatives
        acc += tl.sum((g * k_a)[:, None] * a + (g * k_n)[:, None] * n, axis=0)
    if s_start < s_end:
        tl.atomic_add(Grad_ptr + b * D + dd, acc, mask=ok_d, sem="relaxed")


# ---------------------------------------------------------------------------------------------
# launch helpers


def _check(fn: str, q_bar: Tensor, queue: Tensor, first: Tensor, second: Tensor) -> None:
    if q_bar.dim() != 2 or queue.dim() != 2 or queue.shape[1] != q_bar.shape[1]:
        raise ValueError(f"{fn}: q [B, D] and queue [K, D] expected, got {tuple(q_bar.shape)} and {tuple(queue.shape)}")
    if queue.dtype != q_bar.dtype or queue.device != q_bar.device:
        raise ValueError(f"{fn}: queue ({queue.dtype}, {queue.device}) must match q ({q_bar.dtype}, {q_bar.device})")
    if first.shape != second.shape or first.dim() != 2 or first.shape[0] != q_bar.shape[0]:
        raise ValueError(f"{fn}: first and second must be [B, S], got {tuple(first.shape)} and {tuple(second.shape)}")
    if first.dtype != torch.int64 or second.dtype != torch.int64:
        raise TypeError(f"{fn}: first and second must be int64, got {first.dtype} and {second.dtype}")


def _parts(b: int, d_blocks: int, s: int, device: torch.device) -> int:
    """How many programs share one query's S negatives in the backward."""
    target = program_target(device)
    return max(1, min(triton.cdiv(s, _BLOCK_S), triton.cdiv(target, b * d_blocks)))


@launcher
def mochi_mix_fwd(
    q: Tensor, q_bar: Tensor, queue: Tensor, first: Tensor, second: Tensor, weight: Tensor, row_scale: Tensor
) -> tuple[Tensor, Tensor]:
    """q_b·norm(w â + (1 − w) n̂) [B, S] and the coefficients (k_a, k_n) [B, S, 2], fp32 (fp64 for fp64);
    row_scale [K]: the queue rows' power-of-two scales (fastssl._rows.power_of_two_scales)."""
    _check("mochi_mix_fwd", q_bar, queue, first, second)
    if q.shape != q_bar.shape or weight.shape != first.shape or row_scale.shape != (queue.shape[0],):
        raise ValueError(
            f"mochi_mix_fwd: q {tuple(q.shape)}, weight {tuple(weight.shape)} or row_scale {tuple(row_scale.shape)} "
            "do not match"
        )
    (b, d), s = q.shape, first.shape[1]
    out_dtype, acc = acc_dtype(q)
    row_scale = row_scale.to(out_dtype).contiguous()
    out = torch.empty((b, s), dtype=out_dtype, device=q.device)
    coef = torch.empty((b, s, 2), dtype=out_dtype, device=q.device)
    if b * s == 0:
        return out, coef
    grid = (b, triton.cdiv(s, _BLOCK_S))
    max_block_d = _MAX_BLOCK_D_FWD_FP64 if q.dtype == torch.float64 else _MAX_BLOCK_D
    _mochi_mix_fwd_kernel[grid](
        q, q_bar, queue, first, second, weight, row_scale, out, coef, s, d,
        q.stride(0), q.stride(1), q_bar.stride(0), q_bar.stride(1), queue.stride(0), queue.stride(1),
        first.stride(0), first.stride(1), second.stride(0), second.stride(1), weight.stride(0), weight.stride(1),
        ACC=acc, EPS=_EPS, BLOCK_S=_BLOCK_S, BLOCK_D=block_size(d, max_block_d),
    )  # fmt: skip
    return out, coef


@launcher
def mochi_mix_bwd(grad: Tensor, q_bar: Tensor, queue: Tensor, first: Tensor, second: Tensor, coef: Tensor) -> Tensor:
    """∂L/∂q_b = Σ_s grad_bs (k_a a + k_n n), in the dtype of q_bar."""
    _check("mochi_mix_bwd", q_bar, queue, first, second)
    if grad.shape != first.shape or coef.shape != (*first.shape, 2):
        raise ValueError(f"mochi_mix_bwd: grad {tuple(grad.shape)} or coef {tuple(coef.shape)} do not match first")
    (b, d), s = q_bar.shape, first.shape[1]
    out_dtype, acc = acc_dtype(q_bar)
    out = torch.zeros((b, d), dtype=out_dtype, device=q_bar.device)
    if b * s == 0:
        return out.to(q_bar.dtype)
    g = grad.to(out_dtype).contiguous()
    coef = coef.to(out_dtype).contiguous()
    block_d = block_size(d, _MAX_BLOCK_D)
    d_blocks = triton.cdiv(d, block_d)
    parts = _parts(b, d_blocks, s, q_bar.device)
    s_per_part = triton.cdiv(triton.cdiv(s, parts), _BLOCK_S) * _BLOCK_S
    grid = (b, d_blocks, triton.cdiv(s, s_per_part))
    _mochi_mix_bwd_kernel[grid](
        g, q_bar, queue, first, second, coef, out, s, d, s_per_part,
        q_bar.stride(0), q_bar.stride(1), queue.stride(0), queue.stride(1),
        first.stride(0), first.stride(1), second.stride(0), second.stride(1),
        ACC=acc, BLOCK_S=_BLOCK_S, BLOCK_D=block_d,
    )  # fmt: skip
    return out if out.dtype == q_bar.dtype else out.to(q_bar.dtype)
