"""fastssl: kernel-accelerated losses and tools for self-supervised, semi-supervised and robust training."""

from fastssl.contrastive import NTXentLoss, nt_xent
from fastssl.mixing import MemoryQueue, mochi_logits, mochi_loss

__version__ = "0.1.0"
__all__ = ["MemoryQueue", "NTXentLoss", "__version__", "mochi_logits", "mochi_loss", "nt_xent"]
