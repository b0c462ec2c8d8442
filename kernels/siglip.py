"""SigLIP in Triton: per-row sums of the pairwise sigmoid losses and their gradient.

Same contract as the C++ kernel (csrc/cpu/siglip.cpp); fastssl/ops/siglip.py calls `siglip_fwd`
and `siglip_bwd`. For unit rows x_i (M × D: images), y_j (N × D: texts), s_ij = x_i·y_j, logits
l_ij = scale·s_ij + bias and labels z_ij = +1 on the positives j = i + offset, −1 elsewhere
(Zhai et al. 2023),

    row_i = −Σ_j log σ(z_ij l_ij) = Σ_j softplus(−z_ij l_ij)                                 (1)
    A_ij = g_i ∂softplus(−z_ij l_ij)/∂l_ij = −g_i z_ij σ(−z_ij l_ij)      (g_i = ∂L/∂row_i)
    ∂L/∂x_i = scale Σ_j A_ij y_j,   ∂L/∂y_j = scale Σ_i A_ij x_i                              (2)
    ∂L/∂scale = Σ_ij A_ij s_ij,     ∂L/∂bias = Σ_ij A_ij                                      (3)

How the kernels compute them (docs/design.md, "Tile kernels" and "SigLIP"):

 4. Tiles. Program (I, part) takes row block I and a contiguous run of the column blocks (so that
    a few row blocks, e.g. one rank's images against every rank's texts, still fill the GPU).
    Row-side results (row sums, ∂L/∂x_I when D fits one BLOCK_D chunk, the partial sums of (3))
    accumulate in registers and are added once at the run's end; ∂L/∂y_J goes through fp32
    (fp64) atomics into a zero-initialised buffer.
 5. No normaliser: every pair's term is its own, so the forward is one pass and the backward one
    pass (scores again, A·Y and Aᵀ·X), with no running max and no saved statistics.
 6. Stable terms: with u = z·l, softplus(−u) = max(−u, 0) + log1p(e), e = exp(−|u|) ≤ 1, and log1p
    in Goldberg's form log(w)·e/(w − 1), w = 1 + e (exact for the tiny e of far negatives, where
    log(1 + e) would round to 0); σ(−u) = 1/(1 + exp(u)), which saturates to 0 or 1 without NaN.
 7. scale and bias are read from device memory (0-dim tensors in the accumulation dtype), never on
    the host; (3) is summed from the fp32 (fp64) tile of A, before A is rounded to the operand
    dtype for (2) as flash-attention rounds P.

Memory: O((M + N)·D), never an M × N matrix. Inputs are read through their strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastssl.kernels._launch import block_size, launcher, program_target
from fastssl.kernels._tiles import add_weighted_rows, block_rows, check_matrix, dot_dtypes, tile_config, tile_dots
from torch import Tensor

# Launch configurations, (BLOCK, BLOCK_D, num_warps, num_stages) per kernel and dtype, BLOCK being
# BLOCK_M and BLOCK_N: the first when D fits in one BLOCK_D chunk (the x rows loaded once, ∂L/∂x_I
# kept in registers; None where that spills), the second for D in chunks (kernels/_tiles.py,
# tile_config; docs/design.md, "Tile kernels": launch configurations). Chosen with
# scripts/compile_check.py --only siglip: the 64- and 128-row tiles of the first version spilled on
# sm_80 in every dtype and on sm_90 in fp32, fp16 (A in fp32) and fp64. Tests may replace the table
# to exercise many tiles on small inputs.
_CONFIGS = {
    ("fwd", torch.bfloat16): ((64, 128, 4, 2), (32, 64, 4, 2)),
    ("fwd", torch.float16): ((64, 128, 4, 2), (32, 64, 4, 2)),
    ("fwd", torch.float32): ((32, 64, 4, 2), (32, 32, 4, 2)),
    ("fwd", torch.float64): ((32, 32, 4, 2), (32, 32, 4, 2)),
    ("bwd", torch.bfloat16): ((32, 128, 4, 2), (32, 64, 8, 1)),
    ("bwd", torch.float16): ((32, 64, 4, 2), (32, 32, 8, 1)),
    ("bwd", torch.float32): (None, (32, 32, 4, 1)),
    ("bwd", torch.float64): (None, (32, 16, 4, 1)),
}


@triton.jit
def _tile(
    X_ptr, Y_ptr, x_i, rows_i, ok_i, J, N, D, X_stride_m, X_stride_d, Y_stride_n, Y_stride_d,
    offset, scale, bias,
    ACC: tl.constexpr, Z_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D_BLOCK: tl.constexpr,
):  # fmt: skip
    """Column block J against row block I (4): its rows and mask, its y rows (a placeholder unless
    ONE_D_BLOCK), the dots s_ij, u_ij = z_ij·l_ij, the positives and the pairs in the matrix."""
    rows_j = J * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_j = rows_j < N
    dots, y_j = tile_dots(
        X_ptr, Y_ptr, x_i, rows_i, ok_i, rows_j, ok_j, D, X_stride_m, X_stride_d, Y_stride_n, Y_stride_d,
        ACC, Z_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, ONE_D_BLOCK,
    )  # fmt: skip
    positive = rows_j[None, :] == rows_i[:, None] + offset
    logits = dots * scale + bias
    u = tl.where(positive, logits, -logits)
    return rows_j, ok_j, y_j, dots, u, positive, ok_i[:, None] & ok_j[None, :]


@triton.jit
def _program_tiles(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's row block (rows and mask) and its run [j_start, j_end) of column blocks (4)."""
    part = tl.program_id(1).to(tl.int64)
    parts = tl.num_programs(1).to(tl.int64)
    T = tl.cdiv(N, BLOCK_N)
    rows_i = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows_i, rows_i < M, T * part // parts, T * (part + 1) // parts


@triton.jit
def _siglip_fwd_kernel(
    X_ptr,
    Y_ptr,
    Scale_ptr,  # [] ACC
    Bias_ptr,  # [] ACC
    Row_ptr,  # [M] ACC, zeros in: row_i of (1)
    M,
    N,
    D,
    X_stride_m,
    X_stride_d,
    Y_stride_n,
    Y_stride_d,
    offset,
    ACC: tl.constexpr,
    Z_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr,  # D <= BLOCK_D: the x rows are loaded once per program
):
    rows_i, ok_i, j_start, j_end = _program_tiles(M, N, BLOCK_M, BLOCK_N)
    scale = tl.load(Scale_ptr).to(ACC)
    bias = tl.load(Bias_ptr).to(ACC)
    x_i = block_rows(X_ptr, rows_i, ok_i, D, X_stride_m, X_stride_d, Z_DOT, BLOCK_M, BLOCK_D, ONE_D_BLOCK)
    acc_i = tl.zeros([BLOCK_M], ACC)
    for J in range(j_start, j_end):
        _rows_j, _ok_j, _y_j, _dots, u, _positive, keep = _tile(
            X_ptr, Y_ptr, x_i, rows_i, ok_i, J, N, D, X_stride_m, X_stride_d, Y_stride_n, Y_stride_d,
            offset, scale, bias, ACC, Z_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, ONE_D_BLOCK,
        )  # fmt: skip
        # (6) softplus(−u) = max(−u, 0) + log1p(exp(−|u|))
        e = tl.exp(-tl.abs(u))
        w = 1.0 + e
        rounded = w == 1.0  # e below half an ulp of 1: log1p(e) = e
        log1p = tl.where(rounded, e, tl.log(w) * (e / tl.where(rounded, 1.0, w - 1.0)))
        acc_i += tl.sum(tl.where(keep, tl.maximum(-u, 0.0) + log1p, 0.0), axis=1)
    if j_start < j_end:
        tl.atomic_add(Row_ptr + rows_i, acc_i, mask=ok_i, sem="relaxed")


@triton.jit
def _siglip_bwd_kernel(
    X_ptr,
    Y_ptr,
    Scale_ptr,  # [] ACC
    Bias_ptr,  # [] ACC
    G_ptr,  # [M] ∂L/∂row (contiguous)
    DX_ptr,  # [M, D] ACC, zeros in: (A Y)_i
    DY_ptr,  # [N, D] ACC, zeros in: (Aᵀ X)_j
    DSB_ptr,  # [2] ACC, zeros in: Σ A_ij s_ij and Σ A_ij (3)
    M,
    N,
    D,
    X_stride_m,
    X_stride_d,
    Y_stride_n,
    Y_stride_d,
    offset,
    ACC: tl.constexpr,
    Z_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    A_DTYPE: tl.constexpr,  # A is rounded to this dtype ...
    A_DOT: tl.constexpr,  # ... and enters the products A·Y, Aᵀ·X in this one
    A_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr,  # D <= BLOCK_D: x_I loaded once, (A Y)_I kept in registers
):
    rows_i, ok_i, j_start, j_end = _program_tiles(M, N, BLOCK_M, BLOCK_N)
    scale = tl.load(Scale_ptr).to(ACC)
    bias = tl.load(Bias_ptr).to(ACC)
    g_i = tl.load(G_ptr + rows_i, mask=ok_i, other=0.0).to(ACC)
    x_i = block_rows(X_ptr, rows_i, ok_i, D, X_stride_m, X_stride_d, Z_DOT, BLOCK_M, BLOCK_D, ONE_D_BLOCK)
    dx_i = tl.zeros([BLOCK_M, BLOCK_D], ACC)  # (A Y)_I in registers, used with ONE_D_BLOCK
    d_scale = tl.zeros([BLOCK_M], ACC)
    d_bias = tl.zeros([BLOCK_M], ACC)
    for J in range(j_start, j_end):
        rows_j, ok_j, y_j, dots, u, positive, keep = _tile(
            X_ptr, Y_ptr, x_i, rows_i, ok_i, J, N, D, X_stride_m, X_stride_d, Y_stride_n, Y_stride_d,
            offset, scale, bias, ACC, Z_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, ONE_D_BLOCK,
        )  # fmt: skip
        # (6) A_ij = −g_i z_ij σ(−u_ij), σ(−u) = 1/(1 + exp(u))
        sig = 1.0 / (1.0 + tl.exp(u))
        a = tl.where(keep, g_i[:, None] * tl.where(positive, -sig, sig), 0.0)
        d_scale += tl.sum(a * dots, axis=1)  # (7) from the fp32 tile
        d_bias += tl.sum(a, axis=1)
        a = a.to(A_DTYPE).to(A_DOT)
        # (2) (A Y)_I += A Y_J, (Aᵀ X)_J += Aᵀ X_I
        dx_i = add_weighted_rows(
            a, x_i, y_j, dx_i, X_ptr, Y_ptr, DX_ptr, DY_ptr, rows_i, ok_i, rows_j, ok_j, D,
            X_stride_m, X_stride_d, Y_stride_n, Y_stride_d, ACC, A_DOT, A_PRECISION, BLOCK_D, ONE_D_BLOCK,
        )  # fmt: skip
    if j_start < j_end:
        tl.atomic_add(DSB_ptr, tl.sum(d_scale, axis=0), sem="relaxed")
        tl.atomic_add(DSB_ptr + 1, tl.sum(d_bias, axis=0), sem="relaxed")
        if ONE_D_BLOCK:
            cols = tl.arange(0, BLOCK_D)
            ptrs = DX_ptr + rows_i[:, None] * D + cols[None, :]
            tl.atomic_add(ptrs, dx_i, mask=ok_i[:, None] & (cols < D)[None, :], sem="relaxed")


# ---------------------------------------------------------------------------------------------
# launch helpers


def _check_inputs(fn: str, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor) -> torch.dtype:
    """The accumulation dtype, after checking the rows and that scale and bias are one-element
    tensors on their device (converted to that dtype by the caller)."""
    check_matrix(fn, x, "x")
    check_matrix(fn, y, "y")
    if x.shape[1] != y.shape[1] or x.dtype != y.dtype or x.device != y.device:
        shapes = f"x {tuple(x.shape)} {x.dtype} and y {tuple(y.shape)} {y.dtype}"
        raise ValueError(f"{fn}: {shapes} must share D, dtype, device")
    for name, t in (("scale", scale), ("bias", bias)):
        if t.numel() != 1 or t.device != x.device:
            got = f"{tuple(t.shape)} on {t.device}"
            raise ValueError(f"{fn}: {name} must be a one-element tensor on {x.device}, got {got}")
    return dot_dtypes(x)[0]


def _launch(x: Tensor, y: Tensor, kernel: str) -> dict:
    """Block sizes, warps, stages and grid (4) for x [M, D] against y [N, D] (see _CONFIGS)."""
    (m, d), n = x.shape, y.shape[0]
    block, block_d, one_d, num_warps, num_stages = tile_config(_CONFIGS, kernel, x.dtype, d)
    block_m, block_n = block_size(m, block), block_size(n, block)
    row_blocks, col_blocks = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    parts = max(1, min(col_blocks, triton.cdiv(program_target(x.device), row_blocks)))
    return dict(
        grid=(row_blocks, parts),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        ONE_D_BLOCK=one_d,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def _scalars(scale: Tensor, bias: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    return scale.reshape(()).to(acc).contiguous(), bias.reshape(()).to(acc).contiguous()


@launcher
def siglip_fwd(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, offset: int) -> Tensor:
    """row_i of (1) [M] (fp32, fp64 for fp64 input) for unit rows x [M, D], y [N, D], positives
    at j = i + offset, and one-element tensors scale and bias on the rows' device."""
    acc = _check_inputs("siglip_fwd", x, y, scale, bias)
    (m, d), n = x.shape, y.shape[0]
    rows = torch.zeros(m, dtype=acc, device=x.device)
    if n == 0:
        return rows
    launch = _launch(x, y, "fwd")
    grid = launch.pop("grid")
    dtypes = dot_dtypes(x)[1]
    scale, bias = _scalars(scale, bias, acc)
    _siglip_fwd_kernel[grid](
        x, y, scale, bias, rows, m, n, d, x.stride(0), x.stride(1), y.stride(0), y.stride(1), offset,
        ACC=dtypes["ACC"], Z_DOT=dtypes["Z_DOT"], DOT_PRECISION=dtypes["DOT_PRECISION"], **launch,
    )  # fmt: skip
    return rows


@launcher
def siglip_bwd(
    grad_row: Tensor, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, offset: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(∂L/∂x, ∂L/∂y) of (2) in the rows' dtype and (∂L/∂scale, ∂L/∂bias) of (3), 0-dim in the
    accumulation dtype, for g = grad_row [M]."""
    acc = _check_inputs("siglip_bwd", x, y, scale, bias)
    (m, d), n = x.shape, y.shape[0]
    if grad_row.shape != (m,) or grad_row.device != x.device:
        raise ValueError(f"siglip_bwd: grad_row must have shape ({m},) on {x.device}, got {tuple(grad_row.shape)}")
    dtypes = dot_dtypes(x)[1]
    dx = torch.zeros((m, d), dtype=acc, device=x.device)
    dy = torch.zeros((n, d), dtype=acc, device=x.device)
    dsb = torch.zeros(2, dtype=acc, device=x.device)
    scale, bias = _scalars(scale, bias, acc)
    if m and n:
        launch = _launch(x, y, "bwd")
        grid = launch.pop("grid")
        _siglip_bwd_kernel[grid](
            x, y, scale, bias, grad_row.contiguous(), dx, dy, dsb,
            m, n, d, x.stride(0), x.stride(1), y.stride(0), y.stride(1), offset,
            **dtypes, **launch,
        )  # fmt: skip
    return (dx * scale).to(x.dtype), (dy * scale).to(y.dtype), dsb[0].clone(), dsb[1].clone()
