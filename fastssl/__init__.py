"""fastssl: kernel-accelerated losses and tools for self-supervised, semi-supervised and robust training."""

from fastssl.contrastive import NTXentLoss, nt_xent
from fastssl.neighbors import (
    KNNClassifier,
    cluster_metrics,
    cluster_pseudo_labels,
    kmeans,
    knn_classify,
    knn_pseudo_labels,
    knn_search,
)

__version__ = "0.1.0"
__all__ = ["NTXentLoss", "__version__", "nt_xent"]
__all__ += [
    "KNNClassifier",
    "cluster_metrics",
    "cluster_pseudo_labels",
    "kmeans",
    "knn_classify",
    "knn_pseudo_labels",
    "knn_search",
]
