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
from fastssl.pairwise import SigLIPLoss, alignment_loss, hypersphere_loss, negative_cosine_similarity, siglip_loss
from fastssl.redundancy import barlow_twins_loss, vicreg_loss

__version__ = "0.1.0"
__all__ = [
    "InfoNCELoss",
    "KNNClassifier",
    "MemoryQueue",
    "NTXentLoss",
    "SigLIPLoss",
    "__version__",
    "alignment_loss",
    "barlow_twins_loss",
    "block_masking",
    "cluster_metrics",
    "cluster_pseudo_labels",
    "feature_attack",
    "hypersphere_loss",
    "info_nce",
    "instance_attack",
    "kmeans",
    "knn_classify",
    "knn_pseudo_labels",
    "knn_search",
    "masked_mse_loss",
    "mochi_logits",
    "mochi_loss",
    "negative_cosine_similarity",
    "noise_masking",
    "nt_xent",
    "patchify",
    "pgd_attack",
    "pgd_step_",
    "random_masking",
    "random_start",
    "robust_accuracy",
    "siglip_loss",
    "unpatchify",
    "unshuffle",
    "vicreg_loss",
]
