"""DINO, iBOT and SwAV prototype losses fused with the last layer, and KoLeo: checks, dispatch, autograd.

Teacher rows r = (g, b) (G crops of B samples), student rows i = (v, b) (V crops). With logits
s = student·weightᵀ and t = teacher·teacher_weightᵀ, every loss here is

    L = Σ_i α_i lse_i − Σ_{g,i} W_{g,i} dot_{g,i},                                              (1)
    lse_i = LSE_k(s_ik/τ_s),  dot_{g,i} = Σ_k q_{(g,b(i)),k} s_ik/τ_s,  α_i = Σ_g W_{g,i},

because −Σ_k q log softmax(s/τ_s)_k = lse − Σ_k q s/τ_s when Σ_k q = 1. W holds the pairs and their
weights: DINO and SwAV 1/(B·|P|) on the pairs (g, v ≠ g), iBOT w_p/n_images on the pair (p, p).
The teacher distribution is q_rk = exp(t_rk/τ_t + a_gk + β_r) (docs/design.md, "DINO, iBOT and
SwAV prototype losses"): a = −c/τ_t and β = −LSE (softmax, one pass `fastssl::dino_teacher_lse`), or
a = log u − m and β = log v from Sinkhorn-Knopp on scalings u ∈ R^K, v ∈ R^R of exp(t/τ − m)
(2·iterations + 1 passes of `fastssl::dino_sinkhorn_sums`, the sums all-reduced over ranks; on one
process `fastssl::dino_sinkhorn`, one pass per iteration).
`fastssl::dino_loss_stats` computes (lse, dot) tile by tile over K (in C++ also the softmax's β, in
the same pass) and its backward recomputes the tiles; nothing [rows, K] is ever stored (csrc/cpu/dino.cpp).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from fastssl import _checks, _ext
from fastssl.reference import dino as reference

CENTERINGS = ("center", "sinkhorn", "none")


# -- custom ops ------------------------------------------------------------------------------------


@torch.library.custom_op("fastssl::dino_teacher_lse", mutates_args=())
def dino_teacher_lse(
    teacher: Tensor, teacher_weight: Tensor, shift: Tensor, inv_tau: float, impl: str
) -> tuple[Tensor, Tensor]:
    """(LSE_k(inv_tau·t_rk + shift_k), max_k of the same) per teacher row [R], t = teacher·teacher_weightᵀ."""
    kernel = _ext.kernel(impl, teacher.device, cpp="dino_teacher_lse_cpu", triton="dino.dino_teacher_lse")
    lse, row_max = kernel(teacher, teacher_weight, shift, inv_tau)
    return lse, row_max


@dino_teacher_lse.register_fake
def _(teacher, teacher_weight, shift, inv_tau, impl):
    acc = _checks.accumulate_dtype(teacher.dtype)
    return teacher.new_empty(teacher.shape[0], dtype=acc), teacher.new_empty(teacher.shape[0], dtype=acc)


@torch.library.custom_op("fastssl::dino_sinkhorn_sums", mutates_args=())
def dino_sinkhorn_sums(
    teacher: Tensor, teacher_weight: Tensor, inv_tau: float, shift: float, u: Tensor, v: Tensor, impl: str
) -> tuple[Tensor, Tensor]:
    """With E_rk = exp(inv_tau·t_rk − shift)·u_k·v_r: (Σ_r E_rk [K], Σ_k E_rk [R])."""
    kernel = _ext.kernel(impl, teacher.device, cpp="dino_sinkhorn_sums_cpu", triton="dino.dino_sinkhorn_sums")
    rows, cols = kernel(teacher, teacher_weight, inv_tau, shift, u, v)
    return rows, cols


@dino_sinkhorn_sums.register_fake
def _(teacher, teacher_weight, inv_tau, shift, u, v, impl):
    acc = _checks.accumulate_dtype(teacher.dtype)
    return teacher.new_empty(teacher_weight.shape[0], dtype=acc), teacher.new_empty(teacher.shape[0], dtype=acc)


@torch.library.custom_op("fastssl::dino_sinkhorn", mutates_args=())
def dino_sinkhorn(
    teacher: Tensor, teacher_weight: Tensor, inv_tau: float, iterations: int, impl: str
) -> tuple[Tensor, Tensor]:
    """Sinkhorn-Knopp on one process's rows, one pass per iteration: (a [K], β [R]) with
    q_rk = exp(inv_tau·t_rk + a_k + β_r)."""
    kernel = _ext.kernel(impl, teacher.device, cpp="dino_sinkhorn_cpu")
    a, beta = kernel(teacher, teacher_weight, inv_tau, iterations)
    return a, beta


@dino_sinkhorn.register_fake
def _(teacher, teacher_weight, inv_tau, iterations, impl):
    acc = _checks.accumulate_dtype(teacher.dtype)
    return teacher.new_empty(teacher_weight.shape[0], dtype=acc), teacher.new_empty(teacher.shape[0], dtype=acc)


@torch.library.custom_op("fastssl::dino_loss_stats", mutates_args=())
def dino_loss_stats(
    student: Tensor,
    weight: Tensor,
    teacher: Tensor,
    teacher_weight: Tensor,
    a: Tensor,
    beta: Tensor,
    inv_tau_s: float,
    inv_tau_t: float,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(lse [N], dot [G, N], β [R]) of (1), with q from a [G, K] and beta [R]; G = a.shape[0], B = R/G.
    C++ only: beta empty ([0]) makes q the softmax over k of t/τ_t + a, its normaliser β = −LSE found
    in the same pass over the tiles (online, as the student's) and returned: no pass of its own."""
    kernel = _ext.kernel(impl, student.device, cpp="dino_loss_fwd_cpu", triton="dino.dino_loss_fwd")
    if impl == "cpp":
        lse, dots, beta = kernel(student, weight, teacher, teacher_weight, a, beta, inv_tau_s, inv_tau_t)
        return lse, dots, beta
    lse, dots = kernel(student, weight, teacher, teacher_weight, a, beta, inv_tau_s, inv_tau_t)
    return lse, dots, beta.clone()


@dino_loss_stats.register_fake
def _(student, weight, teacher, teacher_weight, a, beta, inv_tau_s, inv_tau_t, impl):
    acc = _checks.accumulate_dtype(student.dtype)
    n, r = student.shape[0], teacher.shape[0]
    return student.new_empty(n, dtype=acc), student.new_empty(a.shape[0], n, dtype=acc), student.new_empty(r, dtype=acc)


@torch.library.custom_op("fastssl::dino_loss_stats_backward", mutates_args=())
def dino_loss_stats_backward(
    grad_lse: Tensor,
    grad_dots: Tensor,
    student: Tensor,
    weight: Tensor,
    teacher: Tensor,
    teacher_weight: Tensor,
    a: Tensor,
    beta: Tensor,
    lse: Tensor,
    inv_tau_s: float,
    inv_tau_t: float,
    impl: str,
) -> tuple[Tensor, Tensor]:
    """(dL/dstudent, dL/dweight): G = (grad_lse·p + Σ_g grad_dots_g·q_g)/τ_s, then G·weight and Gᵀ·student."""
    kernel = _ext.kernel(impl, student.device, cpp="dino_loss_bwd_cpu", triton="dino.dino_loss_bwd")
    return kernel(grad_lse, grad_dots, student, weight, teacher, teacher_weight, a, beta, lse, inv_tau_s, inv_tau_t)


@dino_loss_stats_backward.register_fake
def _(grad_lse, grad_dots, student, weight, teacher, teacher_weight, a, beta, lse, inv_tau_s, inv_tau_t, impl):
    return torch.empty_like(student), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    student, weight, teacher, teacher_weight, a, _, inv_tau_s, inv_tau_t, impl = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(student, weight, teacher, teacher_weight, a, output[2], output[0])
    ctx.inv_tau_s, ctx.inv_tau_t, ctx.impl = inv_tau_s, inv_tau_t, impl


def _backward(ctx, grad_lse, grad_dots, _grad_beta):
    student, weight, teacher, teacher_weight, a, beta, lse = ctx.saved_tensors
    grad_student, grad_weight = dino_loss_stats_backward(
        grad_lse.contiguous(), grad_dots.contiguous(), student, weight, teacher, teacher_weight, a, beta, lse,
        ctx.inv_tau_s, ctx.inv_tau_t, ctx.impl,
    )  # fmt: skip
    return grad_student, grad_weight, None, None, None, None, None, None, None


dino_loss_stats.register_autograd(_backward, setup_context=_setup_context)


# -- teacher distributions ---------------------------------------------------------------------------


def _all_reduce(x: Tensor, op=None) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op is None else op)
    return x


def teacher_scalings(
    teacher: Tensor, teacher_weight: Tensor, center: Tensor | None, tau_t: float, centering: str, iterations: int,
    impl: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(a [K], β [R]) with q_rk = exp(t_rk/τ_t + a_k + β_r): the teacher's softmax with or without
    the center, or DINOv2's Sinkhorn-Knopp over every rank's rows. For the softmax in C++, β is
    empty: `dino_loss_stats` finds it in its own pass."""
    acc = _checks.accumulate_dtype(teacher.dtype)
    k = teacher_weight.shape[0]
    if centering == "sinkhorn":
        return _sinkhorn(teacher, teacher_weight, 1.0 / tau_t, iterations, impl)
    shift = teacher.new_zeros(k, dtype=acc) if center is None else center.reshape(k).to(acc) / -tau_t
    if impl == "cpp":
        return shift, teacher.new_empty(0, dtype=acc)
    lse, _ = dino_teacher_lse(teacher, teacher_weight, shift, 1.0 / tau_t, impl)
    return shift, -lse


def _sinkhorn(teacher: Tensor, teacher_weight: Tensor, inv_tau: float, iterations: int, impl: str):
    """Sinkhorn-Knopp (DINOv2's `sinkhorn_knopp_teacher`, SwAV's `distributed_sinkhorn`) on the
    scalings of E = exp(t/τ − m), m the one global max of t/τ over all ranks: a global factor
    cancels in the first normalisation, so the result is DINOv2's; a per-row shift would not be.
    On one process the C++ kernel fuses each iteration into one pass over the tiles
    (`fastssl::dino_sinkhorn`: iterations passes instead of 2·iterations + 2)."""
    one_process = not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
    if impl == "cpp" and iterations >= 1 and one_process:
        return dino_sinkhorn(teacher, teacher_weight, inv_tau, iterations, impl)
    acc = _checks.accumulate_dtype(teacher.dtype)
    r, k = teacher.shape[0], teacher_weight.shape[0]
    _, row_max = dino_teacher_lse(teacher, teacher_weight, teacher.new_zeros(k, dtype=acc), inv_tau, impl)
    m = float(_all_reduce(row_max.max(), dist.ReduceOp.MAX if dist.is_available() else None))
    n_total = float(_all_reduce(torch.tensor(float(r), dtype=acc, device=teacher.device)))
    u, v = teacher.new_ones(k, dtype=acc), teacher.new_ones(r, dtype=acc)
    rows, _ = dino_sinkhorn_sums(teacher, teacher_weight, inv_tau, m, u, v, impl)
    total = _all_reduce(rows).sum()
    v, rows = v / total, rows / total  # Q /= sum(Q)
    for it in range(iterations):
        if it > 0:
            rows = _all_reduce(dino_sinkhorn_sums(teacher, teacher_weight, inv_tau, m, u, v, impl)[0])
        u = u / (rows * k)  # every prototype's total to 1/K
        _, cols = dino_sinkhorn_sums(teacher, teacher_weight, inv_tau, m, u, v, impl)
        v = v / (cols * n_total)  # every row's total to 1/B
    return u.log() - m, (v * n_total).log()  # Q *= B: rows are distributions


def _pair_loss(student, weight, teacher, teacher_weight, a, beta, pairs: Tensor, row_weights, tau_s, tau_t, impl):
    """(1) with W_{g,(v,b)} = pairs[g, v]·row_weights[b]; a [G, K], β [G·B]."""
    g = pairs.shape[0]
    lse, dots, _ = dino_loss_stats(
        student, weight, teacher.detach(), teacher_weight.detach(), a.contiguous(), beta.contiguous(),
        1.0 / tau_s, 1.0 / tau_t, impl,
    )  # fmt: skip
    w = (pairs.to(lse.dtype)[:, :, None] * row_weights.to(lse.dtype)).reshape(g, -1)
    return (w.sum(0) * lse).sum() - (w * dots).sum()


# -- checks ----------------------------------------------------------------------------------------------


def _check_prototype_inputs(student, teacher, weight, teacher_weight, tau_s, tau_t, centering, iterations):
    _checks.features("student", student)
    _checks.features("teacher", teacher)
    _checks.features("weight", weight)
    _checks.features("teacher_weight", teacher_weight)
    _checks.like("teacher", teacher, "student", student, dims=[1])
    _checks.like("weight", weight, "student", student, dims=[1])
    _checks.like("teacher_weight", teacher_weight, "weight", weight)
    _checks.positive("student_temperature", tau_s)
    _checks.positive("teacher_temperature", tau_t)
    _checks.choice("centering", centering, CENTERINGS)
    _checks.integer("sinkhorn_iterations", iterations)


def _check_center(center, weight: Tensor, centering: str):
    if center is None:
        return None
    if not isinstance(center, Tensor) or not center.dtype.is_floating_point:
        raise TypeError(f"center must be a floating tensor [K] or None, got {type(center).__name__}")
    k = weight.shape[0]
    if center.numel() != k or center.dim() > 2:
        raise ValueError(f"center must have shape ({k},) or (1, {k}), got {tuple(center.shape)}")
    if center.device != weight.device:
        raise ValueError(f"center is on {center.device} but weight is on {weight.device}")
    return center.detach() if centering == "center" else None


def _crops(name: str, rows: int, batch: int, what: str) -> int:
    if rows % batch:
        raise ValueError(f"{name} has {rows} rows, not a multiple of {what} {batch}")
    return rows // batch


# -- public ops --------------------------------------------------------------------------------------


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
    impl: str = "auto",
) -> Tensor:
    """DINO's loss (main_dino.py's `DINOLoss`) fused with the student's and teacher's last layer.

    Args:
        student: [V·B, d] the student head's output before its last layer (DINO L2-normalises it;
            the op does not), crop-major: rows v·B … (v+1)·B − 1 are crop v, the first
            `n_global_crops` crops the global ones.
        teacher: [n_global_crops·B, d] the same for the teacher's global crops (no gradient).
        weight: [K, d] the student's last layer as used (with `weight_norm`, the normalised weight;
            its gradient flows back through the parametrisation).
        teacher_weight: [K, d] the teacher's last layer (no gradient).
        center: [K] or [1, K] DINO's center for ``centering="center"`` (None: a zero center).
        centering: "center" (softmax((t − c)/τ_t)), "sinkhorn" (DINOv2's Sinkhorn-Knopp over the
            teacher rows of every rank, `sinkhorn_iterations` iterations) or "none" (softmax(t/τ_t)).
        impl: "auto", "reference" (the logits materialised) or "cpp".

    Returns the mean over the pairs (g, v ≠ g) of mean_b −Σ_k q_{g,b,k} log softmax(s_{v,b}/τ_s)_k,
    s = student·weightᵀ, t = teacher·teacher_weightᵀ (DINOv2's `DINOLoss` sums over the pairs: multiply
    by their number). Gradients reach `student` and `weight` only. fp32 (fp64 for fp64 inputs).
    """
    _check_prototype_inputs(
        student, teacher, weight, teacher_weight, student_temperature, teacher_temperature, centering,
        sinkhorn_iterations,
    )  # fmt: skip
    center = _check_center(center, weight, centering)
    g = _checks.integer("n_global_crops", n_global_crops, minimum=1)
    b = _crops("teacher", teacher.shape[0], g, "n_global_crops =")
    v = _crops("student", student.shape[0], b, "the batch size B = teacher rows / n_global_crops =")
    if v < g:
        raise ValueError(f"n_global_crops = {g} is more than the student's {v} crops")
    if v == 1:
        raise ValueError("the student has one crop and the teacher one: no pair (g, v) with v != g")
    impl = _ext.resolve_impl(impl, student.device)
    if impl == "reference":
        return reference.dino_loss(
            student, teacher, weight, teacher_weight, center, n_global_crops=g, student_temperature=student_temperature,
            teacher_temperature=teacher_temperature, centering=centering, sinkhorn_iterations=sinkhorn_iterations,
        )  # fmt: skip
    a, beta = teacher_scalings(
        teacher, teacher_weight, center, teacher_temperature, centering, sinkhorn_iterations, impl
    )
    pairs = 1.0 - torch.eye(g, v, dtype=a.dtype, device=a.device)  # (g, v) with v ≠ g
    rows = torch.full((b,), 1.0 / (b * float(pairs.sum())), dtype=a.dtype, device=a.device)
    return _pair_loss(
        student, weight, teacher, teacher_weight, a.expand(g, -1), beta, pairs, rows, student_temperature,
        teacher_temperature, impl,
    )  # fmt: skip


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
    impl: str = "auto",
) -> Tensor:
    """iBOT's masked patch loss (DINOv2's `iBOTPatchLoss.forward_masked`) fused with the last layer.

    `student`, `teacher`: the masked patch tokens [M, d] before the last layer, token p of the
    student against token p of the teacher. Returns −(1/n_images) Σ_p w_p Σ_k q_{p,k} log
    softmax(s_p/τ_s)_k with w = `token_weights` (DINOv2's `masks_weight`, 1/(masked tokens of p's
    image); None: 1) and `n_images` (None: M, the mean over tokens). With ``centering="sinkhorn"``
    the masked tokens of every rank form one assignment problem, as in DINOv2.
    """
    _check_prototype_inputs(
        student, teacher, weight, teacher_weight, student_temperature, teacher_temperature, centering,
        sinkhorn_iterations,
    )  # fmt: skip
    _checks.like("teacher", teacher, "student", student)
    center = _check_center(center, weight, centering)
    m = student.shape[0]
    if token_weights is not None:
        token_weights = _checks.per_sample("token_weights", token_weights, student)
    n = m if n_images is None else _checks.integer("n_images", n_images, minimum=1)
    impl = _ext.resolve_impl(impl, student.device)
    if impl == "reference":
        return reference.ibot_loss(
            student, teacher, weight, teacher_weight, center, token_weights=token_weights, n_images=n,
            student_temperature=student_temperature, teacher_temperature=teacher_temperature,
            centering=centering, sinkhorn_iterations=sinkhorn_iterations,
        )  # fmt: skip
    a, beta = teacher_scalings(
        teacher, teacher_weight, center, teacher_temperature, centering, sinkhorn_iterations, impl
    )
    rows = (torch.ones(m, dtype=a.dtype, device=a.device) if token_weights is None else token_weights.to(a.dtype)) / n
    pairs = torch.ones(1, 1, dtype=a.dtype, device=a.device)
    return _pair_loss(
        student, weight, teacher, teacher_weight, a.unsqueeze(0), beta, pairs, rows, student_temperature,
        teacher_temperature, impl,
    )  # fmt: skip


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
    impl: str = "auto",
) -> Tensor:
    """SwAV's loss (main_swav.py) fused with the prototype layer.

    `z` [n_crops·B, d]: the normalised embeddings, crop-major; `prototypes` [K, d] (SwAV normalises
    them before each step). The codes of each of the first `n_crops_for_assign` crops come from
    `distributed_sinkhorn` (ε = `epsilon`, no gradient) over that crop's rows, after the rows of
    `queue` ([Q, d] shared by the assigned crops, or [n_crops_for_assign, Q, d] one each, as SwAV's);
    every other crop's softmax(z·prototypesᵀ/temperature) is scored against them and the terms are
    averaged as SwAV does. The queue is read, not updated (fastssl.MemoryQueue can hold it).
    """
    _checks.features("z", z)
    _checks.features("prototypes", prototypes)
    _checks.like("prototypes", prototypes, "z", z, dims=[1])
    _checks.positive("temperature", temperature)
    _checks.positive("epsilon", epsilon)
    _checks.integer("sinkhorn_iterations", sinkhorn_iterations)
    v = _checks.integer("n_crops", n_crops, minimum=2)
    g = _checks.integer("n_crops_for_assign", n_crops_for_assign, minimum=1)
    if g > v:
        raise ValueError(f"n_crops_for_assign = {g} is more than n_crops = {v}")
    b = _crops("z", z.shape[0], v, "n_crops =")
    if queue is not None:
        _checks.features("queue", queue, ndim=queue.dim() if isinstance(queue, Tensor) and queue.dim() == 3 else 2)
        _checks.like("queue", queue.reshape(-1, queue.shape[-1]), "z", z, dims=[1])
        if queue.dim() == 3 and queue.shape[0] != g:
            raise ValueError(f"queue [n_crops_for_assign, Q, d] must have {g} queues, got shape {tuple(queue.shape)}")
    impl = _ext.resolve_impl(impl, z.device)
    if impl == "reference":
        return reference.swav_loss(
            z, prototypes, n_crops=v, n_crops_for_assign=g, temperature=temperature, epsilon=epsilon,
            sinkhorn_iterations=sinkhorn_iterations, queue=queue,
        )  # fmt: skip
    codes = []
    for i in range(g):  # one Sinkhorn per assigned crop, over its queue's rows and then its own
        rows = z[i * b : (i + 1) * b].detach()
        if queue is not None:
            rows = torch.cat([(queue if queue.dim() == 2 else queue[i]).detach(), rows])
        codes.append(_sinkhorn(rows, prototypes.detach(), 1.0 / epsilon, sinkhorn_iterations, impl))
    a = torch.stack([c[0] for c in codes])
    beta = torch.cat([c[1][-b:] for c in codes])
    pairs = 1.0 - torch.eye(g, v, dtype=a.dtype, device=a.device)
    rows = torch.full((b,), 1.0 / (b * float(pairs.sum())), dtype=a.dtype, device=a.device)
    return _pair_loss(z, prototypes, z[: g * b], prototypes, a, beta, pairs, rows, temperature, epsilon, impl)


def batch_center(teacher: Tensor, teacher_weight: Tensor) -> Tensor:
    """The mean teacher logit over every rank's rows [K] in fp32 (fp64 for fp64): mean(teacher)·teacher_weightᵀ,
    exact because the last layer has no bias, so no [B, K] tensor is made."""
    acc = _checks.accumulate_dtype(teacher.dtype)
    with torch.no_grad():
        total = _all_reduce(teacher.detach().to(acc).sum(0))
        n = _all_reduce(torch.tensor(float(teacher.shape[0]), dtype=acc, device=teacher.device))
        return teacher_weight.detach().to(acc) @ (total / n)


def koleo_loss(x: Tensor, *, eps: float = 1e-8) -> Tensor:
    """DINOv2's KoLeo regulariser: −mean_i log(‖x̂_i − x̂_nn(i) + eps‖ + eps), x̂ the rows normalised
    and nn(i) the row of largest cosine with x̂_i other than i itself, found in row blocks (O(N·D)
    memory; no gradient through the choice).

    Ties go to the lowest index. The row itself is never its own neighbour (lightly's −2 on the
    diagonal; DINOv2's −1 could tie with an antipodal row). A duplicate row is the nearest
    neighbour at distance eps·√D, a finite, large term. At least two rows.
    """
    _checks.features("x", x)
    eps = _checks.positive("eps", eps)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"x must have at least 2 rows (each row's nearest neighbour is another row), got {n}")
    xn = F.normalize(x.to(_checks.accumulate_dtype(x.dtype)), eps=eps, p=2, dim=-1)
    nearest = torch.empty(n, dtype=torch.int64, device=x.device)
    chunk = max(64, x.shape[1])  # row blocks of [chunk, N] scores: O(N·D) memory
    with torch.no_grad():
        for i0 in range(0, n, chunk):
            dots = xn[i0 : i0 + chunk] @ xn.t()
            dots.diagonal(i0).fill_(-2.0)  # never the row itself (below every cosine)
            nearest[i0 : i0 + chunk] = dots.argmax(dim=1)  # ties: the lowest index
    distances = F.pairwise_distance(xn, xn[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


def teacher_temperature_schedule(warmup: float, final: float, warmup_epochs: int, epochs: int) -> list[float]:
    """DINO's teacher temperature per epoch (main_dino.py): `warmup_epochs` values from `warmup` to
    `final` (numpy.linspace), then `final`; index it by epoch."""
    _checks.positive("warmup", warmup)
    _checks.positive("final", final)
    w = _checks.integer("warmup_epochs", warmup_epochs)
    e = _checks.integer("epochs", epochs, minimum=1)
    if w > e:
        raise ValueError(f"warmup_epochs = {w} is more than epochs = {e}")
    ramp = [warmup + (final - warmup) * i / (w - 1) for i in range(w)] if w > 1 else [warmup] * w
    return ramp + [final] * (e - w)
