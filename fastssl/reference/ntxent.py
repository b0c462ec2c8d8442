"""NT-Xent / SupCon the eager way: the whole N×N similarity matrix, as most codebases write it."""

from __future__ import annotations

import torch
from torch import Tensor

from fastssl._rows import unit_rows


def nt_xent_rows(z: Tensor, classes: Tensor, inv_tau) -> Tensor:
    """Per-row loss ℓ_i = LSE_{j≠i} s_ij − mean_{p∈P(i)} s_ip, in the dtype of z (0 where P(i) is empty).

    z: [N, D] all rows (not yet normalised); classes: [N], rows of equal class are positives;
    inv_tau: 1/τ, a float or a 0-dim tensor.
    """
    z = unit_rows(z)
    n = z.shape[0]
    s = (z @ z.T) * inv_tau
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    s = s.masked_fill(self_mask, float("-inf"))
    log_prob = s - torch.logsumexp(s, dim=1, keepdim=True)
    pos_mask = (classes[:, None] == classes[None, :]) & ~self_mask
    n_pos = pos_mask.sum(1)
    return -(log_prob.masked_fill(~pos_mask, 0.0).sum(1) / n_pos.clamp(min=1))
