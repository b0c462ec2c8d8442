"""Masked image modelling as the papers' code writes it: MAE's argsort-and-gather masking, its decoder's
unshuffle and loss (He et al. 2022, facebookresearch/mae models_mae.py), and BEiT's block-wise mask
generator (Bao et al. 2022, microsoft/unilm beit/masking_generator.py), one sample at a time.
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor


def random_masking(x: Tensor, noise: Tensor, keep: int, num_prefix_tokens: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's random_masking with the given noise [B, L]: (visible [B, P + keep, D], mask [B, L], ids_restore [B, L]).

    The P = num_prefix_tokens leading tokens are set aside and put back in front of the visible ones.
    Ties in the noise are broken by index (a stable argsort), as fastssl's kernels do.
    """
    prefix, x = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    b, l, d = x.shape
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :keep]
    x_visible = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones([b, l], device=x.device, dtype=x.dtype)  # 0 is keep, 1 is remove
    mask[:, :keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return torch.cat([prefix, x_visible], dim=1), mask, ids_restore


def unshuffle(x_visible: Tensor, ids_restore: Tensor, mask_token: Tensor, num_prefix_tokens: int = 0) -> Tensor:
    """MAE's decoder input: mask tokens appended, then gathered back into the original order."""
    prefix, x = x_visible[:, :num_prefix_tokens], x_visible[:, num_prefix_tokens:]
    b, keep, d = x.shape
    mask_tokens = mask_token.reshape(1, 1, d).to(x.dtype).repeat(b, ids_restore.shape[1] - keep, 1)
    x_ = torch.cat([x, mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, d))
    return torch.cat([prefix, x_], dim=1)


def masked_mse_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = False) -> Tensor:
    """MAE's forward_loss: mean over the masked patches of the per-patch mean squared error."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)  # [B, L], mean loss per patch
    return (loss * mask).sum() / mask.sum()  # mean loss on removed patches


def patchify(imgs: Tensor, p: int) -> Tensor:
    """MAE's patchify for [B, C, H, W]: [B, (H/p)(W/p), p·p·C], each patch's values in (row, col, channel) order."""
    b, c, height, width = imgs.shape
    h, w = height // p, width // p
    x = imgs.reshape(b, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, h * w, p * p * c)


def unpatchify(x: Tensor, p: int, h: int, w: int) -> Tensor:
    """MAE's unpatchify: [B, h·w, p·p·C] to [B, C, h·p, w·p]."""
    b, _, n = x.shape
    c = n // (p * p)
    x = x.reshape(b, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, c, h * p, w * p)


class BeitMaskingGenerator:
    """BEiT's MaskingGenerator: rectangles of at least ``min_num_patches`` patches, aspect ratio
    log-uniform in [min_aspect, max_aspect], added while they bring 0 < new ≤ budget patches; it gives
    up after 10 failed tries in a row, so a mask may hold fewer than ``num_masking_patches``.
    """

    def __init__(self, input_size, num_masking_patches, min_num_patches=16, max_num_patches=None, min_aspect=0.3,
                 max_aspect=None, seed=None):  # fmt: skip
        self.height, self.width = input_size
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = random.Random(seed)

    def _mask(self, mask: Tensor, max_mask_patches: int) -> int:
        delta = 0
        for _ in range(10):
            target_area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = round(math.sqrt(target_area * aspect_ratio))
            w = round(math.sqrt(target_area / aspect_ratio))
            if w < self.width and h < self.height:
                top = self.rng.randint(0, self.height - h)
                left = self.rng.randint(0, self.width - w)
                num_masked = int(mask[top : top + h, left : left + w].sum())
                if 0 < h * w - num_masked <= max_mask_patches:  # overlap
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self) -> Tensor:
        mask = torch.zeros(self.height, self.width, dtype=torch.int64)
        mask_count = 0
        while mask_count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask.bool()
