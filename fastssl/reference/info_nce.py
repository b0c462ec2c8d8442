"""InfoNCE / CLIP the eager way: the whole logits matrix, as CLIP and MoCo codebases write it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl._rows import unit_rows


def info_nce_rows(query: Tensor, key: Tensor, negatives: Tensor | None, inv_tau, symmetric: bool) -> Tensor:
    """Per-row loss [M] in the dtype of the inputs: cross-entropy of row i's logits against column i.

    query, key: [M, D] (not yet normalised), positives on the diagonal; negatives: [K, D] extra
    columns of the query→key direction; inv_tau: 1/τ, a float or a 0-dim tensor. With
    ``symmetric`` the row is the mean of the query→key and key→query cross-entropies (CLIP).
    """
    q, k = unit_rows(query), unit_rows(key)
    columns = k if negatives is None else torch.cat([k, unit_rows(negatives)])
    logits = (q @ columns.T) * inv_tau
    target = torch.arange(q.shape[0], device=q.device)
    rows = F.cross_entropy(logits, target, reduction="none")
    if symmetric:
        rows = 0.5 * (rows + F.cross_entropy(logits[:, : k.shape[0]].T, target, reduction="none"))
    return rows
