"""Masked image modelling (MAE, BEiT, ColorMAE): masks, the visible-token gather, the decoder's
unshuffle and the masked reconstruction loss. See fastssl/ops/masking.py for the math."""

from __future__ import annotations

from fastssl.ops.masking import (
    block_masking,
    masked_mse_loss,
    noise_masking,
    patchify,
    random_masking,
    unpatchify,
    unshuffle,
)

__all__ = [
    "block_masking",
    "masked_mse_loss",
    "noise_masking",
    "patchify",
    "random_masking",
    "unpatchify",
    "unshuffle",
]
