"""DINO, iBOT, SwAV and KoLeo the eager way: the whole [rows, K] logits, as the published code writes them.

Written from facebookresearch/dino main_dino.py (`DINOLoss`), facebookresearch/dinov2
dinov2/loss/dino_clstoken_loss.py (`softmax_center_teacher`, `sinkhorn_knopp_teacher`),
ibot_patch_loss.py (`iBOTPatchLoss.forward_masked`), koleo_loss.py (`KoLeoLoss`) and
facebookresearch/swav main_swav.py (the loss and `distributed_sinkhorn`). Every function takes the
features before the last layer and the last layer's weight, so that the tests and benchmarks
compare the fused op with "last layer + loss" on materialised logits. Under torch.distributed the
teacher statistics are all-reduced as those codebases do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def teacher_probabilities(t: Tensor, center: Tensor | None, tau_t: float, centering: str, iterations: int) -> Tensor:
    """q [R, K] from teacher logits t [R, K]: DINO's softmax((t − c)/τ_t), softmax(t/τ_t), or
    DINOv2's `sinkhorn_knopp_teacher` (the rows of every rank form one assignment problem)."""
    if centering == "center" and center is not None:
        return F.softmax((t - center) / tau_t, dim=-1)
    if centering != "sinkhorn":  # "none", or no center yet
        return F.softmax(t / tau_t, dim=-1)
    return sinkhorn_knopp(t, tau_t, iterations)


@torch.no_grad()
def sinkhorn_knopp(t: Tensor, tau: float, iterations: int) -> Tensor:
    """DINOv2's `sinkhorn_knopp_teacher` (and SwAV's `distributed_sinkhorn` with ε = τ): Q = exp(t/τ)ᵀ
    [K, B], scaled to total 1, then `iterations` times rows to 1/K and columns to 1/B; columns
    end at 1. Computed in t's dtype (fp32 or fp64) as DINOv2 does after `.float()`."""
    Q = torch.exp((t if t.dtype == torch.float64 else t.float()) / tau).t()
    world = dist.get_world_size() if _distributed() else 1
    B = Q.shape[1] * world
    K = Q.shape[0]
    total = Q.sum()
    if _distributed():
        dist.all_reduce(total)
    Q = Q / total
    for _ in range(iterations):
        rows = Q.sum(dim=1, keepdim=True)
        if _distributed():
            dist.all_reduce(rows)
        Q = Q / rows / K
        Q = Q / Q.sum(dim=0, keepdim=True) / B
    return (Q * B).t()


def dino_loss(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    teacher_weight: Tensor,
    center: Tensor | None = None,
    *,
    n_global_crops: int = 2,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
    centering: str = "center",
    sinkhorn_iterations: int = 3,
) -> Tensor:
    """main_dino.py's `DINOLoss.forward` on s = student·weightᵀ and t = teacher·teacher_weightᵀ:
    the mean over the pairs (teacher crop g, student crop v ≠ g) of mean_b −Σ_k q log softmax(s/τ_s)."""
    s = student @ weight.t()
    with torch.no_grad():
        t = teacher @ teacher_weight.t()
        q = teacher_probabilities(t, center, teacher_temperature, centering, sinkhorn_iterations)
    student_out = (s / student_temperature).chunk(student.shape[0] // (teacher.shape[0] // n_global_crops))
    teacher_out = q.chunk(n_global_crops)
    total, n_terms = 0.0, 0
    for iq, qg in enumerate(teacher_out):
        for v, sv in enumerate(student_out):
            if v == iq:
                continue
            total = total + torch.sum(-qg * F.log_softmax(sv, dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms


@torch.no_grad()
def batch_center(teacher: Tensor, teacher_weight: Tensor) -> Tensor:
    """main_dino.py's `update_center` batch term: the mean of the teacher logits over every rank's rows [K]."""
    t = teacher @ teacher_weight.t()
    total = t.sum(dim=0)
    n = torch.tensor(float(t.shape[0]), dtype=total.dtype, device=total.device)
    if _distributed():
        dist.all_reduce(total)
        dist.all_reduce(n)
    return total / n


def ibot_loss(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    teacher_weight: Tensor,
    center: Tensor | None = None,
    *,
    token_weights: Tensor | None = None,
    n_images: int | None = None,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
    centering: str = "center",
    sinkhorn_iterations: int = 3,
) -> Tensor:
    """DINOv2's `iBOTPatchLoss.forward_masked` on the masked tokens [M, d]: −Σ_p w_p Σ_k q_p log
    softmax(s_p/τ_s) / n_images (w = 1 and n_images = M when not given)."""
    s = student @ weight.t()
    with torch.no_grad():
        t = teacher @ teacher_weight.t()
        q = teacher_probabilities(t, center, teacher_temperature, centering, sinkhorn_iterations)
    loss = torch.sum(q * F.log_softmax(s / student_temperature, dim=-1), dim=-1)
    if token_weights is not None:
        loss = loss * token_weights
    return -loss.sum() / (student.shape[0] if n_images is None else n_images)


def swav_loss(
    z: Tensor,
    prototypes: Tensor,
    *,
    n_crops: int = 8,
    n_crops_for_assign: int = 2,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    queue: Tensor | None = None,
) -> Tensor:
    """main_swav.py's loss on z [n_crops·B, d] (crop-major): codes of each assigned crop from
    `distributed_sinkhorn` (the queue's rows first, as SwAV concatenates them; a [Q, d] queue is
    shared by the assigned crops, an [n_crops_for_assign, Q, d] one holds one per crop, as SwAV's),
    cross-entropy of every other crop against them, averaged."""
    output = z @ prototypes.t()
    V = n_crops
    bs = z.shape[0] // V
    loss = 0.0
    for i in range(n_crops_for_assign):
        with torch.no_grad():
            out = output[bs * i : bs * (i + 1)].detach()
            if queue is not None:
                past = queue if queue.dim() == 2 else queue[i]
                out = torch.cat((past @ prototypes.detach().t(), out))
            q = sinkhorn_knopp(out, epsilon, sinkhorn_iterations)[-bs:]
        subloss = 0.0
        for v in range(V):
            if v == i:
                continue
            x = output[bs * v : bs * (v + 1)] / temperature
            subloss = subloss - torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss = loss + subloss / (V - 1)
    return loss / n_crops_for_assign


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """DINOv2's `KoLeoLoss`: rows normalised, each row's nearest neighbour by cosine with the
    diagonal excluded (DINOv2 fills it with −1, which a row can tie with only when every other
    row is its antipode; here it is −2 as in lightly, never chosen), −mean log(‖x_i − x_nn + eps‖ + eps)."""
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    dots = x @ x.t()
    dots.fill_diagonal_(-2.0)
    nn_index = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nn_index], p=2, eps=eps)
    return -torch.log(distances + eps).mean()
