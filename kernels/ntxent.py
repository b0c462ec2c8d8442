"""NT-Xent in Triton: the row log-sum-exp of the self-similarity matrix and its gradient.

Same contract as the C++ kernel (csrc/cpu/ntxent.cpp); fastssl/ops/ntxent.py calls
`ntxent_lse_fwd` and `ntxent_lse_bwd`. For unit rows z_i (N × D) and s_ij = z_i·z_j/τ,

    lse_i = log Σ_{j≠i} exp(s_ij)

is the only part of the NT-Xent / SupCon loss (Chen et al. 2020, SimCLR; Khosla et al. 2020)
that needs all N² pairs. With g_i = ∂L/∂lse_i and P_ij = exp(s_ij − lse_i) (P_ii = 0),

    ∂L/∂z_i = (1/τ) Σ_{j≠i} (g_i P_ij + g_j P_ji) z_j = (1/τ) Σ_j A_ij z_j.

How the kernels compute them is docs/design.md: "NT-Xent" (symmetric tiles, pair schedule) and
"Tile kernels" (fixed shift, row shift, base 2, backward, runs, registers and atomics, precision,
forward matches backward, launch configurations); the comments below cite those paragraphs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from fastssl.kernels._launch import block_size, launcher, program_target
from fastssl.kernels._tiles import (
    LOG2E,
    block_rows,
    check_matrix,
    dot_dtypes,
    fixed_shift_is_exact,
    hi_lo,
    load_rows,
    scalar,
    tile_config,
    tile_dots,
)
from torch import Tensor

# Launch configurations, (BLOCK_N, BLOCK_D, num_warps, num_stages), per kernel and dtype: the first
# when D fits in one BLOCK_D chunk (z_I loaded once per segment, grad_I kept in registers) or None
# where that variant spills, the second for D in chunks (docs/design.md, "Tile kernels": launch
# configurations). For fp32 and fp64 forward and backward share BLOCK_N and BLOCK_D ("forward
# matches backward"; Triton's interpreter rounds a matmul differently for other tile shapes); for
# bf16 and fp16 the difference stays far below the output's precision. Tests may replace the table
# to exercise many tiles on small inputs.
_CONFIGS = {
    ("fwd", torch.bfloat16): ((128, 128, 8, 3), (32, 64, 4, 2)),
    ("fwd", torch.float16): ((128, 128, 8, 3), (32, 64, 4, 2)),
    ("fwd", torch.float32): ((32, 32, 4, 2), (32, 32, 4, 2)),
    ("fwd", torch.float64): (None, (32, 32, 4, 2)),
    ("bwd", torch.bfloat16): ((64, 64, 4, 3), (32, 32, 4, 1)),
    ("bwd", torch.float16): ((64, 64, 4, 3), (64, 64, 4, 3)),
    ("bwd", torch.float32): (None, (32, 32, 4, 1)),
    ("bwd", torch.float64): ((32, 32, 4, 2), (32, 32, 4, 1)),
}


@triton.jit
def _segment(pair, seg, parts, part, N, BLOCK_N: tl.constexpr):
    """Row block I and its column blocks [j_start, j_end) for one of a program's two segments
    (docs/design.md, "NT-Xent": pair schedule)."""
    T = tl.cdiv(N, BLOCK_N)
    lo_blk = pair
    hi_blk = T - 1 - pair
    n_lo = T - pair  # tiles (lo_blk, J) for J = lo_blk .. T-1
    n_hi = tl.where(hi_blk > lo_blk, pair + 1, 0)  # tiles (hi_blk, J) for J = hi_blk .. T-1
    total = n_lo + n_hi
    t0 = total * part // parts
    t1 = total * (part + 1) // parts
    if seg == 0:
        I = lo_blk
        j_start = lo_blk + t0
        j_end = lo_blk + tl.minimum(t1, n_lo)
    else:
        I = hi_blk
        j_start = hi_blk + tl.maximum(t0, n_lo) - n_lo
        j_end = hi_blk + t1 - n_lo
    return I, j_start, j_end


@triton.jit
def _ntxent_lse_fwd_kernel(
    Z_ptr,
    Out_ptr,  # [N] ACC: row sums (zeros in), or with WRITE_MAX the row max M (−∞ in)
    Shift_ptr,  # [N] ACC: M from the WRITE_MAX pass, read when ROW_SHIFT
    N,
    D,
    Z_stride_n,
    Z_stride_d,
    scale_hi,  # k = log₂e/τ as an fp32 hi/lo pair ("Tile kernels": temperature)
    scale_lo,
    inv_tau_hi,  # 1/τ as an fp32 hi/lo pair
    inv_tau_lo,
    ACC: tl.constexpr,
    Z_DOT: tl.constexpr,  # operand dtype of z_i·z_j: z's own, or fp32 for bf16 when interpreted
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr,  # D <= BLOCK_D: the I rows are loaded once per segment
    ROW_SHIFT: tl.constexpr,
    WRITE_MAX: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    parts = tl.num_programs(1).to(tl.int64)
    scale = scalar(scale_hi, scale_lo, ACC)
    inv_tau = scalar(inv_tau_hi, inv_tau_lo, ACC)
    offs = tl.arange(0, BLOCK_N)
    for seg in range(2):
        I, j_start, j_end = _segment(pair, seg, parts, part, N, BLOCK_N)
        rows_i = I * BLOCK_N + offs
        ok_i = rows_i < N
        if WRITE_MAX:
            acc_i = tl.full([BLOCK_N], float("-inf"), ACC)
        else:
            acc_i = tl.zeros([BLOCK_N], ACC)
        if ROW_SHIFT:
            shift_i = tl.load(Shift_ptr + rows_i, mask=ok_i, other=0.0)
        z_i = block_rows(Z_ptr, rows_i, ok_i, D, Z_stride_n, Z_stride_d, Z_DOT, BLOCK_N, BLOCK_D, ONE_D_BLOCK)
        for J in range(j_start, j_end):
            rows_j = J * BLOCK_N + offs
            ok_j = rows_j < N
            dots, _z_j = tile_dots(
                Z_ptr, Z_ptr, z_i, rows_i, ok_i, rows_j, ok_j, D, Z_stride_n, Z_stride_d, Z_stride_n, Z_stride_d,
                ACC, Z_DOT, DOT_PRECISION, BLOCK_N, BLOCK_N, BLOCK_D, ONE_D_BLOCK,
            )  # fmt: skip
            # pairs that count: both rows inside the matrix, and i ≠ j on the diagonal tile
            keep = ok_i[:, None] & ok_j[None, :] & ((I != J) | (offs[:, None] != offs[None, :]))
            if WRITE_MAX:
                # row shift, first pass: row max of s here, column max of block J by atomic max
                s = tl.where(keep, dots * inv_tau, float("-inf"))
                acc_i = tl.maximum(acc_i, tl.max(s, axis=1))
                if I != J:
                    tl.atomic_max(Out_ptr + rows_j, tl.max(s, axis=0), mask=ok_j, sem="relaxed")
            elif ROW_SHIFT:
                # row shift: two exponentials per pair, exp(s_ij − M_i) for row i, exp(s_ij − M_j) for row j.
                # s is rounded exactly as in the WRITE_MAX pass (the where between the product and
                # the subtraction keeps them from fusing into an fma), so s_ij − M_i ≤ 0; masked
                # pairs give exp(−∞) = 0.
                s = tl.where(keep, dots * inv_tau, float("-inf"))
                acc_i += tl.sum(tl.exp(s - shift_i[:, None]), axis=1)
                if I != J:
                    shift_j = tl.load(Shift_ptr + rows_j, mask=ok_j, other=0.0)
                    e_col = tl.exp(s - shift_j[None, :])
                    tl.atomic_add(Out_ptr + rows_j, tl.sum(e_col, axis=0), mask=ok_j, sem="relaxed")
            else:
                # fixed shift: e_ij = 2^{z_i·z_j·k − k}, once per pair, for row i and row j
                e = tl.where(keep, tl.exp2(dots * scale - scale), 0.0)
                acc_i += tl.sum(e, axis=1)
                if I != J:
                    tl.atomic_add(Out_ptr + rows_j, tl.sum(e, axis=0), mask=ok_j, sem="relaxed")
        if j_start < j_end:
            if WRITE_MAX:
                tl.atomic_max(Out_ptr + rows_i, acc_i, mask=ok_i, sem="relaxed")
            else:
                tl.atomic_add(Out_ptr + rows_i, acc_i, mask=ok_i, sem="relaxed")


@triton.jit
def _ntxent_lse_bwd_kernel(
    Z_ptr,
    G_ptr,  # [N] ∂L/∂lse
    Lse_ptr,  # [N] lse from the forward
    Grad_ptr,  # [N, D] ACC, zeros in: ∂L/∂z accumulates here
    N,
    D,
    Z_stride_n,
    Z_stride_d,
    G_stride_n,
    Lse_stride_n,
    Grad_stride_n,
    Grad_stride_d,
    scale_hi,  # k = log₂e/τ as an fp32 hi/lo pair ("Tile kernels": temperature)
    scale_lo,
    inv_tau_hi,  # 1/τ as an fp32 hi/lo pair
    inv_tau_lo,
    ACC: tl.constexpr,
    Z_DOT: tl.constexpr,  # operand dtype of z_i·z_j: z's own, or fp32 for bf16 when interpreted
    DOT_PRECISION: tl.constexpr,
    A_DTYPE: tl.constexpr,  # A is rounded to this dtype ("Tile kernels": precision) ...
    A_DOT: tl.constexpr,  # ... and enters the products A·Z in this one, with z
    A_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr,  # D <= BLOCK_D: z_I loaded once, grad_I kept in registers
    ROW_SHIFT: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    parts = tl.num_programs(1).to(tl.int64)
    scale = scalar(scale_hi, scale_lo, ACC)
    inv_tau = scalar(inv_tau_hi, inv_tau_lo, ACC)
    offs = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    for seg in range(2):
        I, j_start, j_end = _segment(pair, seg, parts, part, N, BLOCK_N)
        rows_i = I * BLOCK_N + offs
        ok_i = rows_i < N
        g_i = tl.load(G_ptr + rows_i * G_stride_n, mask=ok_i, other=0.0).to(ACC) * inv_tau
        lse_i = tl.load(Lse_ptr + rows_i * Lse_stride_n, mask=ok_i, other=0.0).to(ACC)
        if not ROW_SHIFT:
            # backward, fixed shift: u_i = (g_i/τ)·exp(m − lse_i), m = 1/τ
            u_i = g_i * tl.exp(inv_tau - lse_i)
        z_i = block_rows(Z_ptr, rows_i, ok_i, D, Z_stride_n, Z_stride_d, Z_DOT, BLOCK_N, BLOCK_D, ONE_D_BLOCK)
        if ONE_D_BLOCK:
            grad_i = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        for J in range(j_start, j_end):
            rows_j = J * BLOCK_N + offs
            ok_j = rows_j < N
            dots, z_j = tile_dots(
                Z_ptr, Z_ptr, z_i, rows_i, ok_i, rows_j, ok_j, D, Z_stride_n, Z_stride_d, Z_stride_n, Z_stride_d,
                ACC, Z_DOT, DOT_PRECISION, BLOCK_N, BLOCK_N, BLOCK_D, ONE_D_BLOCK,
            )  # fmt: skip
            keep = ok_i[:, None] & ok_j[None, :] & ((I != J) | (offs[:, None] != offs[None, :]))
            g_j = tl.load(G_ptr + rows_j * G_stride_n, mask=ok_j, other=0.0).to(ACC) * inv_tau
            lse_j = tl.load(Lse_ptr + rows_j * Lse_stride_n, mask=ok_j, other=0.0).to(ACC)
            if ROW_SHIFT:
                # backward, row shift: A_ij = (g_i/τ)·exp(s_ij − lse_i) + (g_j/τ)·exp(s_ji − lse_j), s
                # rounded as in the forward ("forward matches backward"); masked pairs give exp(−∞) = 0.
                # Off the diagonal s_ji is this entry's s_ij; on it, entry (j, i), which the forward
                # summed for row j (the two dot products may differ in the last bit): A = C + Cᵀ
                s = tl.where(keep, dots * inv_tau, float("-inf"))
                c = g_i[:, None] * tl.exp(s - lse_i[:, None])
                if I == J:
                    a = c + tl.trans(c)
                else:
                    a = c + g_j[None, :] * tl.exp(s - lse_j[None, :])
            else:
                # backward, fixed shift: A_ij = e_ij·(u_i + u_j), one exponential per pair
                u_j = g_j * tl.exp(inv_tau - lse_j)
                a = tl.where(keep, tl.exp2(dots * scale - scale) * (u_i[:, None] + u_j[None, :]), 0.0)
            a = a.to(A_DTYPE).to(A_DOT)
            # symmetric tiles: grad_I += A Z_J and, off the diagonal, grad_J += Aᵀ Z_I
            if ONE_D_BLOCK:
                grad_i = tl.dot(a, z_j.to(A_DOT), grad_i, input_precision=A_PRECISION, out_dtype=ACC)
                if I != J:
                    grad_j = tl.dot(tl.trans(a), z_i.to(A_DOT), input_precision=A_PRECISION, out_dtype=ACC)
                    ptrs = Grad_ptr + rows_j[:, None] * Grad_stride_n + cols[None, :] * Grad_stride_d
                    tl.atomic_add(ptrs, grad_j, mask=ok_j[:, None] & (cols < D)[None, :], sem="relaxed")
            else:
                for d0 in range(0, D, BLOCK_D):
                    ok_d = (d0 + cols) < D
                    zj = load_rows(Z_ptr, rows_j, ok_j, d0, D, Z_stride_n, Z_stride_d, BLOCK_D, A_DOT)
                    part_i = tl.dot(a, zj, input_precision=A_PRECISION, out_dtype=ACC)
                    ptrs = Grad_ptr + rows_i[:, None] * Grad_stride_n + (d0 + cols)[None, :] * Grad_stride_d
                    tl.atomic_add(ptrs, part_i, mask=ok_i[:, None] & ok_d[None, :], sem="relaxed")
                    if I != J:
                        zi = load_rows(Z_ptr, rows_i, ok_i, d0, D, Z_stride_n, Z_stride_d, BLOCK_D, A_DOT)
                        part_j = tl.dot(tl.trans(a), zi, input_precision=A_PRECISION, out_dtype=ACC)
                        ptrs = Grad_ptr + rows_j[:, None] * Grad_stride_n + (d0 + cols)[None, :] * Grad_stride_d
                        tl.atomic_add(ptrs, part_j, mask=ok_j[:, None] & ok_d[None, :], sem="relaxed")
        if ONE_D_BLOCK:
            if j_start < j_end:
                ptrs = Grad_ptr + rows_i[:, None] * Grad_stride_n + cols[None, :] * Grad_stride_d
                tl.atomic_add(ptrs, grad_i, mask=ok_i[:, None] & (cols < D)[None, :], sem="relaxed")


# ---------------------------------------------------------------------------------------------
# launch helpers


# triton.jit gave an interpreter stand-in instead of a JITFunction (TRITON_INTERPRET=1 at import)
def _check_rows(fn: str, name: str, x: Tensor, z: Tensor) -> None:
    if x.shape != (z.shape[0],):
        raise ValueError(f"{fn}: {name} must have shape ({z.shape[0]},), got {tuple(x.shape)}")
    if x.device != z.device:
        raise ValueError(f"{fn}: {name} is on {x.device} but z is on {z.device}")


def _launch_config(kernel: str, z: Tensor) -> dict:
    """BLOCK_N, BLOCK_D, ONE_D_BLOCK, num_warps and num_stages for z (see _CONFIGS)."""
    n, d = z.shape
    block_n, block_d, one_d, num_warps, num_stages = tile_config(_CONFIGS, kernel, z.dtype, d)
    block_n = block_size(n, block_n)
    return dict(
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        ONE_D_BLOCK=one_d,
        num_warps=num_warps if block_n >= 64 else 4,
        num_stages=num_stages,
    )


def _grid(n: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(pairs of row blocks, runs per pair) (docs/design.md, "NT-Xent": pair schedule)."""
    tiles = triton.cdiv(n, block_n)
    pairs = triton.cdiv(tiles, 2)
    target = program_target(device)
    parts = max(1, min(tiles + 1, triton.cdiv(target, pairs)))
    return pairs, parts


@launcher
def ntxent_lse_fwd(x: Tensor, r: Tensor, inv_tau: float) -> Tensor:
    """lse_i = log Σ_{j≠i} exp(inv_tau·z_i·z_j) for the unit rows z_i = r_i·x_i, given as rows x [N, D]
    and inverse norms r [N]; [N] fp32 (fp64 for fp64 x). The kernels take the unit rows, formed here
    (O(N·D)). A single row gives −inf (an empty sum).
    """
    check_matrix("ntxent_lse_fwd", x)
    _check_rows("ntxent_lse_fwd", "r", r, x)
    return _unit_lse_fwd(x * r.to(x.dtype)[:, None], inv_tau)


@launcher
def ntxent_lse_bwd(grad_lse: Tensor, x: Tensor, r: Tensor, lse: Tensor, inv_tau: float) -> Tensor:
    """dL/dx_i = r_i·dL/dz_i for the unit rows z_i = r_i·x_i (see ntxent_lse_fwd); x's dtype."""
    check_matrix("ntxent_lse_bwd", x)
    _check_rows("ntxent_lse_bwd", "r", r, x)
    r = r.to(x.dtype)[:, None]
    return _unit_lse_bwd(grad_lse, x * r, lse, inv_tau).mul_(r)


def _unit_lse_fwd(z: Tensor, inv_tau: float) -> Tensor:
    """lse_i = log Σ_{j≠i} exp(inv_tau·z_i·z_j) for unit rows z [N, D]; [N] fp32 (fp64 for fp64 z)."""
    inv_tau = float(inv_tau)
    n, d = z.shape
    acc_dtype, dtypes = dot_dtypes(z)
    if n <= 1:  # an empty sum (the row shift needs a finite row max)
        return torch.full((n,), -math.inf, dtype=acc_dtype, device=z.device)
    sums = torch.zeros(n, dtype=acc_dtype, device=z.device)
    config = _launch_config("fwd", z)
    grid = _grid(n, config["BLOCK_N"], z.device)
    meta = dict(ACC=dtypes["ACC"], Z_DOT=dtypes["Z_DOT"], DOT_PRECISION=dtypes["DOT_PRECISION"], **config)
    args = (n, d, z.stride(0), z.stride(1), *hi_lo(inv_tau * LOG2E), *hi_lo(inv_tau))
    if fixed_shift_is_exact(inv_tau):
        _ntxent_lse_fwd_kernel[grid](z, sums, sums, *args, ROW_SHIFT=False, WRITE_MAX=False, **meta)
        return sums.log_().add_(inv_tau)
    # row shift: per-row max M_i, then the shifted sums
    row_max = torch.full((n,), -math.inf, dtype=acc_dtype, device=z.device)
    _ntxent_lse_fwd_kernel[grid](z, row_max, row_max, *args, ROW_SHIFT=False, WRITE_MAX=True, **meta)
    _ntxent_lse_fwd_kernel[grid](z, sums, row_max, *args, ROW_SHIFT=True, WRITE_MAX=False, **meta)
    return sums.log_().add_(row_max)


def _unit_lse_bwd(grad_lse: Tensor, z: Tensor, lse: Tensor, inv_tau: float) -> Tensor:
    """dL/dz_i = inv_tau Σ_{j≠i} (g_i P_ij + g_j P_ji) z_j, P_ij = exp(inv_tau·z_i·z_j − lse_i); z's dtype."""
    _check_rows("ntxent_lse_bwd", "grad_lse", grad_lse, z)
    _check_rows("ntxent_lse_bwd", "lse", lse, z)
    inv_tau = float(inv_tau)
    n, d = z.shape
    acc_dtype, dtypes = dot_dtypes(z)
    if n <= 1:
        return torch.zeros_like(z, memory_format=torch.contiguous_format)
    grad = torch.zeros((n, d), dtype=acc_dtype, device=z.device)
    config = _launch_config("bwd", z)
    grid = _grid(n, config["BLOCK_N"], z.device)
    scale_hi, scale_lo = hi_lo(inv_tau * LOG2E)
    inv_tau_hi, inv_tau_lo = hi_lo(inv_tau)
    _ntxent_lse_bwd_kernel[grid](
        z,
        grad_lse,
        lse,
        grad,
        n,
        d,
        z.stride(0),
        z.stride(1),
        grad_lse.stride(0),
        lse.stride(0),
        grad.stride(0),
        grad.stride(1),
        scale_hi,
        scale_lo,
        inv_tau_hi,
        inv_tau_lo,
        ROW_SHIFT=not fixed_shift_is_exact(inv_tau),
        **dtypes,
        **config,
    )
    return grad if grad.dtype == z.dtype else grad.to(z.dtype)
