"""fastssl: kernel-accelerated losses and tools for self-supervised, semi-supervised and robust training."""

from fastssl.contrastive import NTXentLoss, nt_xent
from fastssl.masking import (
    block_masking,
    masked_mse_loss,
    noise_masking,
    patchify,
    random_masking,
    unpatchify,
    unshuffle,
)

__version__ = "0.1.0"
__all__ = ["NTXentLoss", "__version__", "nt_xent"]
__all__ += ["block_masking", "masked_mse_loss", "noise_masking", "patchify", "random_masking"]
__all__ += ["unpatchify", "unshuffle"]
