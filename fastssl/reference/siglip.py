"""SigLIP the eager way: the whole M×N logits and labels, as open_clip's SigLipLoss and big_vision write it."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def siglip_rows(image: Tensor, text: Tensor, scale, bias, offset: int = 0) -> Tensor:
    """Per-row losses −Σ_j log σ(z_ij l_ij) [M] in the dtype of the inputs.

    image: [M, D], text: [N, D] (not yet normalised); l_ij = scale·x̂_i·ŷ_j + bias; z_ij = +1 for
    j = i + offset (the positives), −1 elsewhere. scale and bias: floats or 0-dim tensors.
    """
    x, y = F.normalize(image, dim=1), F.normalize(text, dim=1)
    logits = scale * (x @ y.T) + bias
    labels = -logits.new_ones(logits.shape)
    labels.diagonal(offset).fill_(1.0)
    return -F.logsigmoid(labels * logits).sum(1)
