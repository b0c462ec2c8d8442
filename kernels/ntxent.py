"""NT-Xent in Triton: the row log-sum-exp of the self-similarity matrix and its gradient.

Same contract as the C++ kernel (csrc/cpu/ntxent.cpp); fastssl/ops/ntxent.py calls
`ntxent_lse_fwd` and `ntxent_lse_bwd`. For unit rows z_i (N × D) and s_ij = z_i·z_j/τ,

    lse_i = log Σ_{j≠i} exp(s_ij)                                                   (1)

is the only part of the NT-Xent / SupCon loss (Chen et al. 2020, SimCLR; Khosla et al. 2020)
that needs all N² pairs. With g_i = ∂L/∂lse_i and P_ij = exp(s_ij − lse_i) (P_ii = 0),

    ∂L/∂z_i = (1/τ) Σ_{j≠i} (g_i P_ij + g_j P_ji) z_j = (1/τ) Σ_j A_ij z_j.           (2)

How the kernels compute them (docs/design.md, "Tile kernels" and "NT-Xent"):

 3. Symmetric tiles. S = ZZᵀ is cut into BLOCK_N × BLOCK_N tiles and only tiles (I, J) with
    J ≥ I are visited. In (1) one tile gives the row sums of block I (sum over the tile's
    columns) and, when I ≠ J, those of block J (sum over its rows). In (2) A = Aᵀ, so one tile
    gives grad_I += A Z_J and, when I ≠ J, grad_J += Aᵀ Z_I. A diagonal tile (I = J) already
    holds both orders of each of its pairs, so it feeds block I alone, with i = j masked out.
 4. Fixed shift. Rows are unit vectors, so s_ij ≤ m = 1/τ and e_ij = exp(s_ij − m) ≤ 1 needs no
    running max: it is computed once per pair and serves row i and row j alike, and
    lse_i = m + log Σ_{j≠i} e_ij. Kernels work in base 2 with log₂e folded into the scale:
    with k = log₂e/τ, e_ij = 2^{(z_i·z_j − 1)·k}. Every e_ij ≥ exp(−2/τ) is a normal fp32
    number while 2/τ ≤ 80, which is when the fixed shift is exact.
 5. Row shift (2/τ > 80, τ < 0.025), as in the C++ kernel: a first pass (WRITE_MAX) writes
    M_i = max_{j≠i} s_ij, the row side kept in registers, the column side by tl.atomic_max;
    the second pass (ROW_SHIFT) sums exp(s_ij − M_i) into row i and exp(s_ij − M_j) into row j
    (two exponentials per pair), and lse_i = M_i + log(sum). A single row (N = 1) has an empty
    sum: lse = −∞ and a zero gradient, returned without a launch.
 6. Backward, fixed shift: P_ij = e_ij c_i with c_i = exp(m − lse_i) ≤ exp(2/τ) (finite under the
    same bound), so A_ij = e_ij (u_i + u_j) with u_i = g_i c_i/τ: one exponential per pair.
    Row shift: A_ij = (g_i/τ) exp(s_ij − lse_i) + (g_j/τ) exp(s_ij − lse_j), each term ≤ |g|/τ
    since s_ij ≤ lse_i. The 1/τ of (2) is folded into u (or g) here.
 7. Work layout. With T row blocks, the programs of grid axis 0 index `pair` take row block
    p = pair and row block T−1−p: (T − p) + (p + 1) = T + 1 tiles for every pair, so the
    triangle is shared evenly. The tiles of a pair are cut into `parts` contiguous runs (grid
    axis 1) so that there are enough programs to fill the GPU (about 4 per SM); a run holds at
    most two segments, one per row block. Along a segment the row side of block I accumulates
    in registers (row sums, row max, and in backward grad_I when D fits in one BLOCK_D chunk)
    and is added once at the segment's end; the column side of block J, and grad_I when D needs
    several chunks, go through fp32 (fp64) atomics. Every row is so written by several
    programs: all writes are tl.atomic_add / atomic_max into zero- (or −∞-) initialised
    buffers, which makes the kernels race-free but their sums order-dependent in the last bits
    (not bitwise deterministic run to run).
 8. Precision. Tiles enter tl.dot in their own dtype with fp32 accumulation (fp64 for fp64
    input, for gradcheck). fp32 input uses input_precision "tf32x3" (fp32-accurate on tensor
    cores; plain tf32 rounds z to 11 significant bits, ~0.05 of error in s at τ = 0.01).
    Triton's interpreter cannot compute on bf16, so there bf16 tiles are widened to fp32 after
    their load (exactly) before tl.dot.
    In backward A is cast to the operand dtype of the A·Z products: bf16 for bf16 (as
    flash-attention casts P), but fp32 with tf32 for fp16 — A scales like g/(τN), which for a
    mean loss over thousands of rows falls below fp16's normal range, while fp16 values convert
    exactly to tf32. Scalars reach the kernel as fp32 hi/lo pairs (x = hi + lo) so that fp64
    runs see 1/τ and log₂e at fp64 precision.
    Forward and backward compute s_ij the same way (same BLOCK_D chunks, same rounding of
    z_i·z_j/τ), so the P of (2) matches the lse it is given: where the positive pair dominates
    a row, P_ip ≈ 1 cancels against the positive term of the loss, and an lse rounded from other
    numbers than P's would put 1/τ times fp32 noise into the gradient (3× the C++ kernel's error
    at τ = 0.01 in fp32 when BLOCK_D differed, or when s was fused into an fma).

Memory: O(N·D) (the fp32 gradient buffer and [N] vectors), never an N×N matrix.
Non-contiguous z, grad_lse and lse are read through their strides.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from fastssl.kernels._launch import MIN_BLOCK, launcher, program_target
from fastssl.kernels._tiles import (
    LOG2E,
    block_rows,
    check_matrix,
    dot_dtypes,
    fixed_shift_is_exact,
    hi_lo,
    load_rows,
    scalar,
    tile_dots,
)
from torch import Tensor

# Launch configurations, (BLOCK_N, BLOCK_D, num_warps, num_stages), per kernel and dtype: the first
# when D fits in one BLOCK_D chunk (z_I loaded once per segment, grad_I kept in registers) or None
# where that variant spills, the second for D in chunks. Chosen by compiling every variant for
# sm_90 with ptxas (stride_d = 1) and keeping it within 255 registers: no spills except fp16
# backward in one chunk (40-56 bytes); wgmma for 16-bit and fp32. Not yet timed on a GPU.
# For fp32 and fp64 forward and backward share BLOCK_N and BLOCK_D, so that s_ij is rounded alike
# in both (8; Triton's interpreter rounds a matmul differently for other tile shapes); for bf16 and
# fp16 the difference stays far below the output's precision. BLOCK_N and BLOCK_D shrink to
# triton.next_power_of_2 of N and D, down to 16 (tl.dot's minimum). Tests may replace the table
# to exercise many tiles on small inputs.
_CONFIGS = {
    ("fwd", torch.bfloat16): ((128, 128, 8, 3), (128, 64, 8, 3)),
    ("fwd", torch.float16): ((128, 128, 8, 3), (128, 64, 8, 3)),
    ("fwd", torch.float32): ((64, 32, 4, 2), (64, 32, 4, 2)),
    ("fwd", torch.float64): ((32, 32, 4, 2), (32, 32, 4, 2)),
    ("bwd", torch.bfloat16): ((64, 64, 4, 3), (128, 64, 8, 3)),
    ("bwd", torch.float16): ((64, 64, 4, 3), (64, 64, 4, 3)),
    ("bwd", torch.float32): (None, (64, 32, 8, 2)),
    ("bwd", torch.float64): ((32, 32, 4, 2), (32, 32, 4, 2)),
}
@triton.jit
def _segment(pair, seg, parts, part, N, BLOCK_N: tl.constexpr):
    """Row block I and its column blocks [j_start, j_end) for one of a program's two segments (7)."""
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
    scale_hi,  # k = log₂e/τ as an fp32 hi/lo pair (8)
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
                # (5) row max of s here, column max of block J by atomic max
                s = tl.where(keep, dots * inv_tau, float("-inf"))
                acc_i = tl.maximum(acc_i, tl.max(s, axis=1))
                if I != J:
                    tl.atomic_max(Out_ptr + rows_j, tl.max(s, axis=0), mask=ok_j, sem="relaxed")
            elif ROW_SHIFT:
                # (5) two exponentials per pair: exp(s_ij − M_i) for row i, exp(s_ij − M_j) for row j.
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
                # (4) e_ij = 2^{z_i·z_j·k − k}, once per pair, for row i and row j
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
    Grad_ptr,  # [N, D] ACC, zeros in: (2) accumulates here
    N,
    D,
    Z_stride_n,
    Z_stride_d,
    G_stride_n,
    Lse_stride_n,
    Grad_stride_n,
    Grad_stride_d,
    scale_hi,  # k = log₂e/τ as an fp32 hi/lo pair (8)
    scale_lo,
    inv_tau_hi,  # 1/τ as an fp32 hi/lo pair
    inv_tau_lo,
    ACC: tl.constexpr,
    Z_DOT: tl.constexpr,  # operand dtype of z_i·z_j: z's own, or fp32 for bf16 when interpreted
    DOT_PRECISION: tl.constexpr,
    A_DTYPE: tl.constexpr,  # A is rounded to this dtype (8) ...
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
            # (6) u_i = (g_i/τ)·exp(m − lse_i), m = 1/τ
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
                # (6) A_ij = (g_i/τ)·exp(s_ij − lse_i) + (g_j/τ)·exp(s_ij − lse_j), s rounded as in the
                # forward (5) so that P matches the lse it was given; masked pairs give exp(−∞) = 0
                s = tl.where(keep, dots * inv_tau, float("-inf"))
                a = g_i[:, None] * tl.exp(s - lse_i[:, None]) + g_j[None, :] * tl.exp(s - lse_j[None, :])
            else:
                # (6) A_ij = e_ij·(u_i + u_j), one exponential per pair, e_ij as in the forward (4)
                u_j = g_j * tl.exp(inv_tau - lse_j)
                a = tl.where(keep, tl.exp2(dots * scale - scale) * (u_i[:, None] + u_j[None, :]), 0.0)
            a = a.to(A_DTYPE).to(A_DOT)
            # (3) grad_I += A Z_J and, off the diagonal, grad_J += Aᵀ Z_I, over D in chunks
            if ONE_D_BLOCK:
                grad_i = tl.dot(a, z_j.to(A_DOT), grad_i, input_precision=A_PRECISION)
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
    one_chunk, chunked = _CONFIGS[(kernel, z.dtype)]
    one_d = one_chunk is not None and d <= one_chunk[1]
    block_n, block_d, num_warps, num_stages = one_chunk if one_d else chunked
    block_n = max(MIN_BLOCK, min(block_n, triton.next_power_of_2(n)))
    block_d = max(MIN_BLOCK, min(block_d, triton.next_power_of_2(d)))
    return dict(
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        ONE_D_BLOCK=one_d,
        num_warps=num_warps if block_n >= 64 else 4,
        num_stages=num_stages,
    )


def _grid(n: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(pairs of row blocks, runs per pair) as in (7)."""
    tiles = triton.cdiv(n, block_n)
    pairs = triton.cdiv(tiles, 2)
    target = program_target(device)
    parts = max(1, min(tiles + 1, triton.cdiv(target, pairs)))
    return pairs, parts


@launcher
def ntxent_lse_fwd(z: Tensor, inv_tau: float) -> Tensor:
    """lse_i = log Σ_{j≠i} exp(inv_tau·z_i·z_j) for unit rows z [N, D]; [N] fp32 (fp64 for fp64 z).

    A single row gives −inf (an empty sum).
    """
    check_matrix("ntxent_lse_fwd", z)
    inv_tau = float(inv_tau)
    n, d = z.shape
    acc_dtype, dtypes = dot_dtypes(z)
    if n <= 1:  # an empty sum (5 needs a finite row max)
        return torch.full((n,), -math.inf, dtype=acc_dtype, device=z.device)
    sums = torch.zeros(n, dtype=acc_dtype, device=z.device)
    config = _launch_config("fwd", z)
    grid = _grid(n, config["BLOCK_N"], z.device)
    meta = dict(ACC=dtypes["ACC"], Z_DOT=dtypes["Z_DOT"], DOT_PRECISION=dtypes["DOT_PRECISION"], **config)
    args = (n, d, z.stride(0), z.stride(1), *hi_lo(inv_tau * LOG2E), *hi_lo(inv_tau))
    if fixed_shift_is_exact(inv_tau):
        _ntxent_lse_fwd_kernel[grid](z, sums, sums, *args, ROW_SHIFT=False, WRITE_MAX=False, **meta)
        return sums.log_().add_(inv_tau)
    # (5) per-row shift M_i, then the shifted sums
    row_max = torch.full((n,), -math.inf, dtype=acc_dtype, device=z.device)
    _ntxent_lse_fwd_kernel[grid](z, row_max, row_max, *args, ROW_SHIFT=False, WRITE_MAX=True, **meta)
    _ntxent_lse_fwd_kernel[grid](z, sums, row_max, *args, ROW_SHIFT=True, WRITE_MAX=False, **meta)
    return sums.log_().add_(row_max)


@launcher
def ntxent_lse_bwd(grad_lse: Tensor, z: Tensor, lse: Tensor, inv_tau: float) -> Tensor:
    """dL/dz_i = inv_tau Σ_{j≠i} (g_i P_ij + g_j P_ji) z_j, P_ij = exp(inv_tau·z_i·z_j − lse_i); z's dtype."""
    check_matrix("ntxent_lse_bwd", z)
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
