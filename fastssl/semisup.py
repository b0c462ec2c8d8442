"""Semi-supervised consistency losses: FixMatch, FlexMatch, FreeMatch, SoftMatch and UDA.

Each takes the logits of the weak and the strong view of the unlabeled batch ([B, C]) and returns
``(loss, mask)``: the consistency loss (to add to the supervised loss, scaled by λ_u) and the mask
or per-row weights it used, for logging (``mask.mean()`` is the pseudo-label rate). The weak view
only makes targets: no gradient flows into ``logits_weak``.

The losses with state (:class:`FlexMatchLoss`, :class:`FreeMatchLoss`, :class:`SoftMatchLoss`) are
``nn.Module``\\ s whose state is in buffers (``state_dict``); every ``forward`` updates it. When a
torch.distributed process group is initialised the update uses every rank's batch (the statistics
are all-reduced, FlexMatch's selections all-gathered), so every rank keeps the same state, equal to
one process's on the concatenated batch; the loss itself is the mean over the rank's own rows.

Plain PyTorch: the tensors are [B, C] with small C, far from anything a kernel would speed up.
The math and USB's conventions: docs/design.md, "Semi-supervised consistency losses".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastssl import _checks, distributed

TSA_SCHEDULES = ("linear", "log", "exp", "none")


# -- shared pieces ---------------------------------------------------------------------------------


def _check_views(logits_weak, logits_strong) -> None:
    _checks.features("logits_weak", logits_weak)
    _checks.features("logits_strong", logits_strong)
    _checks.like("logits_strong", logits_strong, "logits_weak", logits_weak)


def _weak_probs(logits_weak: Tensor) -> Tensor:
    """softmax of the weak view, detached, in the accumulation dtype."""
    return torch.softmax(logits_weak.detach().to(_checks.accumulate_dtype(logits_weak.dtype)), dim=-1)


def _nonfinite_rows(logits_weak: Tensor, logits_strong: Tensor) -> Tensor:
    """0 for a row whose logits are finite in both views, NaN otherwise; added to the mask, so that a
    non-finite logit gives a NaN mask entry and a NaN loss, never a masked-out zero."""
    ok = torch.isfinite(logits_weak.detach()).all(1) & torch.isfinite(logits_strong.detach()).all(1)
    return torch.where(ok, 0.0, math.nan).to(_checks.accumulate_dtype(logits_weak.dtype))


def _confident(max_probs: Tensor, threshold, bad_rows: Tensor) -> Tensor:
    """1 where max_probs ≥ threshold, else 0; NaN for bad rows and where the threshold is NaN (a
    state that took in a non-finite statistic), so that it shows in the loss."""
    mask = (max_probs >= threshold).to(max_probs.dtype) + bad_rows
    return mask + 0 * threshold if isinstance(threshold, Tensor) else mask


def _consistency(logits_strong: Tensor, logits_weak: Tensor, weights: Tensor, hard_label: bool, temperature: float):
    """(1/B) Σ_i w_i · CE(strong_i, target_i): target the weak view's argmax (hard) or
    softmax(weak/T) (soft); rows with w_i = 0 count in B (USB's consistency_loss)."""
    log_q = F.log_softmax(logits_strong.to(weights.dtype), dim=-1)
    weak = logits_weak.detach().to(weights.dtype)
    if hard_label:
        ce = -log_q.gather(1, weak.argmax(1, keepdim=True)).squeeze(1)
    else:
        ce = -(torch.softmax(weak / temperature, dim=-1) * log_q).sum(1)
    return (ce * weights).mean()


def _check_state_device(module: nn.Module, x: Tensor) -> None:
    device = next(module.buffers()).device
    if x.device != device:
        raise ValueError(f"logits_weak is on {x.device} but {type(module).__name__}'s state is on {device} (.to() it)")


def _check_classes(num_classes: int, x: Tensor) -> None:
    if x.shape[1] != num_classes:
        shape = tuple(x.shape)
        raise ValueError(f"logits_weak has {x.shape[1]} classes (shape {shape}), expected num_classes={num_classes}")


# -- FixMatch and UDA (no state) -------------------------------------------------------------------


def fixmatch_loss(logits_weak, logits_strong, *, threshold=0.95, temperature=1.0, hard_label=True):
    """FixMatch's unlabeled loss: pseudo-labels from the weak view where its confidence ≥ threshold,
    cross-entropy of the strong view, averaged over the whole batch (masked rows count as zero).

    Returns ``(loss, mask)``; ``mask`` [B] is 1 for the rows that counted. ``hard_label=False`` takes
    softmax(logits_weak / temperature) as a soft target (docs/design.md, "Semi-supervised
    consistency losses").
    """
    _check_views(logits_weak, logits_strong)
    threshold = _checks.probability("threshold", threshold)
    temperature = _checks.positive("temperature", temperature)
    hard_label = _checks.flag("hard_label", hard_label)
    max_probs = _weak_probs(logits_weak).amax(1)
    mask = _confident(max_probs, threshold, _nonfinite_rows(logits_weak, logits_strong))
    return _consistency(logits_strong, logits_weak, mask, hard_label, temperature), mask


def uda_loss(logits_weak, logits_strong, *, temperature=0.4, threshold=0.8):
    """UDA's unlabeled loss: KL(softmax(weak/T) ‖ softmax(strong)) on the rows whose weak-view
    confidence (at T = 1) is ≥ threshold, averaged over the whole batch. Returns ``(loss, mask)``."""
    _check_views(logits_weak, logits_strong)
    temperature = _checks.positive("temperature", temperature)
    threshold = _checks.probability("threshold", threshold)
    mask = _confident(_weak_probs(logits_weak).amax(1), threshold, _nonfinite_rows(logits_weak, logits_strong))
    target = torch.softmax(logits_weak.detach().to(mask.dtype) / temperature, dim=-1)
    log_q = F.log_softmax(logits_strong.to(mask.dtype), dim=-1)
    kl = (torch.xlogy(target, target) - target * log_q).sum(1)
    return (kl * mask).mean(), mask


def tsa_threshold(schedule, step, total_steps, num_classes) -> float:
    """UDA's training-signal annealing: labeled rows whose probability of the true class exceeds
    this threshold leave the supervised loss. α_t is t ("linear"), 1 − e^{−5t} ("log") or e^{5(t−1)}
    ("exp") with t = step/total_steps; the threshold is α_t (1 − 1/K) + 1/K (1 for "none")."""
    _checks.choice("schedule", schedule, TSA_SCHEDULES)
    total_steps = _checks.integer("total_steps", total_steps, minimum=1)
    step = _checks.integer("step", step)
    if step > total_steps:
        raise ValueError(f"step must be <= total_steps ({total_steps}), got {step}")
    num_classes = _checks.integer("num_classes", num_classes, minimum=1)
    if schedule == "none":
        return 1.0
    t = step / total_steps
    alpha = {"linear": t, "log": 1 - math.exp(-5 * t), "exp": math.exp(5 * (t - 1))}[schedule]
    return alpha * (1 - 1 / num_classes) + 1 / num_classes


# -- FlexMatch ---------------------------------------------------------------------------------------


class FlexMatchLoss(nn.Module):
    """FlexMatch: FixMatch with class-wise thresholds τ·β_c/(2 − β_c) from each class's learning effect.

    State: ``selected_label`` [num_unlabeled] (the last confident prediction of each unlabeled
    sample, −1 for "unused") and ``classwise_acc`` [C] (β). ``forward(logits_weak, logits_strong,
    indices)``, with ``indices`` the rows' positions in the unlabeled set, returns ``(loss, mask)``:
    the mask uses β from before this batch, then the batch's confident rows update the state
    (docs/design.md, "Semi-supervised consistency losses").
    """

    def __init__(self, num_classes, num_unlabeled, *, threshold=0.95, thresh_warmup=True, temperature=1.0,
                 hard_label=True):  # fmt: skip
        super().__init__()
        self.num_classes = _checks.integer("num_classes", num_classes, minimum=1)
        self.num_unlabeled = _checks.integer("num_unlabeled", num_unlabeled, minimum=1)
        self.threshold = _checks.probability("threshold", threshold)
        self.thresh_warmup = _checks.flag("thresh_warmup", thresh_warmup)
        self.temperature = _checks.positive("temperature", temperature)
        self.hard_label = _checks.flag("hard_label", hard_label)
        self.register_buffer("selected_label", torch.full((self.num_unlabeled,), -1, dtype=torch.int64))
        self.register_buffer("classwise_acc", torch.zeros(self.num_classes))

    def forward(self, logits_weak, logits_strong, indices):
        _check_views(logits_weak, logits_strong)
        _check_classes(self.num_classes, logits_weak)
        _check_state_device(self, logits_weak)
        indices = _checks.labels("indices", indices, logits_weak.shape[0], logits_weak.device)
        if bool(((indices < 0) | (indices >= self.num_unlabeled)).any()):
            raise ValueError(f"indices must be in [0, num_unlabeled={self.num_unlabeled})")
        max_probs, pred = _weak_probs(logits_weak).max(1)
        beta = self.classwise_acc[pred].to(max_probs.dtype)
        mask = _confident(max_probs, self.threshold * beta / (2 - beta), _nonfinite_rows(logits_weak, logits_strong))
        loss = _consistency(logits_strong, logits_weak, mask, self.hard_label, self.temperature)
        self._update(indices, pred, max_probs >= self.threshold)
        return loss, mask

    @torch.no_grad()
    def _update(self, indices: Tensor, pred: Tensor, select: Tensor) -> None:
        rows = torch.stack([indices, pred, select.long()], 1)
        if distributed.in_process_group():
            rows = distributed.all_gather(rows)  # every rank's selections, in rank order
        rows = rows[rows[:, 2] == 1]
        self.selected_label[rows[:, 0]] = rows[:, 1]
        # σ_c = samples last predicted c with confidence, counts[0] = the unused ones (label −1)
        counts = torch.bincount(self.selected_label + 1, minlength=self.num_classes + 1)
        # warm-up: β_c = σ_c / max(σ over the classes and "unused"); otherwise over the classes only.
        # Nothing changes while one entry (the unused ones, at first) holds every sample.
        top = counts.max() if self.thresh_warmup else counts[1:].max()
        beta = counts[1:].to(self.classwise_acc.dtype) / top
        self.classwise_acc.copy_(torch.where(counts.max() < self.num_unlabeled, beta, self.classwise_acc))


# -- FreeMatch ---------------------------------------------------------------------------------------


class FreeMatchLoss(nn.Module):
    """FreeMatch: self-adaptive thresholds τ_t · p̃_c / max p̃ from EMAs of the unlabeled batch.

    State (EMAs with momentum ``ema``): ``time_p`` (global confidence, the mean max probability),
    ``p_model`` [C] (mean class probabilities) and ``label_hist`` [C] (histogram of predictions).
    ``forward`` updates them from the weak view, then masks; returns ``(loss, mask)``. The fairness
    term is :func:`freematch_fairness_loss` (docs/design.md, "Semi-supervised consistency losses").
    """

    def __init__(self, num_classes, *, ema=0.999, temperature=1.0, hard_label=True):
        super().__init__()
        self.num_classes = _checks.integer("num_classes", num_classes, minimum=1)
        self.ema = _checks.fraction("ema", ema)
        self.temperature = _checks.positive("temperature", temperature)
        self.hard_label = _checks.flag("hard_label", hard_label)
        uniform = torch.full((self.num_classes,), 1.0 / self.num_classes)
        self.register_buffer("p_model", uniform.clone())
        self.register_buffer("label_hist", uniform.clone())
        self.register_buffer("time_p", uniform.mean())

    def forward(self, logits_weak, logits_strong):
        _check_views(logits_weak, logits_strong)
        _check_classes(self.num_classes, logits_weak)
        _check_state_device(self, logits_weak)
        probs = _weak_probs(logits_weak)
        max_probs, pred = probs.max(1)
        with torch.no_grad():
            stats = torch.cat([max_probs[:, None], probs, F.one_hot(pred, self.num_classes).to(probs.dtype)], 1)
            mean, _ = distributed.mean_over_ranks(stats)
            m = self.ema
            self.time_p.mul_(m).add_(mean[0], alpha=1 - m)
            self.p_model.mul_(m).add_(mean[1 : 1 + self.num_classes], alpha=1 - m)
            self.label_hist.mul_(m).add_(mean[1 + self.num_classes :], alpha=1 - m)
        threshold = (self.time_p * self.p_model / self.p_model.max())[pred].to(max_probs.dtype)
        mask = _confident(max_probs, threshold, _nonfinite_rows(logits_weak, logits_strong))
        return _consistency(logits_strong, logits_weak, mask, self.hard_label, self.temperature), mask


def freematch_fairness_loss(mask, logits_strong, p_model, label_hist):
    """FreeMatch's self-adaptive fairness term, as USB computes it (its ``entropy_loss``): over the
    masked rows, Σ_c p̂_c log(p̂_s,c + 1e-12) with p̂ = SumNorm(p_model / label_hist) and p̂_s =
    SumNorm(mean strong-view probabilities / their prediction histogram); 0 when no row is masked.
    Add it with a weight (USB: 0.01). Pass :class:`FreeMatchLoss`'s mask and state."""
    _checks.features("logits_strong", logits_strong)
    b, c = logits_strong.shape
    if not isinstance(mask, Tensor) or mask.shape != (b,):
        raise ValueError(f"mask must be a [{b}] tensor (one entry per row of logits_strong), got {mask!r:.80}")
    for name, v in (("p_model", p_model), ("label_hist", label_hist)):
        if not isinstance(v, Tensor) or v.shape != (c,):
            raise ValueError(f"{name} must be a [{c}] tensor (one entry per class), got {v!r:.80}")
    acc = _checks.accumulate_dtype(logits_strong.dtype)
    selected = mask.detach() != 0  # a NaN mask entry is selected, so that it shows in the loss
    if not bool(selected.any()):
        return (logits_strong.to(acc) * 0).sum()
    probs = torch.softmax(logits_strong[selected].to(acc), dim=-1)
    hist = torch.bincount(probs.detach().argmax(1), minlength=c).to(acc)
    hist = hist / hist.sum()

    def sum_norm(p: Tensor, counts: Tensor) -> Tensor:
        # p / counts with 1/0 read as 0 (a class never predicted), normalised to sum 1
        p = p * torch.where(counts == 0, 0.0, 1.0 / counts).detach()
        return p / p.sum()

    target = sum_norm(p_model.detach().to(acc), label_hist.detach().to(acc))
    return (target * torch.log(sum_norm(probs.mean(0), hist) + 1e-12)).sum()


# -- SoftMatch ---------------------------------------------------------------------------------------


class SoftMatchLoss(nn.Module):
    """SoftMatch: every row weighted by a truncated Gaussian of its confidence,
    w = exp(−min(p_max − μ, 0)² / (2σ²/n_sigma²)), μ and σ² EMAs of the batch's mean and
    (unbiased) variance of p_max.

    State: ``prob_max_mu_t``, ``prob_max_var_t`` and, for ``dist_align`` (uniform target, as USB's
    SoftMatch), ``p_model`` [C] (EMA of the class probabilities; the first batch sets it,
    ``num_updates`` counts). ``forward`` updates the state, then weights; returns ``(loss,
    weights)`` (docs/design.md, "Semi-supervised consistency losses").
    """

    def __init__(self, num_classes, *, ema=0.999, n_sigma=2, temperature=1.0, hard_label=True, dist_align=True):
        super().__init__()
        self.num_classes = _checks.integer("num_classes", num_classes, minimum=1)
        self.ema = _checks.fraction("ema", ema)
        self.n_sigma = _checks.positive("n_sigma", n_sigma)
        self.temperature = _checks.positive("temperature", temperature)
        self.hard_label = _checks.flag("hard_label", hard_label)
        self.dist_align = _checks.flag("dist_align", dist_align)
        self.register_buffer("prob_max_mu_t", torch.tensor(1.0 / self.num_classes))
        self.register_buffer("prob_max_var_t", torch.tensor(1.0))
        self.register_buffer("p_model", torch.full((self.num_classes,), 1.0 / self.num_classes))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int64))

    def forward(self, logits_weak, logits_strong):
        _check_views(logits_weak, logits_strong)
        _check_classes(self.num_classes, logits_weak)
        _check_state_device(self, logits_weak)
        if logits_weak.shape[0] < 2 and not distributed.in_process_group():
            raise ValueError("logits_weak: SoftMatchLoss needs at least 2 rows (for the variance)")
        probs = _weak_probs(logits_weak)
        m = self.ema
        with torch.no_grad():
            if self.dist_align:  # p ← SumNorm(p · (1/C + 1e-6) / (p_model + 1e-6)), p_model updated first
                batch, _ = distributed.mean_over_ranks(probs)
                ema = self.p_model * m + batch.to(self.p_model.dtype) * (1 - m)
                self.p_model.copy_(torch.where(self.num_updates == 0, batch.to(self.p_model.dtype), ema))
                probs = probs * (1.0 / self.num_classes + 1e-6) / (self.p_model.to(probs.dtype) + 1e-6)
                probs = probs / probs.sum(1, keepdim=True)
            max_probs = probs.amax(1)
            mu, n = distributed.mean_over_ranks(max_probs[:, None])
            sq, _ = distributed.mean_over_ranks((max_probs[:, None] - mu) ** 2)
            self.prob_max_mu_t.mul_(m).add_(mu[0], alpha=1 - m)
            self.prob_max_var_t.mul_(m).add_(sq[0] * n / (n - 1), alpha=1 - m)
            self.num_updates += 1
        mu, var = self.prob_max_mu_t.to(probs.dtype), self.prob_max_var_t.to(probs.dtype)
        gap = (max_probs - mu).clamp(max=0.0)
        # a row at or above the mean weighs 1, also when the variance is 0 (where the Gaussian is 0/0)
        weights = torch.where(gap == 0, 1.0, torch.exp(-(gap**2) / (2 * var / self.n_sigma**2)))
        weights = weights + _nonfinite_rows(logits_weak, logits_strong)
        return _consistency(logits_strong, logits_weak, weights, self.hard_label, self.temperature), weights
