"""Triton helpers shared by the tile kernels (NT-Xent, InfoNCE and the ops built on them).

The Triton twin of csrc/tiles.h. The tile kernels share one scheme (docs/design.md, "Tile
kernels"): rows are loaded as [BLOCK, BLOCK_D] tiles in their own dtype, multiplied with fp32
accumulation (fp64 for fp64 input, for gradcheck), and scalars reach the kernels as fp32 hi/lo
pairs so that fp64 runs see them at fp64 precision. Everything here belongs to no op.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from fastssl.kernels._launch import block_size
from torch import Tensor

LOG2E = 1.4426950408889634
LN2 = math.log(2.0)


def hi_lo(x: float) -> tuple[float, float]:
    """x = hi + lo with hi and lo both fp32 numbers (lo carries what fp32 rounds off)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


@triton.jit
def scalar(hi, lo, ACC: tl.constexpr):
    """hi + lo in the accumulation dtype (8: fp64 kernels get the full double)."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def load_rows(X_ptr, rows, row_ok, d0, D, X_stride_n, X_stride_d, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr):
    """X[rows, d0:d0+BLOCK_D] as a [BLOCK_N, BLOCK_D] tile in DTYPE, zeros outside the matrix."""
    cols = d0 + tl.arange(0, BLOCK_D)
    ptrs = X_ptr + rows[:, None] * X_stride_n + cols[None, :] * X_stride_d
    return tl.load(ptrs, mask=row_ok[:, None] & (cols < D)[None, :], other=0.0).to(DTYPE)


@triton.jit
def block_rows(
    X_ptr,
    rows,
    row_ok,
    D,
    X_stride_n,
    X_stride_d,
    DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr,
):
    """A row block's rows, loaded once per program when D fits one BLOCK_D chunk; else an unused
    placeholder, and tile_dots loads the rows chunk by chunk."""
    if ONE_D_BLOCK:
        x = load_rows(X_ptr, rows, row_ok, 0, D, X_stride_n, X_stride_d, BLOCK_D, DTYPE)
    else:
        x = tl.zeros([BLOCK_N, BLOCK_D], DTYPE)
    return x


@triton.jit
def tile_dots(
    A_ptr,
    B_ptr,
    a_i,
    rows_i,
    ok_i,
    rows_j,
    ok_j,
    D,
    A_stride_n,
    A_stride_d,
    B_stride_n,
    B_stride_d,
    ACC: tl.constexpr,
    Z_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr,
):
    """(dots, b_j): the [BLOCK_M, BLOCK_N] products a_i·b_j of rows `rows_i` of A and `rows_j` of B.

    With ONE_D_BLOCK a_i holds the A rows (loaded once by the caller) and b_j, the B rows, is
    loaded here and returned for the backward's products; else D goes in BLOCK_D chunks, a_i is
    unused and b_j is a placeholder.
    """
    if ONE_D_BLOCK:
        b_j = load_rows(B_ptr, rows_j, ok_j, 0, D, B_stride_n, B_stride_d, BLOCK_D, Z_DOT)
        dots = tl.dot(a_i, tl.trans(b_j), input_precision=DOT_PRECISION, out_dtype=ACC)
    else:
        dots = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for d0 in range(0, D, BLOCK_D):
            ai = load_rows(A_ptr, rows_i, ok_i, d0, D, A_stride_n, A_stride_d, BLOCK_D, Z_DOT)
            bj = load_rows(B_ptr, rows_j, ok_j, d0, D, B_stride_n, B_stride_d, BLOCK_D, Z_DOT)
            dots = tl.dot(ai, tl.trans(bj), dots, input_precision=DOT_PRECISION, out_dtype=ACC)
        b_j = dots
    return dots, b_j


@triton.jit
def add_weighted_rows(
    a,
    x_i,
    y_j,
    dx_i,
    X_ptr,
    Y_ptr,
    DX_ptr,
    DY_ptr,
    rows_i,
    ok_i,
    rows_j,
    ok_j,
    D,
    X_stride_n,
    X_stride_d,
    Y_stride_n,
    Y_stride_d,
    ACC: tl.constexpr,
    A_DOT: tl.constexpr,
    A_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr,
):
    """A backward's products for one tile of weights a [BLOCK_M, BLOCK_N] (in A_DOT): dX_I += a·Y_J,
    dY_J += aᵀ·X_I into contiguous [*, D] ACC buffers.

    With ONE_D_BLOCK (x_i, y_j hold the rows) dX_I accumulates in the registers dx_i, returned,
    and dY_J goes through atomics; else D goes in BLOCK_D chunks, both by atomics, and dx_i is
    returned unchanged.
    """
    cols = tl.arange(0, BLOCK_D)
    if ONE_D_BLOCK:
        dx_i = tl.dot(a, y_j.to(A_DOT), dx_i, input_precision=A_PRECISION, out_dtype=ACC)
        dy_j = tl.dot(tl.trans(a), x_i.to(A_DOT), input_precision=A_PRECISION, out_dtype=ACC)
        ptrs = DY_ptr + rows_j[:, None] * D + cols[None, :]
        tl.atomic_add(ptrs, dy_j, mask=ok_j[:, None] & (cols < D)[None, :], sem="relaxed")
    else:
        for d0 in range(0, D, BLOCK_D):
            ok_d = (d0 + cols) < D
            yj = load_rows(Y_ptr, rows_j, ok_j, d0, D, Y_stride_n, Y_stride_d, BLOCK_D, A_DOT)
            part_i = tl.dot(a, yj, input_precision=A_PRECISION, out_dtype=ACC)
            ptrs = DX_ptr + rows_i[:, None] * D + (d0 + cols)[None, :]
            tl.atomic_add(ptrs, part_i, mask=ok_i[:, None] & ok_d[None, :], sem="relaxed")
            xi = load_rows(X_ptr, rows_i, ok_i, d0, D, X_stride_n, X_stride_d, BLOCK_D, A_DOT)
            part_j = tl.dot(tl.trans(a), xi, input_precision=A_PRECISION, out_dtype=ACC)
            ptrs = DY_ptr + rows_j[:, None] * D + (d0 + cols)[None, :]
            tl.atomic_add(ptrs, part_j, mask=ok_j[:, None] & ok_d[None, :], sem="relaxed")
    return dx_i


# log₂e as an fp32 hi/lo pair, so that an lse in fp64 is carried to base 2 at full precision
LOG2E_HI, LOG2E_LO = (tl.constexpr(x) for x in hi_lo(LOG2E))


@triton.jit
def times_log2e(x):
    """x·log₂e at the precision of x."""
    return x * LOG2E_HI + x * LOG2E_LO


@triton.jit
def temperature_scales(
    InvTau_ptr, scale_hi, scale_lo, inv_tau_hi, inv_tau_lo, ACC: tl.constexpr, TAU_PTR: tl.constexpr
):
    """(k = log₂e/τ, 1/τ) in ACC (docs/design.md, "Tile kernels"): from the fp32 hi/lo pairs of a
    float temperature, or with TAU_PTR from the one-element tensor at InvTau_ptr (a tensor
    temperature, read on the device only so that the host never waits for it)."""
    if TAU_PTR:
        inv_tau = tl.load(InvTau_ptr).to(ACC)
        scale = times_log2e(inv_tau)
    else:
        inv_tau = scalar(inv_tau_hi, inv_tau_lo, ACC)
        scale = scalar(scale_hi, scale_lo, ACC)
    return scale, inv_tau


def temperature_args(inv_tau: float | Tensor, acc_dtype: torch.dtype, placeholder: Tensor) -> tuple[list, dict]:
    """The launch arguments (InvTau_ptr, scale_hi, scale_lo, inv_tau_hi, inv_tau_lo) and TAU_PTR for
    1/τ given as a float (hi/lo pairs; nothing goes to the device, `placeholder` stands in for the
    pointer) or as a one-element tensor on the kernels' device (read there, never on the host)."""
    if isinstance(inv_tau, Tensor):
        return [inv_tau.reshape(1).to(acc_dtype), 0.0, 0.0, 0.0, 0.0], dict(TAU_PTR=True)
    inv_tau = float(inv_tau)
    return [placeholder, *hi_lo(inv_tau * LOG2E), *hi_lo(inv_tau)], dict(TAU_PTR=False)


def fixed_shift_applies(inv_tau: float | Tensor) -> bool:
    """The fixed shift is used for a float 1/τ where it is exact; a tensor 1/τ is not read on the
    host, so its kernels take the row shift, exact for every τ (docs/design.md, "Tile kernels")."""
    return not isinstance(inv_tau, Tensor) and fixed_shift_is_exact(float(inv_tau))


# Triton's interpreter replaces triton.jit functions by InterpretedFunction objects.
INTERPRETED = not isinstance(load_rows, triton.runtime.JITFunction)


def fixed_shift_is_exact(inv_tau: float) -> bool:
    """The fixed shift m = 1/τ is exact (docs/design.md, "Tile kernels"): exp(s − m) ≥ exp(−2/τ) is a
    normal fp32 number while 2/τ ≤ 80, as in the C++ kernels."""
    return 2.0 * inv_tau <= 80.0


def tile_config(configs: dict, kernel: str, dtype: torch.dtype, d: int) -> tuple[int, int, bool, int, int]:
    """(BLOCK, BLOCK_D, ONE_D_BLOCK, num_warps, num_stages) for rows of `d` features from a kernel
    file's table {(kernel, dtype): (one_chunk, chunked)} of (BLOCK, BLOCK_D, num_warps, num_stages):
    `one_chunk` where D fits one BLOCK_D chunk (None where that variant would not fit the
    registers), else `chunked` (docs/design.md, "Tile kernels": launch configurations). BLOCK_D
    shrinks to D's power of two; the caller shrinks BLOCK to its rows'."""
    one_chunk, chunked = configs[(kernel, dtype)]
    one_d = one_chunk is not None and d <= one_chunk[1]
    block, block_d, num_warps, num_stages = one_chunk if one_d else chunked
    return block, block_size(d, block_d), one_d, num_warps, num_stages


def check_matrix(fn: str, z: Tensor, name: str = "z") -> None:
    """z is a [N, D] fp16/bf16/fp32/fp64 tensor (raised as from the launcher `fn`)."""
    if not isinstance(z, Tensor) or z.dim() != 2:
        raise ValueError(f"{fn}: {name} must be a [N, D] tensor, got {getattr(z, 'shape', type(z).__name__)}")
    if z.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{fn}: {name} must be fp16, bf16, fp32 or fp64, got {z.dtype}")


def dot_dtypes(z: Tensor) -> tuple[torch.dtype, dict]:
    """The accumulation dtype and the kernels' dtype switches for z's dtype (docs/design.md, "Tile kernels": precision).

    Triton's interpreter cannot compute on bf16 (it multiplies the raw bits in tl.dot), so there
    bf16 tiles are widened to fp32 after their load, exactly, and A still goes through bf16.
    """
    if z.dtype == torch.float64:
        acc, z_dot, precision, a_dtype = tl.float64, tl.float64, "ieee", tl.float64
    elif z.dtype == torch.float32:
        acc, z_dot, precision, a_dtype = tl.float32, tl.float32, "tf32x3", tl.float32
    elif z.dtype == torch.float16:
        acc, z_dot, precision, a_dtype = tl.float32, tl.float16, "tf32", tl.float32
    else:
        acc, z_dot, precision, a_dtype = tl.float32, tl.bfloat16, "tf32", tl.bfloat16
    if INTERPRETED and z_dot == tl.bfloat16:
        z_dot = tl.float32
    # z is fed to the A·Z products in A's dtype (fp16 → fp32 is exact, so is fp16 → tf32)
    a_dot = tl.float32 if INTERPRETED and a_dtype == tl.bfloat16 else a_dtype
    a_precision = "tf32" if z.dtype == torch.float16 else precision
    meta = dict(ACC=acc, Z_DOT=z_dot, DOT_PRECISION=precision, A_DTYPE=a_dtype, A_DOT=a_dot, A_PRECISION=a_precision)
    return (torch.float64 if acc == tl.float64 else torch.float32), meta
