"""InfoNCE with two towers in Triton: row and column log-sum-exps of S = QKᵀ/τ and their gradient.

Same contract as the C++ kernel (csrc/cpu/info_nce.cpp); fastssl/ops/info_nce.py calls
`info_nce_lse_fwd` and `info_nce_lse_bwd`. For unit rows q_i (M × D), k_j (N × D: keys, then any
extra negatives) and s_ij = q_i·k_j/τ,

    row_i = log Σ_j exp(s_ij),   col_j = log Σ_i exp(s_ij)                                   (1)

are the only parts of InfoNCE (Oord et al. 2018; MoCo, He et al. 2020) and of the symmetric
CLIP loss (Radford et al. 2021) that need all M·N pairs. With HAS_SELF the pairs
(i, i + self_offset) are left out (NT-Xent rows against every rank's rows, where row i meets its
own copy). With g_i = ∂L/∂row_i, h_j = ∂L/∂col_j, P_ij = exp(s_ij − row_i), C_ij = exp(s_ij − col_j),

    A_ij = g_i P_ij + h_j C_ij,   ∂L/∂q_i = (1/τ) Σ_j A_ij k_j,   ∂L/∂k_j = (1/τ) Σ_i A_ij q_i.   (2)

s is linear in 1/τ, so ∂L/∂(1/τ) = Σ_ij A_ij q_i·k_j: the backward sums it from the fp32 tiles of A,
before A is rounded for the products of (2) (for bf16 that rounding would lose the gradient of a
saturated softmax, a difference of nearly equal terms).

How the kernels compute them (docs/design.md, "Tile kernels" and "InfoNCE"; kernels/ntxent.py has the same
numbered steps for one tower):

 3. Tiles. Program (I, part) takes row block I and a contiguous run of the column blocks (the
    runs split the columns so that a few row blocks, e.g. MoCo's queries against a long queue,
    still fill the GPU). Row-side results of I (row sums, row max, and ∂L/∂q_I when D fits one
    BLOCK_D chunk) accumulate in registers and are added once at the run's end; column-side
    results of J (column sums and maxima, ∂L/∂k_J) go through fp32 (fp64) atomics into zero- (or
    −∞-) initialised buffers: race-free, but order-dependent in the last bits.
 4. Fixed shift. Rows are unit vectors, so s_ij ≤ m = 1/τ and e_ij = exp(s_ij − m) ≤ 1 needs no
    running max; one exponential per pair feeds row i and column j. In base 2 with
    k = log₂e/τ: e_ij = 2^{(q_i·k_j − 1)·k}. Exact while 2/τ ≤ 80 (e_ij ≥ exp(−2/τ) is a normal
    fp32 number).
 5. Row shift (2/τ > 80): a WRITE_MAX pass writes each row's and column's max t_ij = s_ij·log₂e,
    and the sums use 2^{t_ij − max} (two exponentials per pair when columns are wanted).
 6. Backward, fixed shift: P_ij = e_ij c_i, C_ij = e_ij d_j with c_i = exp(m − row_i) and
    d_j = exp(m − col_j) ≤ exp(2/τ), so A_ij = e_ij (u_i + v_j), u_i = g_i c_i/τ, v_j = h_j d_j/τ:
    one exponential per pair. Row shift: A_ij = (g_i/τ) 2^{t_ij − row_i·log₂e} + (h_j/τ) 2^{t_ij − col_j·log₂e}.
 7. Precision as in kernels/ntxent.py (8): tl.dot in the input dtype with fp32 accumulation
    (tf32x3 for fp32, fp64 for fp64), A rounded like flash-attention's P, scalars as fp32 hi/lo pairs.

Memory: O((M + N)·D), never an M × N matrix. Inputs are read through their strides.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from fastssl.kernels._launch import MIN_BLOCK, launcher, program_target
from fastssl.kernels._tiles import (
    LN2,
    LOG2E,
    block_rows,
    check_matrix,
    dot_dtypes,
    fixed_shift_is_exact,
    hi_lo,
    load_rows,
    scalar,
    tile_dots,
    times_log2e,
)
from torch import Tensor

# Block sizes: the largest power of two up to these caps, at least 16 (tl.dot's minimum).
# Module constants so that tests can shrink them to exercise many tiles on small inputs.
_FWD_BLOCK = 128
_BWD_BLOCK = 64
_FP64_BLOCK = 64
_MAX_BLOCK_D = {2: 128, 4: 64, 8: 32}  # by element size: bf16/fp16, fp32, fp64

@triton.jit
def _program_tiles(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's row block I (rows and mask) and its run [j_start, j_end) of column blocks (3)."""
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
    """Column block J against row block I (3): its rows and their mask, its k rows (with
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
    scale_hi,  # k = log₂e/τ as an fp32 hi/lo pair
    scale_lo,
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
):
    rows_i, ok_i, j_start, j_end = _program_tiles(M, N, BLOCK_M, BLOCK_N)
    scale = scalar(scale_hi, scale_lo, ACC)
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
            # (5) t_ij = s_ij·log₂e; row max in registers, column max by atomic max
            t = tl.where(keep, dots * scale, float("-inf"))
            acc_i = tl.maximum(acc_i, tl.max(t, axis=1))
            if WITH_COLS:
                tl.atomic_max(ColOut_ptr + rows_j, tl.max(t, axis=0), mask=ok_j, sem="relaxed")
        elif ROW_SHIFT:
            # (5) 2^{t_ij − max_i} for row i, 2^{t_ij − max_j} for column j (exponents ≤ 0 on kept
            # pairs; the clamp keeps masked lanes finite)
            t = dots * scale
            acc_i += tl.sum(tl.where(keep, tl.exp2(tl.minimum(t - shift_i[:, None], 0.0)), 0.0), axis=1)
            if WITH_COLS:
                shift_j = tl.load(ColShift_ptr + rows_j, mask=ok_j, other=0.0)
                e_col = tl.where(keep, tl.exp2(tl.minimum(t - shift_j[None, :], 0.0)), 0.0)
                tl.atomic_add(ColOut_ptr + rows_j, tl.sum(e_col, axis=0), mask=ok_j, sem="relaxed")
        else:
            # (4) e_ij = 2^{(q_i·k_j − 1)·k}, once per pair, for row i and column j
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
):
    rows_i, ok_i, j_start, j_end = _program_tiles(M, N, BLOCK_M, BLOCK_N)
    scale = scalar(scale_hi, scale_lo, ACC)
    inv_tau = scalar(inv_tau_hi, inv_tau_lo, ACC)
    cols = tl.arange(0, BLOCK_D)
    g_i = tl.load(G_ptr + rows_i, mask=ok_i, other=0.0).to(ACC) * inv_tau
    row2_i = times_log2e(tl.load(RowLse_ptr + rows_i, mask=ok_i, other=0.0).to(ACC))
    if not ROW_SHIFT:
        u_i = g_i * tl.exp2(scale - row2_i)  # (6) u_i = (g_i/τ)·exp(m − row_i)
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
            # (6) each exponent is ≤ 0 on kept pairs (s_ij ≤ row_i, col_j); the clamp keeps masked lanes finite
            t = dots * scale
            a = g_i[:, None] * tl.exp2(tl.minimum(t - row2_i[:, None], 0.0))
            if WITH_COLS:
                a += h_j[None, :] * tl.exp2(tl.minimum(t - col2_j[None, :], 0.0))
        else:
            # (6) A_ij = e_ij·(u_i + v_j), one exponential per pair
            w = u_i[:, None]
            if WITH_COLS:
                w = w + (h_j * tl.exp2(scale - col2_j))[None, :]
            a = tl.exp2(dots * scale - scale) * w
        a = tl.where(keep, a, 0.0)
        d_inv_tau += tl.sum(a * dots, axis=1)
        a = a.to(A_DTYPE).to(A_DOT)
        # (2) ∂L/∂q_I += A K_J, ∂L/∂k_J += Aᵀ Q_I
        if ONE_D_BLOCK:
            dq_i = tl.dot(a, k_j.to(A_DOT), dq_i, input_precision=A_PRECISION)
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


def _launch(q: Tensor, k: Tensor, block_cap: int) -> dict:
    """Block sizes and grid (3) for q [M, D] against k [N, D]."""
    (m, d), n = q.shape, k.shape[0]
    if q.dtype == torch.float64:
        block_cap = min(block_cap, _FP64_BLOCK)
    block_m = max(MIN_BLOCK, min(block_cap, triton.next_power_of_2(m)))
    block_n = max(MIN_BLOCK, min(block_cap, triton.next_power_of_2(n)))
    block_d = max(MIN_BLOCK, min(_MAX_BLOCK_D[q.element_size()], triton.next_power_of_2(d)))
    row_blocks, col_blocks = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    target = program_target(q.device)
    parts = max(1, min(col_blocks, triton.cdiv(target, row_blocks)))
    return dict(
        grid=(row_blocks, parts),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        ONE_D_BLOCK=d <= block_d,
        num_warps=8 if block_m * block_n >= 128 * 128 else 4,
    )


@launcher
def info_nce_lse_fwd(q: Tensor, k: Tensor, inv_tau: float, with_cols: bool, self_offset: int) -> tuple[Tensor, Tensor]:
    """row_i = log Σ_j exp(inv_tau·q_i·k_j) [M] and, with `with_cols`, col_j = log Σ_i exp(...) [N]
    (else an empty tensor) for unit rows q, k; pairs (i, i + self_offset) left out when self_offset ≥ 0.
    fp32 (fp64 for fp64 input); an empty sum gives −inf."""
    _check_qk("info_nce_lse_fwd", q, k)
    inv_tau = float(inv_tau)
    (m, d), n = q.shape, k.shape[0]
    acc_dtype, dtypes = dot_dtypes(q)
    row_sums = torch.zeros(m, dtype=acc_dtype, device=q.device)
    col_sums = torch.zeros(n if with_cols else 0, dtype=acc_dtype, device=q.device)
    if m == 0 or n == 0:
        return row_sums.log_(), col_sums.log_()
    launch = _launch(q, k, _FWD_BLOCK)
    grid = launch.pop("grid")
    scale_hi, scale_lo = hi_lo(inv_tau * LOG2E)
    meta = dict(
        ACC=dtypes["ACC"],
        Z_DOT=dtypes["Z_DOT"],
        DOT_PRECISION=dtypes["DOT_PRECISION"],
        WITH_COLS=bool(with_cols),
        HAS_SELF=self_offset >= 0,
        **launch,
    )
    args = (m, n, d, q.stride(0), q.stride(1), k.stride(0), k.stride(1), self_offset, scale_hi, scale_lo)
    if fixed_shift_is_exact(inv_tau):
        _info_nce_lse_fwd_kernel[grid](
            q, k, row_sums, col_sums, row_sums, col_sums, *args, ROW_SHIFT=False, WRITE_MAX=False, **meta
        )
        return row_sums.log_().add_(inv_tau), col_sums.log_().add_(inv_tau)
    # (5) per-row and per-column shifts (in log₂ units), then the shifted sums
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
    inv_tau: float,
    self_offset: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(∂L/∂q, ∂L/∂k) of (2) in the dtype of q, and ∂L/∂(1/τ) (0-dim, fp32 or fp64); the column
    terms only when col_lse is not empty."""
    _check_qk("info_nce_lse_bwd", q, k)
    inv_tau = float(inv_tau)
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
        launch = _launch(q, k, _BWD_BLOCK)
        grid = launch.pop("grid")
        scale_hi, scale_lo = hi_lo(inv_tau * LOG2E)
        inv_tau_hi, inv_tau_lo = hi_lo(inv_tau)
        _info_nce_lse_bwd_kernel[grid](
            q, k, grad_row, grad_col, row_lse, col_lse, dq, dk, d_inv_tau,
            m, n, d, q.stride(0), q.stride(1), k.stride(0), k.stride(1), self_offset,
            scale_hi, scale_lo, inv_tau_hi, inv_tau_lo,
            **dtypes,
            WITH_COLS=with_cols,
            HAS_SELF=self_offset >= 0,
            ROW_SHIFT=not fixed_shift_is_exact(inv_tau),
            **launch,
        )  # fmt: skip
    return dq.to(q.dtype), dk.to(k.dtype), d_inv_tau.div_(inv_tau).squeeze(0)
