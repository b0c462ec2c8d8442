"""fastssl: kernel-accelerated losses and tools for self-supervised, semi-supervised and robust training."""

from fastssl.contrastive import NTXentLoss, nt_xent

__version__ = "0.1.0"
__all__ = ["NTXentLoss", "__version__", "nt_xent"]

from fastssl.contrastive import InfoNCELoss, info_nce

__all__ += ["InfoNCELoss", "info_nce"]
