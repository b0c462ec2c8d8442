"""Masked image modelling in Triton: MAE's rank, gather and unshuffle, and the masked MSE loss.

The math is docs/design.md, "Masking" (rank, gather, unshuffle, masked MSE); same contract as the
C++ kernels (csrc/cpu/masking.cpp); fastssl/ops/masking.py calls `masking_rank`, `masking_gather`,
`masking_unshuffle` and `masked_mse_fwd`.

A sequence of N = P + L rows holds P prefix tokens, always kept, and L patch tokens; patch i of
sample b, with rank r_i = ids_restore[b, i], is visible when r_i < keep and then sits at row P + r_i.

* Rank: a program compares BLOCK_I noise values with all L of its sample, BLOCK_J at a time.
* Gather: written as a scatter (each input row knows its destination; ranks are distinct); with
  SUM_MASKED the masked rows are summed per program into Partial[b·n_blocks + block] (no atomics;
  the host adds the partials).
* Unshuffle: output row P + i reads visible row P + r_i, or the mask token. Ranks outside [0, keep)
  count as masked: a corrupted ids_restore never leads out of bounds.
* Masked MSE: one program per patch row, P values in BLOCK_P chunks, three passes (mean, variance,
  difference); a row of weight 0 is not read.

Row indices are int64 before they meet a stride; strides are passed for every tensor, so rows of
non-contiguous inputs are read in place (the last dim must be dense, which the host ensures).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastssl.kernels._launch import acc_dtype, block_size, launcher
from torch import Tensor

_RANK_BLOCK = 64
_ROWS_BLOCK = 16  # token rows per program in gather and unshuffle
_MAX_BLOCK_D = 256
_MAX_BLOCK_P = 1024


@triton.jit
def _masking_rank_kernel(
    Noise_ptr, Ids_ptr, L, Noise_stride_b, Ids_stride_b, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr
):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < L
    n_i = tl.load(Noise_ptr + b * Noise_stride_b + i, mask=i_ok, other=0.0)
    rank = tl.zeros([BLOCK_I], dtype=tl.int64)
    for j0 in range(0, L, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        n_j = tl.load(Noise_ptr + b * Noise_stride_b + j, mask=j < L, other=0.0)
        # j precedes i in a stable sort
        before = (n_j[None, :] < n_i[:, None]) | ((n_j[None, :] == n_i[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((before & (j < L)[None, :]).to(tl.int64), axis=1)
    tl.store(Ids_ptr + b * Ids_stride_b + i, rank, mask=i_ok)


@triton.jit
def _masking_gather_kernel(
    X_ptr,
    Ids_ptr,
    Out_ptr,
    Partial_ptr,  # [B·n_blocks, D] ACC, written when SUM_MASKED
    N,  # P + L rows in x
    D,
    keep,
    num_prefix,
    X_stride_b,
    X_stride_n,
    Ids_stride_b,
    Out_stride_b,
    Out_stride_n,
    ACC: tl.constexpr,
    SUM_MASKED: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    rows = (blk * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    row_ok = rows < N
    prefix = rows < num_prefix
    r = tl.load(Ids_ptr + b * Ids_stride_b + (rows - num_prefix), mask=row_ok & ~prefix, other=-1)
    visible = (r >= 0) & (r < keep)
    # prefix rows stay where they are; a visible patch goes to row P + r
    dest = tl.where(prefix, rows, num_prefix + r)
    kept = row_ok & (prefix | visible)
    if SUM_MASKED:  # every row is read; otherwise only the kept ones
        read = row_ok
    else:
        read = kept
    vals = tl.load(
        X_ptr + b * X_stride_b + rows[:, None] * X_stride_n + cols[None, :],
        mask=read[:, None] & col_ok[None, :],
        other=0.0,
    )
    tl.store(
        Out_ptr + b * Out_stride_b + dest[:, None] * Out_stride_n + cols[None, :],
        vals,
        mask=kept[:, None] & col_ok[None, :],
    )
    if SUM_MASKED:
        masked = row_ok & ~kept
        part = tl.sum(tl.where(masked[:, None], vals.to(ACC), 0.0), axis=0)
        tl.store(Partial_ptr + (b * tl.num_programs(1) + blk) * D + cols, part, mask=col_ok)


@triton.jit
def _masking_unshuffle_kernel(
    V_ptr,
    Ids_ptr,
    Token_ptr,
    Out_ptr,
    N,  # P + L output rows
    D,
    keep,
    num_prefix,
    V_stride_b,
    V_stride_n,
    Ids_stride_b,
    Out_stride_b,
    Out_stride_n,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = (tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    row_ok = rows < N
    prefix = rows < num_prefix
    r = tl.load(Ids_ptr + b * Ids_stride_b + (rows - num_prefix), mask=row_ok & ~prefix, other=-1)
    # a prefix row or a visible patch reads the visible sequence, a masked patch the token
    from_v = row_ok & (prefix | ((r >= 0) & (r < keep)))
    src = tl.where(prefix, rows, num_prefix + r)
    vals = tl.load(
        V_ptr + b * V_stride_b + src[:, None] * V_stride_n + cols[None, :],
        mask=from_v[:, None] & col_ok[None, :],
        other=0.0,
    )
    token = tl.load(Token_ptr + cols, mask=col_ok, other=0.0)
    out = tl.where(from_v[:, None], vals, token[None, :])
    tl.store(
        Out_ptr + b * Out_stride_b + rows[:, None] * Out_stride_n + cols[None, :],
        out,
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _masked_mse_kernel(
    Pred_ptr,
    Target_ptr,
    W_ptr,  # [R] ACC weights
    WSum_ptr,  # [1] ACC: Σw
    RowLoss_ptr,  # [R] ACC
    Grad_ptr,  # [R, P] pred dtype, written when NEED_GRAD
    P,
    Pred_stride_r,
    Target_stride_r,
    Grad_stride_r,
    ACC: tl.constexpr,
    NORM_PIX: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    w = tl.load(W_ptr + r)
    pred_row = Pred_ptr + r * Pred_stride_r
    target_row = Target_ptr + r * Target_stride_r
    grad_row = Grad_ptr + r * Grad_stride_r
    offs = tl.arange(0, BLOCK_P)
    if w == 0:  # not a masked patch: not read
        tl.store(RowLoss_ptr + r, w)
        if NEED_GRAD:
            for p0 in range(0, P, BLOCK_P):
                tl.store(grad_row + p0 + offs, tl.zeros([BLOCK_P], dtype=ACC), mask=p0 + offs < P)
    else:
        mean = tl.zeros([1], dtype=ACC).sum()
        rstd = mean + 1.0
        if NORM_PIX:
            acc = tl.zeros([BLOCK_P], dtype=ACC)
            for p0 in range(0, P, BLOCK_P):
                acc += tl.load(target_row + p0 + offs, mask=p0 + offs < P, other=0.0).to(ACC)
            mean = tl.sum(acc) / P
            acc = tl.zeros([BLOCK_P], dtype=ACC)
            for p0 in range(0, P, BLOCK_P):
                ok = p0 + offs < P
                t = tl.load(target_row + p0 + offs, mask=ok, other=0.0).to(ACC)
                acc += tl.where(ok, (t - mean) * (t - mean), 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(acc) / (P - 1) + 1e-6)
        scale = 2.0 * w / (P * tl.load(WSum_ptr))
        acc = tl.zeros([BLOCK_P], dtype=ACC)
        for p0 in range(0, P, BLOCK_P):
            ok = p0 + offs < P
            t = tl.load(target_row + p0 + offs, mask=ok, other=0.0).to(ACC)
            d = tl.load(pred_row + p0 + offs, mask=ok, other=0.0).to(ACC) - (t - mean) * rstd
            d = tl.where(ok, d, 0.0)
            acc += d * d
            if NEED_GRAD:
                tl.store(grad_row + p0 + offs, d * scale, mask=ok)
        tl.store(RowLoss_ptr + r, w * tl.sum(acc) / P)


# launch helpers


@launcher
def masking_rank(noise: Tensor) -> Tensor:
    """ids_restore [B, L] int64: each value's rank in its row, ties in index order."""
    noise = noise.to(torch.float32)
    b, l = noise.shape
    ids = torch.empty((b, l), dtype=torch.int64, device=noise.device)
    if ids.numel() == 0:
        return ids
    if noise.stride(1) != 1:
        noise = noise.contiguous()
    block = max(16, min(_RANK_BLOCK, triton.next_power_of_2(l)))
    _masking_rank_kernel[(b, triton.cdiv(l, block))](
        noise, ids, l, noise.stride(0), ids.stride(0), BLOCK_I=block, BLOCK_J=block
    )
    return ids


@launcher
def masking_gather(
    x: Tensor, ids_restore: Tensor, keep: int, num_prefix: int, sum_masked: bool
) -> tuple[Tensor, Tensor]:
    """(visible [B, P + keep, D], Σ of masked rows [B·blocks, D] fp32/fp64 or [0, D]): the gather."""
    if x.stride(2) != 1:
        x = x.contiguous()
    b, n, d = x.shape
    out_dtype, acc = acc_dtype(x)
    out = torch.empty((b, num_prefix + keep, d), dtype=x.dtype, device=x.device)
    blocks = triton.cdiv(n, _ROWS_BLOCK)
    partial = torch.empty((b * blocks if sum_masked else 0, d), dtype=out_dtype, device=x.device)
    if b == 0 or n == 0:
        return out, partial.zero_()
    block_d = block_size(d, _MAX_BLOCK_D)
    _masking_gather_kernel[(b, blocks, triton.cdiv(d, block_d))](
        x, ids_restore, out, partial, n, d, keep, num_prefix,
        x.stride(0), x.stride(1), ids_restore.stride(0), out.stride(0), out.stride(1),
        ACC=acc, SUM_MASKED=sum_masked, BLOCK_L=_ROWS_BLOCK, BLOCK_D=block_d,
        num_warps=8 if block_d * x.element_size() >= 1024 else 4,  # 4 spill under Triton 3.6 (compile check)
    )  # fmt: skip
    return out, partial


@launcher
def masking_unshuffle(visible: Tensor, ids_restore: Tensor, mask_token: Tensor, num_prefix: int) -> Tensor:
    """[B, P + L, D]: the visible rows back in place, the mask token elsewhere: the unshuffle."""
    if visible.stride(2) != 1:
        visible = visible.contiguous()
    b, _, d = visible.shape
    n = num_prefix + ids_restore.shape[1]
    keep = visible.shape[1] - num_prefix
    out = torch.empty((b, n, d), dtype=visible.dtype, device=visible.device)
    if out.numel() == 0:
        return out
    token = mask_token.reshape(d).contiguous()
    block_d = block_size(d, _MAX_BLOCK_D)
    _masking_unshuffle_kernel[(b, triton.cdiv(n, _ROWS_BLOCK), triton.cdiv(d, block_d))](
        visible, ids_restore, token, out, n, d, keep, num_prefix,
        visible.stride(0), visible.stride(1), ids_restore.stride(0), out.stride(0), out.stride(1),
        BLOCK_L=_ROWS_BLOCK, BLOCK_D=block_d,
    )  # fmt: skip
    return out


@launcher
def masked_mse_fwd(
    pred: Tensor, target: Tensor, weight: Tensor, weight_sum: Tensor, norm_pix: bool, need_grad: bool
) -> tuple[Tensor, Tensor]:
    """(w_r·ℓ_r per row [B·L] fp32/fp64, ∂loss/∂pred [B, L, P] in pred's dtype or [0]): the masked MSE."""
    p = pred.shape[-1]
    pred2, target2 = pred.reshape(-1, p), target.reshape(-1, p)
    if pred2.stride(1) != 1:
        pred2 = pred2.contiguous()
    if target2.stride(1) != 1:
        target2 = target2.contiguous()
    out_dtype, acc = acc_dtype(pred, target)
    w = weight.reshape(-1).to(out_dtype).contiguous()
    rows = w.shape[0]
    row_loss = torch.empty(rows, dtype=out_dtype, device=pred.device)
    grad = torch.empty((rows, p) if need_grad else (0,), dtype=pred.dtype, device=pred.device)
    if rows == 0:
        return row_loss, grad.view(pred.shape) if need_grad else grad
    _masked_mse_kernel[(rows,)](
        pred2, target2, w, weight_sum.to(out_dtype).reshape(1), row_loss, grad, p,
        pred2.stride(0), target2.stride(0), grad.stride(0) if need_grad else 0,
        ACC=acc, NORM_PIX=norm_pix, NEED_GRAD=need_grad,
        BLOCK_P=max(16, min(_MAX_BLOCK_P, triton.next_power_of_2(p))),
        num_warps=8 if out_dtype == torch.float64 else 4,  # fp64 spills with 4 on sm_80, Triton 3.6
    )  # fmt: skip
    return row_loss, grad.view(pred.shape) if need_grad else grad
