"""Weighted kNN the brute-force way: the whole query × train similarity matrix, in fp64."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_search(train: Tensor, query: Tensor, k: int, leave_one_out: bool = False) -> tuple[Tensor, Tensor]:
    """Top-k cosine similarities [Q, k] (fp64) and their train indices [Q, k], best first.

    With ``leave_one_out`` the queries are the train rows and each is excluded from its own list.
    """
    sims = F.normalize(query.double(), dim=1) @ F.normalize(train.double(), dim=1).T
    if leave_one_out:
        sims.fill_diagonal_(float("-inf"))
    return sims.topk(k, dim=1)


def knn_scores(
    train: Tensor,
    train_labels: Tensor,
    query: Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    leave_one_out: bool = False,
) -> Tensor:
    """DINO's voting: one-hot labels of the neighbours times exp(s/T), summed; rows divided by their total."""
    sims, idx = knn_search(train, query, k, leave_one_out)
    weights = torch.exp(sims / temperature)  # [Q, k]
    one_hot = F.one_hot(train_labels[idx], num_classes).double()  # [Q, k, C]
    scores = (one_hot * weights[:, :, None]).sum(1)
    return scores / scores.sum(1, keepdim=True)


def kmeans_objective(x: Tensor, centroids: Tensor, assignments: Tensor) -> float:
    """Σ_i ‖x_i − c_{a(i)}‖², the k-means objective (scikit-learn's inertia), in fp64."""
    return float(((x.double() - centroids.double()[assignments]) ** 2).sum())
