"""fastssl: kernel-accelerated losses and tools for self-supervised, semi-supervised and robust training."""

from fastssl.adversarial import feature_attack, instance_attack, pgd_attack, pgd_step_, random_start, robust_accuracy
from fastssl.contrastive import InfoNCELoss, NTXentLoss, info_nce, nt_xent
from fastssl.masking import (
    block_masking,
    masked_mse_loss,
    noise_masking,
    patchify,
    random_masking,
    unpatchify,
    unshuffle,
)
from fastssl.mixing import MemoryQueue, mochi_logits, mochi_loss
from fastssl.neighbors import (
    KNNClassifier,
    cluster_metrics,
    cluster_pseudo_labels,
    kmeans,
    knn_classify,
    knn_pseudo_labels,
    knn_search,
)
from fastssl.prototypes import (
    DINOLoss,
    IBOTLoss,
    dino_loss,
    ibot_loss,
    koleo_loss,
    swav_loss,
    teacher_temperature_schedule,
)

__version__ = "0.1.0"
__all__ = [
    "DINOLoss",
    "IBOTLoss",
    "InfoNCELoss",
    "KNNClassifier",
    "MemoryQueue",
    "NTXentLoss",
    "__version__",
    "block_masking",
    "cluster_metrics",
    "cluster_pseudo_labels",
    "dino_loss",
    "feature_attack",
    "ibot_loss",
    "info_nce",
    "instance_attack",
    "kmeans",
    "knn_classify",
    "knn_pseudo_labels",
    "knn_search",
    "koleo_loss",
    "masked_mse_loss",
    "mochi_logits",
    "mochi_loss",
    "noise_masking",
    "nt_xent",
    "patchify",
    "pgd_attack",
    "pgd_step_",
    "random_masking",
    "random_start",
    "robust_accuracy",
    "swav_loss",
    "teacher_temperature_schedule",
    "unpatchify",
    "unshuffle",
]
