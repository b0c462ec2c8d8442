"""fastssl: kernel-accelerated losses and tools for self-supervised, semi-supervised and robust training."""

from fastssl.adversarial import feature_attack, instance_attack, pgd_attack, pgd_step_, random_start, robust_accuracy
from fastssl.contrastive import NTXentLoss, nt_xent

__version__ = "0.1.0"
__all__ = ["NTXentLoss", "__version__", "nt_xent"]
__all__ += ["feature_attack", "instance_attack", "pgd_attack", "pgd_step_", "random_start", "robust_accuracy"]
