"""InfoNCE with two towers in Triton: row and column log-sum-exps of S = QKᵀ/τ and their gradient.

Same contract as the C++ kernel (csrc/cpu/info_nce.cpp); fastssl/ops/info_nce.py calls
`info_nce_lse_fwd` and `info_nce_lse_bwd`. For unit rows q_i (M × D), k_j (N × D: keys, then any
extra negatives) and s_ij = q_i·k_j/τ,

    row_i = log Σ_j exp(s_ij),   col_j = log Σ_i exp(s_ij)

are the only parts of InfoNCE (Oord et al. 2018; MoCo, He et al. 2020) and of the symmetric
CLIP loss (Radford et al. 2021) that need all M·N pairs. With g_i = ∂L/∂row_i, h_j = ∂L/∂col_j,
P_ij = exp(s_ij − row_i), C_ij = exp(s_ij − col_j),

    A_ij = g_i P_ij + h_j C_ij,   ∂L/∂q_i = (1/τ) Σ_j A_ij k_j,   ∂L/∂k_j = (1/τ) Σ_i A_ij q_i,

and ∂L/∂(1/τ) = Σ_ij A_ij q_i·k_j. How the kernels compute them is docs/design.md: "InfoNCE"
(column runs, self pairs, row shift in base 2, gradients) and "Tile kernels" (fixed shift, row
shift, backward, temperature, runs, registers and atomics, precision); the comments below cite
those paragraphs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from fastssl.kernels._launch import block_size, launcher, program_target
from fastssl.kernels._tiles import (
    LN2,
    block_rows,
    check_matrix,
    dot_dtypes,
    fixed_shift_applies,
    load_rows,
    temperature_args,
    temperature_scales,
    tile_config,
    tile_dots,
    times_log2e,
)
from torch import Tensor

# Launch configurations, (BLOCK, BLOCK_D, num_warps, num_stages) per kernel and dtype, BLOCK being
# BLOCK_M and BLOCK_N: the first when D fits in one BLOCK_D chunk (the q rows loaded once, ∂L/∂q_I
# kept in registers) or None where that variant spills, the second for D in chunks
# (docs/design.md, "Tile kernels": launch configurations). For fp32 and fp64 forward and backward
# share BLOCK and BLOCK_D ("forward matches backward"). Tests may replace the table to exercise
# many tiles on small inputs.
_CONFIGS = {
    ("fwd", torch.bfloat16): ((128, 128, 8, 3), (32, 64, 4, 2)),
    ("fwd", torch.float16): ((128, 128, 8, 3), (32, 64, 4, 2)),
    ("fwd", torch.float32): ((32, 32, 4, 2), (32, 32, 4, 2)),
    ("fwd", torch.float64): ((32, 32, 4, 3), (32, 32, 4, 3)),
    ("bwd", torch.bfloat16): ((64, 64, 4, 2), (32, 32, 4, 1)),
    ("bwd", torch.float16): ((64, 64, 8, 2), (32, 32, 4, 1)),
    ("bwd", torch.float32): (None, (32, 32, 4, 1)),
    ("bwd", torch.float64): (None, (32, 32, 4, 1)),
}
# With HAS_SELF (self_offset ≥ 0: NT-Xent rows against every rank's, DCL) the mask of the self
# pairs holds more registers: the compile check found 8-328 B of spills with the tiles above, so
# these variants take smaller tiles or fewer stages (fp32 and fp64 keep forward and backward alike).
_SELF_CONFIGS = {
    **_CONFIGS,
    ("fwd", torch.bfloat16): ((64, 64, 4, 2), (32, 64, 4, 2)),
    ("fwd", torch.float16): ((64, 64, 4, 2), (32, 64, 4, 2)),
    ("fwd", torch.float32): ((32, 32, 4, 1), (32, 32, 4, 1)),
    ("fwd", torch.float64): ((16, 16, 4, 3), (16, 16, 4, 3)),
    ("bwd", torch.bfloat16): ((32, 64, 4, 1), (32, 32, 4, 1)),
    ("bwd", torch.float16): (None, (32, 32, 4, 1)),
    ("bwd", torch.float64): (None, (16, 16, 4, 1)),
}


@triton.jit
def _program_tiles(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's row block I (rows and mask) and its run [j_start, j_end) of column blocks
    (docs/design.md, "InfoNCE": column runs)."""
    I = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    parts = tl.num_programs(1).to(tl.int64)
    T = tl.cdiv(N, BLOCK_N)
    rows_i = I * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows_i, rows_i < M, T * part // parts, T * (part + 1) // parts


@triton.jit
def _tile(
    Q_ptr,
    K_ptr,
    q_i,
    rows_i,
    ok_i,
    J,
    N,
    D,
    Q_stride_m,
    Q_stride_d,
    K_stride_n,
    K_stride_d,
    self_offset,
    ACC: tl.constexpr,
    Z_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr,
    HAS_SELF: tl.constexpr,
):
    """Column block J against row block I: its rows and their mask, its k rows (with
    ONE_D_BLOCK, where q_i holds the I rows; else D goes in BLOCK_D chunks and k_j is a
    placeholder), the dots q_i·k_j, and the pairs that count (both rows in the matrix, and not a
    row against its own copy)."""
    rows_j = J * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_j = rows_j < N
    dots, k_j = tile_dots(
        Q_ptr, K_ptr, q_i, rows_i, ok_i, rows_j, ok_j, D, Q_stride_m, Q_stride_d, K_stride_n, K_stride_d,
        ACC, Z_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, ONE_D_BLOCK,
    )  # fmt: skip
    keep = ok_i[:, None] & ok_j[None, :]
    if HAS_SELF:
        keep = keep & (rows_j[None, :] != rows_i[:, None] + self_offset)
    return rows_j, ok_j, k_j, dots, keep


@triton.jit
def _info_nce_lse_fwd_kernel(
    Q_ptr,
    K_ptr,
    RowOut_ptr,  # [M] ACC: row sums (zeros in), or with WRITE_MAX the row max (−∞ in)
    ColOut_ptr,  # [N] ACC: the same for columns, when WITH_COLS
    RowShift_ptr,  # [M] ACC: row max from the WRITE_MAX pass, read when ROW_SHIFT
    ColShift_ptr,  # [N] ACC: column max, read when ROW_SHIFT and WITH_COLS
    M,
    N,
    D,
    Q_stride_m,
    Q_stride_d,
    K_stride_n,
    K_stride_d,
    self_offset,
    InvTau_ptr,  # [1] 1/τ, read when TAU_PTR
    scale_hi,  # k = log₂e/τ as an fp32 hi/lo pair
    scale_lo,
    inv_tau_hi,  # 1/τ as an fp32 hi/lo pair
    inv_tau_lo,
    ACC: tl.constexpr,
    Z_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr,  # D <= BLOCK_D: the q rows are loaded once per program
    WITH_COLS: tl.constexpr,
    HAS_SELF: tl.constexpr,
    ROW_SHIFT: tl.constexpr,
    WRITE_MAX: tl.constexpr,
    TAU_PTR: tl.constexpr,  # 1/τ from InvTau_ptr (a tensor temperature) instead of the hi/lo pairs
):
    rows_i, ok_i, j_start, j_end = _program_tiles(M, N, BLOCK_M, BLOCK_N)
    scale, _inv_tau = temperature_scales(InvTau_ptr, scale_hi, scale_lo, inv_tau_hi, inv_tau_lo, ACC, TAU_PTR)
    if WRITE_MAX:
        acc_i = tl.full([BLOCK_M], float("-inf"), ACC)
    else:
        acc_i = tl.zeros([BLOCK_M], ACC)
    if ROW_SHIFT:
        shift_i = tl.load(RowShift_ptr + rows_i, mask=ok_i, other=0.0)
    q_i = block_rows(Q_ptr, rows_i, ok_i, D, Q_stride_m, Q_stride_d, Z_DOT, BLOCK_M, BLOCK_D, ONE_D_BLOCK)
    for J in range(j_start, j_end):
        rows_j, ok_j, _k_j, dots, keep = _tile(
            Q_ptr, K_ptr, q_i, rows_i, ok_i, J, N, D, Q_stride_m, Q_stride_d, K_stride_n, K_stride_d, self_offset,
            ACC, Z_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, ONE_D_BLOCK, HAS_SELF,
        )  # fmt: skip
        if WRITE_MAX:
            # row shift, first pass: t_ij = s_ij·log₂e; row max in registers, column max by atomic max
            t = tl.where(keep, dots * scale, float("-inf"))
            acc_i = tl.maximum(acc_i, tl.max(t, axis=1))
            if WITH_COLS:
                tl.atomic_max(ColOut_ptr + rows_j, tl.max(t, axis=0), mask=ok_j, sem="relaxed")
        elif ROW_SHIFT:
            # row shift: 2^{t_ij − max_i} for row i, 2^{t_ij − max_j} for column j (exponents ≤ 0 on kept
            # pairs; the clamp keeps masked lanes finite)
            t = dots * scale
            acc_i += tl.sum(tl.where(keep, tl.exp2(tl.minimum(t - shift_i[:, None], 0.0)), 0.0), axis=1)
            if WITH_COLS:
                shift_j = tl.load(ColShift_ptr + rows_j, mask=ok_j, other=0.0)
                e_col = tl.where(keep, tl.exp2(tl.minimum(t - shift_j[None, :], 0.0)), 0.0)
                tl.atomic_add(ColOut_ptr + rows_j, tl.sum(e_col, axis=0), mask=ok_j, sem="relaxed")
        else:
            # fixed shift: e_ij = 2^{(q_i·k_j − 1)·k}, once per pair, for row i and column j
            e = tl.where(keep, tl.exp2(dots * scale - scale), 0.0)
            acc_i += tl.sum(e, axis=1)
            if WITH_COLS:
                tl.atomic_add(ColOut_ptr + rows_j, tl.sum(e, axis=0), mask=ok_j, sem="relaxed")
    if j_start < j_end:
        if WRITE_MAX:
            tl.atomic_max(RowOut_ptr + rows_i, acc_i, mask=ok_i, sem="relaxed")
        else:
            tl.atomic_add(RowOut_ptr + rows_i, acc_i, mask=ok_i, sem="relaxed")


@triton.jit
def _info_nce_lse_bwd_kernel(
    Q_ptr,
    K_ptr,
    G_ptr,  # [M] ∂L/∂row (contiguous)
    H_ptr,  # [N] ∂L/∂col (contiguous), read when WITH_COLS
    RowLse_ptr,  # [M] row_i from the forward
    ColLse_ptr,  # [N] col_j from the forward, read when WITH_COLS
    DQ_ptr,  # [M, D] ACC, zeros in
    DK_ptr,  # [N, D] ACC, zeros in
    DInvTau_ptr,  # [1] ACC, zero in: Σ_ij A_ij q_i·k_j·(1/τ)
    M,
    N,
    D,
    Q_stride_m,
    Q_stride_d,
    K_stride_n,
    K_stride_d,
    self_offset,
    InvTau_ptr,  # [1] 1/τ, read when TAU_PTR
    scale_hi,  # k = log₂e/τ as an fp32 hi/lo pair
    scale_lo,
    inv_tau_hi,  # 1/τ as an fp32 hi/lo pair
    inv_tau_lo,
    ACC: tl.constexpr,
    Z_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    A_DTYPE: tl.constexpr,  # A is rounded to this dtype ...
    A_DOT: tl.constexpr,  # ... and enters the products A·K, Aᵀ·Q in this one
    A_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr,  # D <= BLOCK_D: q_I loaded once, ∂L/∂q_I kept in registers
    WITH_COLS: tl.constexpr,
    HAS_SELF: tl.constexpr,
    ROW_SHIFT: tl.constexpr,
    TAU_PTR: tl.constexpr,  # 1/τ from InvTau_ptr (a tensor temperature) instead of the hi/lo pairs
):
    rows_i, ok_i, j_start, j_end = _program_tiles(M, N, BLOCK_M, BLOCK_N)
    scale, inv_tau = temperature_scales(InvTau_ptr, scale_hi, scale_lo, inv_tau_hi, inv_tau_lo, ACC, TAU_PTR)
    cols = tl.arange(0, BLOCK_D)
    g_i = tl.load(G_ptr + rows_i, mask=ok_i, other=0.0).to(ACC) * inv_tau
    row2_i = times_log2e(tl.load(RowLse_ptr + rows_i, mask=ok_i, other=0.0).to(ACC))
    if not ROW_SHIFT:
        u_i = g_i * tl.exp2(scale - row2_i)  # backward, fixed shift: u_i = (g_i/τ)·exp(m − row_i)
    q_i = block_rows(Q_ptr, rows_i, ok_i, D, Q_stride_m, Q_stride_d, Z_DOT, BLOCK_M, BLOCK_D, ONE_D_BLOCK)
    if ONE_D_BLOCK:
        dq_i = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    d_inv_tau = tl.zeros([BLOCK_M], ACC)
    for J in range(j_start, j_end):
        rows_j, ok_j, k_j, dots, keep = _tile(
            Q_ptr, K_ptr, q_i, rows_i, ok_i, J, N, D, Q_stride_m, Q_stride_d, K_stride_n, K_stride_d, self_offset,
            ACC, Z_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, ONE_D_BLOCK, HAS_SELF,
        )  # fmt: skip
        if WITH_COLS:
            h_j = tl.load(H_ptr + rows_j, mask=ok_j, other=0.0).to(ACC) * inv_tau
            col2_j = times_log2e(tl.load(ColLse_ptr + rows_j, mask=ok_j, other=0.0).to(ACC))
        if ROW_SHIFT:
            # backward, row shift: each exponent is ≤ 0 on kept pairs (s_ij ≤ row_i, col_j); the clamp
            # keeps masked lanes finite
            t = dots * scale
            a = g_i[:, None] * tl.exp2(tl.minimum(t - row2_i[:, None], 0.0))
            if WITH_COLS:
                a += h_j[None, :] * tl.exp2(tl.minimum(t - col2_j[None, :], 0.0))
        else:
            # backward, fixed shift: A_ij = e_ij·(u_i + v_j), one exponential per pair
            w = u_i[:, None]
            if WITH_COLS:
                w = w + (h_j * tl.exp2(scale - col2_j))[None, :]
            a = tl.exp2(dots * scale - scale) * w
        a = tl.where(keep, a, 0.0)
        d_inv_tau += tl.sum(a * dots, axis=1)
        a = a.to(A_DTYPE).to(A_DOT)
        # ∂L/∂q_I += A K_J, ∂L/∂k_J += Aᵀ Q_I
        if ONE_D_BLOCK:
            dq_i = tl.dot(a, k_j.to(A_DOT), dq_i, input_precision=A_PRECISION, out_dtype=ACC)
            dk_j = tl.dot(tl.trans(a), q_i.to(A_DOT), input_precision=A_PRECISION, out_dtype=ACC)
            ptrs = DK_ptr + rows_j[:, None] * D + cols[None, :]
            tl.atomic_add(ptrs, dk_j, mask=ok_j[:, None] & (cols < D)[None, :], sem="relaxed")
        else:
            for d0 in range(0, D, BLOCK_D):
                ok_d = (d0 + cols) < D
                kj = load_rows(K_ptr, rows_j, ok_j, d0, D, K_stride_n, K_stride_d, BLOCK_D, A_DOT)
                part_i = tl.dot(a, kj, input_precision=A_PRECISION, out_dtype=ACC)
                ptrs = DQ_ptr + rows_i[:, None] * D + (d0 + cols)[None, :]
                tl.atomic_add(ptrs, part_i, mask=ok_i[:, None] & ok_d[None, :], sem="relaxed")
                qi = load_rows(Q_ptr, rows_i, ok_i, d0, D, Q_stride_m, Q_stride_d, BLOCK_D, A_DOT)
                part_j = tl.dot(tl.trans(a), qi, input_precision=A_PRECISION, out_dtype=ACC)
                ptrs = DK_ptr + rows_j[:, None] * D + (d0 + cols)[None, :]
                tl.atomic_add(ptrs, part_j, mask=ok_j[:, None] & ok_d[None, :], sem="relaxed")
    if j_start < j_end:
        tl.atomic_add(DInvTau_ptr, tl.sum(d_inv_tau, axis=0), sem="relaxed")
        if ONE_D_BLOCK:
            ptrs = DQ_ptr + rows_i[:, None] * D + cols[None, :]
            tl.atomic_add(ptrs, dq_i, mask=ok_i[:, None] & (cols < D)[None, :], sem="relaxed")


# ---------------------------------------------------------------------------------------------
# launch helpers


def _check_rows(fn: str, name: str, x: Tensor, n: int, ref: Tensor) -> Tensor:
    if x.shape != (n,):
        raise ValueError(f"{fn}: {name} must have shape ({n},), got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {x.device} but q is on {ref.device}")
    return x.contiguous()


def _check_qk(fn: str, q: Tensor, k: Tensor) -> None:
    check_matrix(fn, q)
    check_matrix(fn, k)
    if q.shape[1] != k.shape[1] or q.dtype != k.dtype or q.device != k.device:
        raise ValueError(
            f"{fn}: q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} must share D, dtype, device"
        )


def _launch(q: Tensor, k: Tensor, kernel: str, has_self: bool) -> dict:
    """Block sizes, warps, stages and grid (column runs) for q [M, D] against k [N, D] (see _CONFIGS)."""
    (m, d), n = q.shape, k.shape[0]
    configs = _SELF_CONFIGS if has_self else _CONFIGS
    block, block_d, one_d, num_warps, num_stages = tile_config(configs, kernel, q.dtype, d)
    block_m, block_n = block_size(m, block), block_size(n, block)
    row_blocks, col_blocks = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    target = program_target(q.device)
    parts = max(1, min(col_blocks, triton.cdiv(target, row_blocks)))
    return dict(
        grid=(row_blocks, parts),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        ONE_D_BLOCK=one_d,
        num_warps=num_warps if block_m * block_n >= 64 * 64 else 4,
        num_stages=num_stages,
    )


@launcher
def info_nce_lse_fwd(
    q: Tensor, k: Tensor, inv_tau: float | Tensor, with_cols: bool, self_offset: int
) -> tuple[Tensor, Tensor]:
    """row_i = log Σ_j exp(inv_tau·q_i·k_j) [M] and, with `with_cols`, col_j = log Σ_i exp(...) [N]
    (else an empty tensor) for unit rows q, k; pairs (i, i + self_offset) left out when self_offset ≥ 0.
    inv_tau: a float, or a one-element tensor on q's device (never read on the host).
    fp32 (fp64 for fp64 input); an empty sum gives −inf."""
    _check_qk("info_nce_lse_fwd", q, k)
    (m, d), n = q.shape, k.shape[0]
    acc_dtype, dtypes = dot_dtypes(q)
    row_sums = torch.zeros(m, dtype=acc_dtype, device=q.device)
    col_sums = torch.zeros(n if with_cols else 0, dtype=acc_dtype, device=q.device)
    if m == 0 or n == 0:
        return row_sums.log_(), col_sums.log_()
    launch = _launch(q, k, "fwd", self_offset >= 0)
    grid = launch.pop("grid")
    tau_args, tau_meta = temperature_args(inv_tau, acc_dtype, row_sums)
    meta = dict(
        ACC=dtypes["ACC"],
        Z_DOT=dtypes["Z_DOT"],
        DOT_PRECISION=dtypes["DOT_PRECISION"],
        WITH_COLS=bool(with_cols),
        HAS_SELF=self_offset >= 0,
        **tau_meta,
        **launch,
    )
    args = (m, n, d, q.stride(0), q.stride(1), k.stride(0), k.stride(1), self_offset, *tau_args)
    if fixed_shift_applies(inv_tau):
        _info_nce_lse_fwd_kernel[grid](
            q, k, row_sums, col_sums, row_sums, col_sums, *args, ROW_SHIFT=False, WRITE_MAX=False, **meta
        )
        return row_sums.log_().add_(inv_tau), col_sums.log_().add_(inv_tau)
    # row shift: per-row and per-column maxima (in log₂ units), then the shifted sums
    row_max = torch.full_like(row_sums, -math.inf)
    col_max = torch.full_like(col_sums, -math.inf)
    _info_nce_lse_fwd_kernel[grid](
        q, k, row_max, col_max, row_max, col_max, *args, ROW_SHIFT=False, WRITE_MAX=True, **meta
    )
    _info_nce_lse_fwd_kernel[grid](
        q, k, row_sums, col_sums, row_max, col_max, *args, ROW_SHIFT=True, WRITE_MAX=False, **meta
    )
    return row_sums.log_().add_(row_max, alpha=LN2), col_sums.log_().add_(col_max, alpha=LN2)


@launcher
def info_nce_lse_bwd(
    grad_row: Tensor,
    grad_col: Tensor,
    q: Tensor,
    k: Tensor,
    row_lse: Tensor,
    col_lse: Tensor,
    inv_tau: float | Tensor,
    self_offset: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(∂L/∂q, ∂L/∂k) in the dtype of q, and ∂L/∂(1/τ) (0-dim, fp32 or fp64); the column
    terms only when col_lse is not empty. inv_tau as in info_nce_lse_fwd."""
    _check_qk("info_nce_lse_bwd", q, k)
    (m, d), n = q.shape, k.shape[0]
    with_cols = col_lse.numel() > 0
    grad_row = _check_rows("info_nce_lse_bwd", "grad_row", grad_row, m, q)
    row_lse = _check_rows("info_nce_lse_bwd", "row_lse", row_lse, m, q)
    if with_cols:
        grad_col = _check_rows("info_nce_lse_bwd", "grad_col", grad_col, n, q)
        col_lse = _check_rows("info_nce_lse_bwd", "col_lse", col_lse, n, q)
    else:  # placeholders, never read
        grad_col, col_lse = grad_row, row_lse
    acc_dtype, dtypes = dot_dtypes(q)
    dq = torch.zeros((m, d), dtype=acc_dtype, device=q.device)
    dk = torch.zeros((n, d), dtype=acc_dtype, device=q.device)
    d_inv_tau = torch.zeros(1, dtype=acc_dtype, device=q.device)
    if m and n:
        launch = _launch(q, k, "bwd", self_offset >= 0)
        grid = launch.pop("grid")
        tau_args, tau_meta = temperature_args(inv_tau, acc_dtype, d_inv_tau)
        _info_nce_lse_bwd_kernel[grid](
            q, k, grad_row, grad_col, row_lse, col_lse, dq, dk, d_inv_tau,
            m, n, d, q.stride(0), q.stride(1), k.stride(0), k.stride(1), self_offset, *tau_args,
            **dtypes,
            WITH_COLS=with_cols,
            HAS_SELF=self_offset >= 0,
            ROW_SHIFT=not fixed_shift_applies(inv_tau),
            **tau_meta,
            **launch,
        )  # fmt: skip
    return dq.to(q.dtype), dk.to(k.dtype), (d_inv_tau / inv_tau).squeeze(0)
