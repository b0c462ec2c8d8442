"""Decoupled contrastive learning the eager way: the whole similarity matrices, as lightly writes it."""

from __future__ import annotations

import torch
from torch import Tensor

from fastssl._rows import unit_rows


def dcl_weights(z1: Tensor, z2: Tensor, sigma: float) -> Tensor:
    """DCLW's weights w_i = 2 − B·softmax_i(z1_i·z2_i/σ) of unit rows (detached, as in the paper)."""
    sim = (z1.detach() * z2.detach()).sum(1) / sigma
    return 2 - z1.shape[0] * torch.softmax(sim, 0)


def dcl_rows(z1: Tensor, z2: Tensor, inv_tau, sigma: float | None) -> Tensor:
    """Per-sample loss [B]: the mean of the two views' rows ℓ_i = LSE_{j≠i}(s(a_i, a_j), s(a_i, b_j)) − w_i s(a_i, b_i)
    with (a, b) = (z1, z2) and (z2, z1), s(x, y) = x·y/τ on unit rows; w = 1, or DCLW's weights with `sigma`."""
    a, b = unit_rows(z1), unit_rows(z2)
    w = 1.0 if sigma is None else dcl_weights(a, b, sigma)
    eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)

    def view(x, y):
        logits = torch.cat([x @ x.T, x @ y.T], 1) * inv_tau
        negatives = logits.masked_fill(torch.cat([eye, eye], 1), -torch.inf).logsumexp(1)
        return negatives - w * (x * y).sum(1) * inv_tau

    return 0.5 * (view(a, b) + view(b, a))
