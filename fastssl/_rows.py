"""Scale-safe row normalisation, shared by every op that L2-normalises rows (docs/design.md,
"Numerics and inputs"); it belongs to no op.

‖x‖² overflows in fp32 for rows of norm ≳ 1e19 and underflows, or falls under F.normalize's eps,
for rows of norm ≲ 1e-12: such rows would come out as zero rows (or not unit). Scaling a row by
the power of two 2^{−e} that puts its largest |x_d| in [0.5, 1) first is exact (no rounding), puts
its norm in [0.5, √D], and x/‖x‖ does not depend on it: the result, and its gradient (the factor
is a detached constant), are those of x/‖x‖, bit for bit where F.normalize did not overflow. A zero
row stays zero; a row with a NaN or an inf becomes non-finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl import _ext

# rows per chunk of `inverse_norms`' widened copy: about 4M elements (16 MB in fp32)
_CHUNK = 1 << 22


def power_of_two_scales(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """2^{−e_i} [N] with e_i the binary exponent of row i's largest |x_d|, so that x_i·2^{−e_i} has its
    largest entry in [0.5, 1) (capped where `dtype` cannot hold the factor: fp16 rows below 2^−15);
    1 for a zero or non-finite row. Exact; not differentiable; in `dtype` (x's by default)."""
    dtype = dtype or x.dtype
    _, e = torch.frexp(x.detach().abs().amax(dim=1).to(dtype))
    largest = math.floor(math.log2(torch.finfo(dtype).max))
    return torch.ldexp(torch.ones(e.shape, dtype=dtype, device=x.device), (-e).clamp(max=largest))


def unit_rows(x: Tensor) -> Tensor:
    """x_i / ‖x_i‖ for the rows of x [N, D] at any scale (a zero row stays zero), in x's dtype."""
    return F.normalize(x * power_of_two_scales(x)[:, None], dim=1)


def scaled_rows(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(x̃, r) with x̃_i = x_i·2^{−e_i} in `dtype` (power_of_two_scales: exact) and
    r_i = 1/max(‖x̃_i‖, 1e-12), both differentiable, so that r_i·x̃_i is unit_rows(x)_i (F.normalize's
    formula, to one rounding). A kernel handed x̃ and r multiplies x's own numbers: rows of a bf16 x
    stay bf16 numbers, which the CPU kernels multiply on bf16 dot products with nothing rounded, and
    apply r to the fp32 products (docs/design.md, "bf16 dot products on the CPU")."""
    scaled = x.to(dtype) * power_of_two_scales(x, dtype)[:, None]
    return scaled, 1.0 / torch.linalg.vector_norm(scaled, dim=1).clamp_min(1e-12)


@torch.library.custom_op("fastssl::row_scales", mutates_args=())
def row_scales(x: Tensor) -> tuple[Tensor, Tensor]:
    """(power_of_two_scales(x, acc), inverse_norms(x, acc)) for the rows of a CPU tensor x [N, D] in one
    pass (csrc/rows.cpp), acc = fp32 (fp64 for fp64 x): MoCHi's queue, which the two would read three
    times. Not differentiable."""
    return _ext.kernel("cpp", x.device, cpp="row_scales_cpu")(x)


@row_scales.register_fake
def _(x):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(x.shape[0], dtype=acc)


def inverse_norms(x: Tensor, dtype: torch.dtype | None = None, scale: Tensor | None = None) -> Tensor:
    """1 / ‖x_i‖ [N] for the rows of x [N, D] at any scale, 0 for a zero row (x_i times it is the
    unit row); not differentiable. Computed in `dtype` (x's by default), over chunks of rows so
    that a widened copy of a large x (a MoCo queue) never exists whole. `scale`: x's
    power_of_two_scales in `dtype`, when the caller has them."""
    dtype = dtype or x.dtype
    scale = power_of_two_scales(x, dtype) if scale is None else scale
    norm = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    step = max(1, _CHUNK // max(1, x.shape[1]))
    for r0 in range(0, x.shape[0], step):
        rows = x[r0 : r0 + step].detach().to(dtype) * scale[r0 : r0 + step, None]
        norm[r0 : r0 + step] = torch.linalg.vector_norm(rows, dim=1)
    return torch.where(norm > 0, scale / norm, torch.zeros_like(norm))
