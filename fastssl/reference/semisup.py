"""Plain-PyTorch references for the semi-supervised consistency losses, written from USB
(microsoft/Semi-supervised-learning): semilearn/algorithms/{fixmatch,flexmatch,freematch,softmatch,
uda} and semilearn/algorithms/hooks (FixedThresholdingHook, PseudoLabelingHook, DistAlignEMAHook),
in their order of operations, with their state as plain attributes. One process: the 2-process
tests compare the fastssl modules against these on the concatenated batch.

Two deliberate differences from USB, as fastssl defines the losses (docs/design.md,
"Semi-supervised consistency losses"):

* soft pseudo-labels are softmax(logits_weak / T) everywhere. USB's FixMatch, FlexMatch and UDA
  pass probabilities with ``softmax=False`` to PseudoLabelingHook, which then returns them as they
  are, so there T is never applied (with T = 1 the two agree);
* UDA's consistency is the KL divergence; USB takes the cross-entropy with the soft target, which is
  larger by the target's entropy on the masked rows (same gradient). ``uda_usb`` gives USB's value.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F


def pseudo_label(logits_weak, hard_label, T):
    """PseudoLabelingHook.gen_ulb_targets on logits."""
    logits = logits_weak.detach()
    return logits.argmax(-1) if hard_label else torch.softmax(logits / T, dim=-1)


def consistency(logits_strong, targets, mask):
    """USB's consistency_loss(..., 'ce', mask): ce_loss per row (hard or soft targets), times the
    mask, mean over the batch."""
    log_pred = F.log_softmax(logits_strong, dim=-1)
    if targets.shape == logits_strong.shape:
        loss = torch.sum(-targets * log_pred, dim=1)
    else:
        loss = F.nll_loss(log_pred, targets, reduction="none")
    return (loss * mask).mean()


def fixmatch(logits_weak, logits_strong, threshold, T, hard_label):
    probs = torch.softmax(logits_weak.detach(), dim=-1)
    mask = probs.max(dim=-1)[0].ge(threshold).to(probs.dtype)  # FixedThresholdingHook
    return consistency(logits_strong, pseudo_label(logits_weak, hard_label, T), mask), mask


def uda_usb(logits_weak, logits_strong, threshold, T):
    probs = torch.softmax(logits_weak.detach(), dim=-1)
    mask = probs.max(dim=-1)[0].ge(threshold).to(probs.dtype)
    return consistency(logits_strong, pseudo_label(logits_weak, False, T), mask), mask


def uda(logits_weak, logits_strong, threshold, T):
    loss, mask = uda_usb(logits_weak, logits_strong, threshold, T)
    target = pseudo_label(logits_weak, False, T)
    entropy = -(target * torch.log(target)).nan_to_num().sum(1)
    return loss - (entropy * mask).mean(), mask


def tsa(schedule, cur_iter, total_iter, num_classes):
    """UDA.TSA."""
    progress = cur_iter / total_iter
    if schedule == "none":
        return 1
    threshold = {"linear": progress, "exp": math.exp((progress - 1) * 5), "log": 1 - math.exp(-progress * 5)}
    return threshold[schedule] * (1 - 1 / num_classes) + 1 / num_classes


class FlexMatch:
    """FlexMatchThresholdingHook and FlexMatch.train_step's unlabeled part."""

    def __init__(self, num_classes, ulb_dest_len, threshold, thresh_warmup, T, hard_label, dtype=torch.float64):
        self.num_classes, self.ulb_dest_len = num_classes, ulb_dest_len
        self.p_cutoff, self.thresh_warmup, self.T, self.hard_label = threshold, thresh_warmup, T, hard_label
        self.selected_label = torch.ones((ulb_dest_len,), dtype=torch.long) * -1
        self.classwise_acc = torch.zeros((num_classes,), dtype=dtype)

    def update(self):
        pseudo_counter = Counter(self.selected_label.tolist())
        if max(pseudo_counter.values()) < self.ulb_dest_len:
            if self.thresh_warmup:
                for i in range(self.num_classes):
                    self.classwise_acc[i] = pseudo_counter[i] / max(pseudo_counter.values())
            else:
                without_unused = {k: v for k, v in pseudo_counter.items() if k != -1}
                for i in range(self.num_classes):
                    self.classwise_acc[i] = pseudo_counter[i] / max(without_unused.values())

    def __call__(self, logits_weak, logits_strong, idx_ulb):
        probs = torch.softmax(logits_weak.detach(), dim=-1)
        max_probs, max_idx = torch.max(probs, dim=-1)
        acc = self.classwise_acc[max_idx]
        mask = max_probs.ge(self.p_cutoff * (acc / (2.0 - acc))).to(max_probs.dtype)  # convex mapping
        select = max_probs.ge(self.p_cutoff)
        if idx_ulb[select].nelement() != 0:
            self.selected_label[idx_ulb[select]] = max_idx[select]
        self.update()
        return consistency(logits_strong, pseudo_label(logits_weak, self.hard_label, self.T), mask), mask


class FreeMatch:
    """FreeMatchThresholingHook and FreeMatch.train_step's unlabeled part (use_quantile and
    clip_thresh off, USB's defaults)."""

    def __init__(self, num_classes, ema, T, hard_label, dtype=torch.float64):
        self.m, self.T, self.hard_label = ema, T, hard_label
        # USB's initial state is fp32, as the fastssl modules' before .to(dtype)
        self.p_model = (torch.ones((num_classes,)) / num_classes).to(dtype)
        self.label_hist = (torch.ones((num_classes,)) / num_classes).to(dtype)
        self.time_p = (torch.ones((num_classes,)) / num_classes).mean().to(dtype)

    def update(self, probs):
        max_probs, max_idx = torch.max(probs, dim=-1, keepdim=True)
        self.time_p = self.time_p * self.m + (1 - self.m) * max_probs.mean()
        self.p_model = self.p_model * self.m + (1 - self.m) * probs.mean(dim=0)
        hist = torch.bincount(max_idx.reshape(-1), minlength=self.p_model.shape[0]).to(self.p_model.dtype)
        self.label_hist = self.label_hist * self.m + (1 - self.m) * (hist / hist.sum())

    def __call__(self, logits_weak, logits_strong):
        probs = torch.softmax(logits_weak.detach(), dim=-1)
        self.update(probs)
        max_probs, max_idx = probs.max(dim=-1)
        mod = self.p_model / torch.max(self.p_model, dim=-1)[0]
        mask = max_probs.ge(self.time_p * mod[max_idx]).to(max_probs.dtype)
        return consistency(logits_strong, pseudo_label(logits_weak, self.hard_label, self.T), mask), mask


def _replace_inf_to_zero(val):
    val[val == float("inf")] = 0.0
    return val


def freematch_entropy_loss(mask, logits_s, prob_model, label_hist):
    """FreeMatch's entropy_loss (the fairness term), 0.0 when the mask is empty (as train_step)."""
    if mask.sum() == 0:
        return torch.zeros((), dtype=logits_s.dtype)
    logits_s = logits_s[mask.bool()]
    prob_s = logits_s.softmax(dim=-1)
    _, pred_label_s = torch.max(prob_s, dim=-1)
    hist_s = torch.bincount(pred_label_s, minlength=logits_s.shape[1]).to(logits_s.dtype)
    hist_s = hist_s / hist_s.sum()
    prob_model = prob_model.reshape(1, -1)
    label_hist = label_hist.reshape(1, -1)
    mod_prob_model = prob_model * _replace_inf_to_zero(1 / label_hist).detach()
    mod_prob_model = mod_prob_model / mod_prob_model.sum(dim=-1, keepdim=True)
    mod_mean_prob_s = prob_s.mean(dim=0, keepdim=True) * _replace_inf_to_zero(1 / hist_s).detach()
    mod_mean_prob_s = mod_mean_prob_s / mod_mean_prob_s.sum(dim=-1, keepdim=True)
    loss = (mod_prob_model * torch.log(mod_mean_prob_s + 1e-12)).sum(dim=1)
    return loss.mean()


class SoftMatch:
    """DistAlignEMAHook (uniform p_target) and SoftMatchWeightingHook (per_class off) and
    SoftMatch.train_step's unlabeled part."""

    def __init__(self, num_classes, ema, n_sigma, T, hard_label, dist_align=True, dtype=torch.float64):
        self.num_classes, self.m, self.n_sigma, self.T, self.hard_label = num_classes, ema, n_sigma, T, hard_label
        self.dist_align = dist_align
        self.p_target = torch.ones((num_classes,), dtype=dtype) / num_classes
        self.p_model = None
        self.prob_max_mu_t = torch.tensor(1.0 / num_classes).to(dtype)  # fp32 at first, as USB's
        self.prob_max_var_t = torch.tensor(1.0, dtype=dtype)

    def align(self, probs):
        if self.p_model is None:
            self.p_model = torch.mean(probs, dim=0)
        else:
            self.p_model = self.p_model * self.m + torch.mean(probs, dim=0) * (1 - self.m)
        aligned = probs * (self.p_target + 1e-6) / (self.p_model + 1e-6)
        return aligned / aligned.sum(dim=-1, keepdim=True)

    def __call__(self, logits_weak, logits_strong):
        probs = torch.softmax(logits_weak.detach(), dim=-1)
        if self.dist_align:
            probs = self.align(probs)
        max_probs, _ = probs.max(dim=-1)
        self.prob_max_mu_t = self.m * self.prob_max_mu_t + (1 - self.m) * torch.mean(max_probs).item()
        self.prob_max_var_t = self.m * self.prob_max_var_t + (1 - self.m) * torch.var(max_probs, unbiased=True).item()
        mu, var = self.prob_max_mu_t, self.prob_max_var_t
        mask = torch.exp(-((torch.clamp(max_probs - mu, max=0.0) ** 2) / (2 * var / (self.n_sigma**2))))
        return consistency(logits_strong, pseudo_label(logits_weak, self.hard_label, self.T), mask), mask
