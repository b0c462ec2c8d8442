"""MoCHi the materialising way: every synthetic negative is built as a row of a [B, S, D] tensor,
as public implementations do (Kalantidis et al. 2020, "Hard Negative Mixing for Contrastive Learning").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl._rows import unit_rows


def mochi_logits(q: Tensor, k: Tensor, queue: Tensor, n_hard: int, draw, inv_tau: float) -> Tensor:
    """Logits [B, 1 + K + S], fp32 (fp64 for fp64 q): positive q̂·k̂, queue q̂·n̂, synthetic q̂·h, times inv_tau.

    q, k [B, D] and queue [K, D] (a constant) are normalised here. Each query's hard set is its
    top-n_hard queue rows by q̂·n̂, their indices in increasing order (H_b); draw(B, n_hard) returns
    (first, second, weight) [B, S] as fastssl.ops.mochi.draw_negatives does, positions in H_b:
    synthetic negative s of query b is h = norm(w·a + (1 − w)·n) with w = weight[b, s], n = queue[H_b[second[b, s]]]
    and a = queue[H_b[first[b, s]]], or a = the detached query where first[b, s] = −1. h is detached.
    """
    q, k, queue = unit_rows(q), unit_rows(k), unit_rows(queue.detach())
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ queue.T
    hard = torch.topk(neg.detach(), min(n_hard, queue.shape[0]), dim=1, sorted=False).indices.sort(dim=1).values
    first, second, weight = draw(*hard.shape)
    first = torch.where(first < 0, first, hard.gather(1, first.clamp(min=0)))
    second = hard.gather(1, second)
    # the mixed vectors, [B, S, D]: pairs of queue rows, or the detached query and a queue row
    a = torch.where(first[..., None] < 0, q.detach()[:, None, :], queue[first.clamp(min=0)])
    n = queue[second]
    w = weight[..., None].to(q.dtype)
    h = F.normalize(w * a + (1 - w) * n, dim=2).detach()
    mixed = torch.einsum("bd,bsd->bs", q, h)
    return torch.cat([pos, neg, mixed], dim=1).to(torch.promote_types(q.dtype, torch.float32)) * inv_tau
