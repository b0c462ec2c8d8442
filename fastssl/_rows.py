"""Scale-safe row normalisation, shared by every op that L2-normalises rows (docs/design.md,
"Numerics and inputs"); it belongs to no op.

‖x‖² overflows in fp32 for rows of norm ≳ 1e19 and underflows, or falls under F.normalize's eps,
for rows of norm ≲ 1e-12: such rows would come out as zero rows (or not unit). Dividing a row by
its largest |x_d| first puts its norm in [1, √D]; x/‖x‖ does not depend on that factor, which is
therefore detached, so the gradient is that of x/‖x‖ exactly. A zero row stays zero; a row with a
NaN or an inf becomes a NaN row (a non-finite input gives a non-finite result).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _row_max_abs(x: Tensor) -> Tensor:
    """max_d |x_d| per row [N, 1], detached, 1 for zero rows (so that they stay zero)."""
    m = x.detach().abs().amax(dim=1, keepdim=True)
    return torch.where(m > 0, m, torch.ones_like(m))


def unit_rows(x: Tensor) -> Tensor:
    """x_i / ‖x_i‖ for the rows of x [N, D] at any scale (a zero row stays zero), in x's dtype."""
    return F.normalize(x / _row_max_abs(x), dim=1)


def inverse_norms(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """1 / ‖x_i‖ [N] for the rows of x [N, D] at any scale, 0 for a zero row (x_i·that = x̂_i as
    unit_rows gives); not differentiable. In `dtype` (x's by default)."""
    m = _row_max_abs(x).squeeze(1).to(dtype or x.dtype)
    norm = torch.linalg.vector_norm(x.detach() / m[:, None].to(x.dtype), dim=1, dtype=dtype or x.dtype)
    return torch.where(norm > 0, (m * norm).reciprocal(), torch.zeros_like(norm))
