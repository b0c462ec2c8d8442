"""APGD (Croce & Hein 2020) written out plainly, one run at a time, as auto-attack's
`autopgd_base.py` (`APGDAttack.attack_single_run`, `APGDAttack_targeted.perturb`) runs it.

For clarity, not speed: every point runs every step (no early exit) and the target classes of
APGD-T run one after another on the points still robust. The tests hold fastssl.apgd_attack's
batched runs to this (docs/design.md, "APGD").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12), π the classes by decreasing logit."""
    z, order = logits.sort(dim=1)
    rows = torch.arange(len(y), device=y.device)
    top_is_y = (order[:, -1] == y).to(logits.dtype)
    other = z[:, -2] * top_is_y + z[:, -1] * (1 - top_is_y)
    return -(logits[rows, y] - other) / (z[:, -1] - z[:, -3] + 1e-12)


def dlr_loss_targeted(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12)."""
    z, _ = logits.sort(dim=1)
    rows = torch.arange(len(y), device=y.device)
    return -(logits[rows, y] - logits[rows, target]) / (z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + 1e-12)


def _norms(v: Tensor, norm: str) -> Tensor:
    flat = v.reshape(len(v), -1)
    n = flat.abs().max(1)[0] if norm == "linf" else (flat**2).sum(-1).sqrt()
    return n.view(-1, *([1] * (v.dim() - 1)))


def normalize(v: Tensor, norm: str) -> Tensor:
    """v / (‖v‖ + 1e-12) per sample."""
    return v / (_norms(v, norm) + 1e-12)


def checkpoints(steps: int) -> list[int]:
    """The iterations i (0-based) after which APGD checks its step size: a first window of
    max(int(0.22 N), 1) steps, each later one shorter by max(int(0.03 N), 1), down to max(int(0.06 N), 1)."""
    first, minimum, decrease = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    out, i, k = [], first - 1, first
    while i < steps:
        out.append(i)
        k = max(k - decrease, minimum)
        i += k
    return out


def apgd_run(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    x_start: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    loss: str = "ce",
    target: Tensor | None = None,
    rho: float = 0.75,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> dict:
    """One APGD run from x_start: {"x_best_adv", "fooled", "x_best", "loss_best", "trace"}.

    trace[i] = (x_adv after step i, step size used in step i [B], reduced at the checkpoint after
    step i [B] bool, or None when i is not a checkpoint).
    """
    lo, hi = bounds

    def loss_fn(logits):
        if loss == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        if loss == "dlr":
            return dlr_loss(logits, y)
        return dlr_loss_targeted(logits, y, target)

    def loss_grad(x_adv):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x_adv)
            per = loss_fn(logits)
            (g,) = torch.autograd.grad(per.sum(), x_adv)
        return logits.detach(), per.detach(), g.detach()

    def project(x1):
        if norm == "linf":
            return torch.clamp(torch.min(torch.max(x1, x - eps), x + eps), lo, hi)
        d = x1 - x
        return torch.clamp(x + normalize(d, "l2") * torch.min(eps * torch.ones_like(x), _norms(d, "l2")), lo, hi)

    b = len(x)
    x_adv = x_start.clamp(lo, hi)
    x_best, x_best_adv = x_adv.clone(), x_adv.clone()
    loss_steps = torch.zeros(steps, b, device=x.device)  # fp32, as auto-attack keeps it
    logits, loss_cur, grad = loss_grad(x_adv)
    grad_best = grad.clone()
    acc = logits.argmax(1) == y
    loss_best = loss_cur.clone()
    step = 2.0 * eps * torch.ones(b, *([1] * (x.dim() - 1)), dtype=x.dtype, device=x.device)
    x_adv_old = x_adv.clone()
    k, counter = max(int(0.22 * steps), 1), 0
    k_min, k_decr = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    loss_best_last = loss_best.clone()
    reduced_last = torch.ones(b, dtype=torch.bool, device=x.device)
    trace = []
    for i in range(steps):
        used = step.view(-1).clone()
        grad2 = x_adv - x_adv_old
        x_adv_old = x_adv.clone()
        a = 0.75 if i > 0 else 1.0
        if norm == "linf":
            x1 = project(x_adv + step * torch.sign(grad))
        else:
            x1 = project(x_adv + step * normalize(grad, "l2"))
        x_adv = project(x_adv + (x1 - x_adv) * a + grad2 * (1 - a))

        logits, loss_cur, grad = loss_grad(x_adv)
        pred = logits.argmax(1) == y
        acc = acc & pred
        x_best_adv[~pred] = x_adv[~pred]
        loss_steps[i] = loss_cur
        better = loss_cur > loss_best
        x_best[better] = x_adv[better]
        grad_best[better] = grad[better]
        loss_best[better] = loss_cur[better]
        x_snapshot = x_adv.clone()

        counter += 1
        reduced = None
        if counter == k:
            # the loss increased in at most ρ·k of the window's steps (index −1 wraps, as in auto-attack)
            ups = sum((loss_steps[i - c] > loss_steps[i - c - 1]).float() for c in range(k))
            oscillating = ups <= k * rho
            no_gain = ~reduced_last & (loss_best_last >= loss_best)
            reduced = oscillating | no_gain
            reduced_last, loss_best_last = reduced.clone(), loss_best.clone()
            step[reduced] /= 2.0
            x_adv[reduced] = x_best[reduced]
            grad[reduced] = grad_best[reduced]
            counter, k = 0, max(k - k_decr, k_min)
        trace.append((x_snapshot, used, reduced))
    return {"x_best_adv": x_best_adv, "fooled": ~acc, "x_best": x_best, "loss_best": loss_best, "trace": trace}


def apgd_attack(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    x_init: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    loss: str = "ce",
    targeted: bool = False,
    n_target_classes: int = 9,
    rho: float = 0.75,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> tuple[Tensor, Tensor]:
    """(x_adv, success) as auto-attack's perturb: only points classified right are attacked; with
    `targeted`, target classes 2 … n_target_classes + 1 (by decreasing clean logit) one after
    another on the points still robust; x_adv is x where the attack failed; success = not robust
    (misclassified, clean or adversarial)."""
    with torch.no_grad():
        clean = model(x)
    robust = clean.argmax(1) == y
    x_adv = x.clone()
    kw = dict(eps=eps, norm=norm, steps=steps, rho=rho, bounds=bounds)
    for rank in range(2, n_target_classes + 2) if targeted else [None]:
        idx = robust.nonzero().view(-1)
        if len(idx) == 0:
            break
        if rank is None:
            out = apgd_run(model, x[idx], y[idx], x_init[idx], loss=loss, **kw)
        else:
            target = clean[idx].sort(dim=1)[1][:, -rank]
            out = apgd_run(model, x[idx], y[idx], x_init[idx], loss="dlr-targeted", target=target, **kw)
        won = idx[out["fooled"]]
        x_adv[won] = out["x_best_adv"][out["fooled"]]
        robust[won] = False
    return x_adv, ~robust
