"""Adversarial attacks: PGD with batched restarts, label-free attacks on encoders, robustness curves.

Every attack is projected gradient ascent (Madry et al. 2018) on a loss of the model's output,
each step the fused op :func:`fastssl.pgd_step_`. Gradients are taken with
``torch.autograd.grad`` with respect to the input only: the model's parameters' ``.grad``,
their ``requires_grad`` flags and the model's train/eval mode are left exactly as they were.
The model runs in the mode it is in; call ``model.eval()`` first if batch-norm statistics and
dropout should be frozen during the attack (torchattacks does that for you).

Robust evaluation: :func:`apgd_attack` is APGD (Croce & Hein 2020) with auto-attack's iterates
(`autopgd_base.py`; docs/design.md, "APGD"), and :func:`autoattack` runs the AutoAttack sequence.
Their speed comes from fewer and fuller forward/backward passes: all target classes (and
restarts) of a point run together as rows of one batch, and a point leaves the batch as soon as
one of its rows is misclassified (auto-attack keeps it to the end of every run).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl import _checks, _ext
from fastssl.contrastive import nt_xent
from fastssl.ops.pgd import NORMS, pgd_step, pgd_step_, step_sizes

__all__ = [
    "apgd_attack",
    "autoattack",
    "fab_attack",
    "feature_attack",
    "instance_attack",
    "mart_loss",
    "pgd_attack",
    "pgd_step_",
    "random_start",
    "robust_accuracy",
    "square_attack",
    "trades_loss",
]


def random_start(
    x: Tensor,
    eps: float | Tensor,
    *,
    norm: str = "linf",
    bounds: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """A random point near ``x`` [B, ...] (a new tensor), clamped to ``bounds``.

    L∞: x + U(−ε, ε) per element. L2 (torchattacks' convention): x + r·ε·u with u a uniformly
    random unit direction per sample and r ~ U(0, 1) (so not uniform in the ball's volume).
    ``eps`` is a number or a [B] tensor; ``generator`` (on x's device) makes the draw repeatable.
    """
    _checks.batch("x", x)
    eps_b = _checks.per_sample("eps", eps, x)
    _checks.choice("norm", norm, NORMS)
    lo, hi = _checks.interval("bounds", bounds)
    _check_inside("x", x, lo, hi)
    _checks.generator("generator", generator, x.device)
    return _random_start(x, eps_b, norm, lo, hi, generator)


def _random_start(x: Tensor, eps: Tensor, norm: str, lo: float, hi: float, generator) -> Tensor:
    acc = _checks.accumulate_dtype(x.dtype)
    shape = (-1,) + (1,) * (x.dim() - 1)
    e = eps.view(shape)
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=generator, dtype=acc, device=x.device) * 2 - 1) * e
    else:
        u = torch.randn(x.shape, generator=generator, dtype=acc, device=x.device)
        r = torch.rand(x.shape[0], generator=generator, dtype=acc, device=x.device).view(shape)
        delta = u * (r * e / torch.linalg.vector_norm(u.reshape(x.shape[0], -1), dim=1).view(shape))  # [B] x too
    return torch.clamp(x.to(acc) + delta, lo, hi).to(x.dtype)


def pgd_attack(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor | None = None,
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    eps: float | Tensor = 8 / 255,
    alpha: float | Tensor = 2 / 255,
    steps: int = 10,
    norm: str = "linf",
    restarts: int = 1,
    random_start: bool = True,
    targeted: bool = False,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
    restarts_per_forward: int | None = None,
    impl: str = "auto",
) -> Tensor:
    """Projected gradient descent (Madry et al. 2018) with batched restarts; returns x_adv (detached).

    Args:
        model: maps x [B, ...] to outputs with one row per sample (logits, or embeddings).
        x: clean inputs [B, ...] inside ``bounds``.
        y: labels passed to ``loss_fn(output, y)``; with ``y=None`` the attack is label-free and
            calls ``loss_fn(output)``.
        loss_fn: the loss to maximise, returning one loss per sample [B] (best) or a scalar.
            Default: cross-entropy (needs ``y``). Its mean over the batch is differentiated.
        eps, alpha: radius ε ≥ 0 and step α > 0, numbers or [B] tensors (one per sample).
        steps: number of steps (0 returns the start point).
        norm: "linf" or "l2" (see :func:`fastssl.pgd_step_`).
        restarts: independent runs; the result keeps, per sample, the run with the highest loss
            (with a scalar loss, whole runs are compared). All runs go through the model
            together, R·B rows per forward, unless ``restarts_per_forward`` caps the rows at
            restarts_per_forward·B (for memory). With R > 1 one more forward (no gradient)
            scores the runs' final points.
        random_start: start each run at :func:`fastssl.random_start` (else at x). Run r draws
            its start r-th from ``generator``, so run 0 matches a one-run attack with the same
            generator state.
        targeted: minimise the loss instead (``y`` then holds the target labels).
        bounds: (lo, hi) valid input range, or None.
        impl: kernel of the step, as in :func:`fastssl.pgd_step_`.

    A loss that couples the samples of a batch (e.g. a contrastive loss) sees each run's B rows
    on their own. In train mode, batch-norm layers see all R·B rows of a forward at once.
    """
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    _checks.batch("x", x)
    eps_b, alpha_b = step_sizes(x, eps, alpha)
    steps = _checks.integer("steps", steps, minimum=0)
    restarts = _checks.integer("restarts", restarts, minimum=1)
    per_forward = (
        restarts
        if restarts_per_forward is None
        else _checks.integer("restarts_per_forward", restarts_per_forward, minimum=1)
    )
    _checks.choice("norm", norm, NORMS)
    lo, hi = _checks.interval("bounds", bounds)
    _check_inside("x", x, lo, hi)
    _checks.generator("generator", generator, x.device)
    loss_fn = _loss_function(loss_fn, y, x)
    impl = _ext.resolve_impl(impl, x.device)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("pgd_attack needs gradients: call it outside torch.inference_mode()")

    x0, b = x.detach(), x.shape[0]
    best, best_loss = None, None
    for r0 in range(0, restarts, per_forward):
        k = min(per_forward, restarts - r0)  # runs in this forward: rows [k·B, ...], run-major
        rows = x0.repeat(k, *([1] * (x.dim() - 1)))
        eps_k, alpha_k = eps_b.repeat(k), alpha_b.repeat(k)
        if random_start:
            x_adv = torch.cat([_random_start(x0, eps_b, norm, lo, hi, generator) for _ in range(k)])
        else:
            x_adv = rows.clone()
        with torch.enable_grad():
            for _ in range(steps):
                x_adv.requires_grad_(True)
                objective, _ = _losses(model, x_adv, y, loss_fn, k, targeted)
                (grad,) = torch.autograd.grad(objective, x_adv)
                x_adv.requires_grad_(False)
                pgd_step(x_adv, grad, rows, eps_k, alpha_k, norm, lo, hi, impl)
        if restarts == 1:
            return x_adv
        with torch.no_grad():
            _, per_sample = _losses(model, x_adv, y, loss_fn, k, targeted)  # [k, B]
        runs = x_adv.view(k, *x.shape)
        top, idx = per_sample.max(0)  # first run wins ties: run 0 before later ones
        chosen = runs[idx, torch.arange(b, device=x.device)]
        if best is None:
            best, best_loss = chosen, top
        else:
            better = top > best_loss
            best = torch.where(better.view((-1,) + (1,) * (x.dim() - 1)), chosen, best)
            best_loss = torch.where(better, top, best_loss)
    return best


def _losses(model, x_adv: Tensor, y, loss_fn, runs: int, targeted: bool) -> tuple[Tensor, Tensor]:
    """(objective to differentiate, per-sample objective [runs, B]) on the rows of `runs` runs.

    The objective is the sum over runs of each run's mean loss (so every row's gradient is the
    one a one-run attack would take); targeted attacks negate the loss.
    """
    out = model(x_adv)
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != x_adv.shape[0]:
        raise ValueError(f"model must return a tensor with one row per input ({x_adv.shape[0]} rows)")
    b = x_adv.shape[0] // runs
    total, per_sample = 0.0, []
    for o in out.split(b):
        loss = loss_fn(o) if y is None else loss_fn(o, y)
        if not isinstance(loss, Tensor) or loss.shape not in ((), (b,)):
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return one loss per sample [{b}] or a scalar, got {shape}")
        total = total + loss.mean()
        per_sample.append(loss.expand(b))
    sign = -1.0 if targeted else 1.0
    return sign * total, sign * torch.stack(per_sample)


def _loss_function(loss_fn, y, x: Tensor):
    if y is not None and (not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != x.shape[0]):
        raise ValueError(
            f"y must be a tensor with one entry per sample of x ({x.shape[0]}), got {getattr(y, 'shape', y)!r}"
        )
    if loss_fn is not None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        return loss_fn
    if y is None:
        raise ValueError("y is required for the default cross-entropy loss; pass loss_fn for a label-free attack")
    return lambda out, labels: F.cross_entropy(out, labels, reduction="none")


def _check_inside(name: str, x: Tensor, lo: float, hi: float) -> None:
    """x finite and inside [lo, hi]: one device sync."""
    lo_x, hi_x = (v.item() for v in torch.aminmax(x.detach()))
    if not (math.isfinite(lo_x) and math.isfinite(hi_x)):
        raise ValueError(f"{name} has non-finite values")
    if lo_x < lo or hi_x > hi:
        raise ValueError(f"{name} must lie inside bounds ({lo}, {hi}); its values span [{lo_x}, {hi_x}]")


def instance_attack(
    encoder: Callable[[Tensor], Tensor], x1: Tensor, x2: Tensor, *, temperature: float = 0.5, **pgd
) -> Tensor:
    """Instance-wise attack (RoCL, Kim et al. 2020; ACL, Jiang et al. 2020): x1_adv maximising
    ``nt_xent(encoder(x1_adv), encoder(x2))`` around view x1, without labels.

    x2's embeddings are computed once (no gradient). The per-sample loss of sample i, used to
    pick among restarts, is the mean of the NT-Xent terms of its two rows (x1_adv_i's and x2_i's,
    whose positive x1_adv_i is); their mean over i is the NT-Xent loss. ``pgd``: the keyword
    arguments of :func:`pgd_attack` (eps, alpha, steps, norm, restarts, ...).
    """
    _checks.batch("x1", x1)
    _checks.batch("x2", x2)
    _checks.positive("temperature", temperature)  # checked here too: with steps=0 nt_xent never runs
    if x2.shape[0] != x1.shape[0]:
        raise ValueError(f"x2 has {x2.shape[0]} samples but x1 has {x1.shape[0]}")
    with torch.no_grad():
        z2 = encoder(x2)
    b = x1.shape[0]

    def loss_fn(z1: Tensor) -> Tensor:
        rows = nt_xent(z1, z2, temperature=temperature, reduction="none")  # [2B]
        return (rows[:b] + rows[b:]) / 2

    return pgd_attack(encoder, x1, None, loss_fn=loss_fn, **pgd)


def feature_attack(encoder: Callable[[Tensor], Tensor], x: Tensor, **pgd) -> Tensor:
    """Feature-space attack: x_adv maximising ‖encoder(x_adv) − encoder(x)‖² per sample, without labels.

    The gradient of this loss is 0 at x itself, so keep ``random_start=True`` (the default).
    ``pgd``: the keyword arguments of :func:`pgd_attack`.
    """
    _checks.batch("x", x)
    with torch.no_grad():
        z = encoder(x).reshape(x.shape[0], -1)

    def loss_fn(z_adv: Tensor) -> Tensor:
        return (z_adv.reshape(z.shape) - z).pow(2).sum(1)

    return pgd_attack(encoder, x, None, loss_fn=loss_fn, **pgd)


def robust_accuracy(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: Sequence[float] = (0, 2 / 255, 4 / 255, 8 / 255),
    *,
    attack: str = "pgd",
    **pgd,
) -> dict[float, float]:
    """Accuracy under PGD (or AutoAttack) at each ε: {ε: fraction of x classified as y after the attack}.

    ``attack="autoattack"``: each ε > 0 by :func:`autoattack` (``pgd`` then holds its keyword
    arguments: norm, version, steps, generator, progress, ...), one ε after another.

    Every ε > 0 is attacked in one batched run: x repeated once per ε, with per-sample ε (and α,
    which defaults to ε/4, pgd_attack's 2/255 at 8/255). ε = 0 is the clean accuracy (the
    0-ball is x itself). ``pgd``: the keyword arguments of :func:`pgd_attack` (alpha, steps,
    norm, restarts, ...); ``alpha`` may be a number or a [B] tensor. Memory: E·R·B rows per
    forward for E radii and R restarts (see ``restarts_per_forward``).
    """
    _checks.batch("x", x)
    y = _checks.labels("y", y, x.shape[0], x.device)
    if pgd.get("targeted"):
        raise ValueError("robust_accuracy measures untargeted robustness: targeted=True is not supported")
    _checks.choice("attack", attack, ("pgd", "autoattack"))
    radii = [_checks.nonnegative("eps", e) for e in ((eps,) if isinstance(eps, numbers.Real) else eps)]
    if not radii:
        raise ValueError("eps must hold at least one radius")
    attacked = sorted({r for r in radii if r > 0})
    b, ndim = x.shape[0], x.dim()
    accuracy = {}
    if attack == "autoattack":
        accuracy = {r: autoattack(model, x, y, eps=r, **pgd)[1].double().mean().item() for r in attacked}
        attacked = []
    if 0.0 in radii:
        with torch.no_grad():
            accuracy[0.0] = (model(x).argmax(1) == y).double().mean().item()
    if attacked:
        e = len(attacked)
        eps_rows = torch.tensor(attacked, dtype=_checks.accumulate_dtype(x.dtype), device=x.device).repeat_interleave(b)
        alpha = pgd.pop("alpha", None)
        if alpha is None:
            alpha_rows = eps_rows / 4
        elif isinstance(alpha, Tensor):
            alpha_rows = _checks.per_sample("alpha", alpha, x, strict=True).repeat(e)
        else:
            alpha_rows = alpha
        x_rows, y_rows = x.repeat(e, *([1] * (ndim - 1))), y.repeat(e)
        x_adv = pgd_attack(model, x_rows, y_rows, eps=eps_rows, alpha=alpha_rows, **pgd)
        with torch.no_grad():
            correct = (model(x_adv).argmax(1) == y_rows).double().view(e, b).mean(1)
        accuracy.update(zip(attacked, correct.tolist(), strict=True))
    return {r: accuracy[r] for r in radii}


# -- robust evaluation: APGD and AutoAttack ------------------------------------------------------------

LOSSES = ("ce", "dlr")
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "rand": ("apgd-ce", "apgd-dlr"),  # with EOT over 20 passes, for randomised models
    "apgd": ("apgd-ce", "apgd-t"),
}
LINF_ONLY = ("fab-t", "square")  # fastssl has their L∞ forms only


def apgd_attack(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    restarts: int = 1,
    loss: str = "ce",
    targeted: bool = False,
    n_target_classes: int = 9,
    rho: float = 0.75,
    x_init: Tensor | None = None,
    generator: torch.Generator | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    early_stop: bool = True,
    eot_iter: int = 1,
) -> tuple[Tensor, Tensor]:
    """APGD-CE / APGD-DLR, or APGD-T (``targeted=True``: the targeted DLR loss against the 2nd …
    (n_target_classes+1)-th highest clean logits); returns (x_adv, success) with success[b] True
    where x_adv[b] is misclassified (points misclassified clean count as successes, x_adv = x there
    and wherever the attack failed).

    Args:
        model: maps x [B, ...] to logits [B, C].
        x, y: clean inputs inside ``bounds`` and their labels.
        eps: radius of the L∞ ("linf") or L2 ("l2") ball.
        steps: iterations N per run (auto-attack: 100); checkpoints as in docs/design.md, "APGD".
        restarts: runs per point (per target with ``targeted``), each from its own random start.
        loss: "ce" or "dlr" (untargeted).
        rho: the checkpoint's threshold ρ.
        x_init: the start of every run (no random start; needs restarts=1): from the same start
            and a deterministic model the iterates are auto-attack's.
        generator: draws the random starts (auto-attack's: x + ε·t/‖t‖, t uniform in [−1, 1] for
            L∞, Gaussian for L2).
        early_stop: a point leaves the batch when one of its runs misclassifies it (then x_adv is
            that first misclassified iterate); False runs every point to the end as auto-attack
            does (x_adv is the last misclassified iterate of the first successful run, its result).
        eot_iter: expectation over transformation for randomised models (auto-attack's "rand"
            version: 20): each gradient is the mean over eot_iter forward passes, run as eot_iter
            copies of the rows in one batch; logits and losses are those of the last copy.

    All runs of all points robust so far go through the model together: (targets·restarts)·B rows.
    """
    _check_model(model)
    _checks.batch("x", x)
    y = _checks.labels("y", y, x.shape[0], x.device)
    eps = _checks.nonnegative("eps", eps, strict=True)
    _checks.choice("norm", norm, NORMS)
    steps = _checks.integer("steps", steps, minimum=1)
    restarts = _checks.integer("restarts", restarts, minimum=1)
    _checks.choice("loss", loss, LOSSES)
    n_target_classes = _checks.integer("n_target_classes", n_target_classes, minimum=1)
    rho = _checks.nonnegative("rho", rho)
    eot_iter = _checks.integer("eot_iter", eot_iter, minimum=1)
    lo, hi = _checks.interval("bounds", bounds)
    _check_inside("x", x, lo, hi)
    _checks.generator("generator", generator, x.device)
    if x_init is not None:
        _checks.batch("x_init", x_init)
        _checks.like("x_init", x_init, "x", x)
        if restarts != 1:
            raise ValueError(f"x_init fixes the start of every run: restarts must be 1, got {restarts}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("apgd_attack needs gradients: call it outside torch.inference_mode()")
    x, y = x.detach(), y.detach()
    with torch.no_grad():
        clean = model(x)
    classes = _check_logits(clean, x.shape[0])
    need = 4 if targeted else 3 if loss == "dlr" else 2
    if classes < need:
        raise ValueError(
            f"the {'targeted dlr' if targeted else loss} loss needs ≥ {need} classes (model outputs), got {classes}"
        )
    if targeted and n_target_classes > classes - 1:
        raise ValueError(f"n_target_classes must be at most classes − 1 = {classes - 1}, got {n_target_classes}")
    robust = clean.argmax(1) == y
    x_adv = x.clone()
    idx = robust.nonzero().view(-1)
    p = len(idx)
    if p == 0:
        return x_adv, ~robust
    # rows: run-major (target, then restart), point-minor, as auto-attack's loops visit them
    ranks = list(range(2, n_target_classes + 2)) if targeted else [None]
    runs = len(ranks) * restarts
    rep = (runs,) + (1,) * (x.dim() - 1)
    x_rows, y_rows = x[idx].repeat(rep), y[idx].repeat(runs)
    target = None
    if targeted:
        order = clean[idx].sort(dim=1)[1]
        target = torch.cat([order[:, -r] for r in ranks for _ in range(restarts)])
    group = torch.arange(p, device=x.device).repeat(runs)
    start = x_init[idx].repeat(rep) if x_init is not None else _apgd_start(x_rows, eps, norm, generator)
    x_best_adv, fooled = _apgd_rows(
        model, x_rows, y_rows, target, group, start, eps, norm, steps, "dlr-t" if targeted else loss, rho, lo, hi,
        early_stop, eot=eot_iter,
    )  # fmt: skip
    fooled = fooled.view(runs, p)
    won = fooled.any(0)
    first = fooled.to(torch.int8).argmax(0)  # the first run (target, restart) that won
    x_adv[idx[won]] = x_best_adv.view(runs, p, *x.shape[1:])[first[won], won.nonzero().view(-1)]
    robust[idx[won]] = False
    return x_adv, ~robust


def _apgd_start(x: Tensor, eps: float, norm: str, generator) -> Tensor:
    """auto-attack's start: x + ε·t/(‖t‖ + 1e-12), t ~ U(−1, 1) (L∞) or N(0, 1) (L2) per element."""
    if norm == "linf":
        t = 2 * torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) - 1
    else:
        t = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + eps * torch.ones_like(x) * _normalize(t, norm)


def _norms(v: Tensor, norm: str) -> Tensor:
    flat = v.reshape(len(v), -1)
    n = flat.abs().max(1)[0] if norm == "linf" else (flat**2).sum(-1).sqrt()
    return n.view(-1, *([1] * (v.dim() - 1)))


def _normalize(v: Tensor, norm: str) -> Tensor:
    return v / (_norms(v, norm) + 1e-12)


def _row_losses(logits: Tensor, y: Tensor, target: Tensor | None, loss: str) -> Tensor:
    """Per-row CE, DLR or targeted DLR (docs/design.md, "APGD")."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    z, order = logits.sort(dim=1)
    rows = torch.arange(len(y), device=y.device)
    if loss == "dlr":
        top_is_y = (order[:, -1] == y).to(logits.dtype)
        other = z[:, -2] * top_is_y + z[:, -1] * (1 - top_is_y)
        return -(logits[rows, y] - other) / (z[:, -1] - z[:, -3] + 1e-12)
    return -(logits[rows, y] - logits[rows, target]) / (z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + 1e-12)


def _apgd_rows(model, x, y, target, group, x_start, eps, norm, steps, loss, rho, lo, hi, early_stop, trace=None, eot=1):
    """APGD on independent rows (docs/design.md, "APGD"); returns (x_best_adv, fooled) per row.

    With early_stop, a group (a point's rows) leaves the active set when one of its rows is
    misclassified. `trace`, a list, gets (row ids, x_adv after step i, step size of step i,
    reduced at the checkpoint after step i or None) per step (the tests compare it).
    """
    n = len(x)
    out_adv = x_start.clamp(lo, hi)
    fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
    ids = torch.arange(n, device=x.device)

    def loss_grad(x_adv, y, target):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            rows = x_adv if eot == 1 else x_adv.repeat((eot,) + (1,) * (x_adv.dim() - 1))
            logits = model(rows)
            if eot > 1:
                y, target = y.repeat(eot), None if target is None else target.repeat(eot)
            per = _row_losses(logits, y, target, loss)
            (g,) = torch.autograd.grad(per.sum(), x_adv)  # the copies' gradients summed
        n_rows = len(x_adv)
        logits, per = logits[-n_rows:].detach(), per[-n_rows:].detach()
        return logits.argmax(1) != y[-n_rows:], per, g / eot if eot > 1 else g

    def project(x1, x, e):
        if norm == "linf":
            return torch.clamp(torch.min(torch.max(x1, x - e), x + e), lo, hi)
        d = x1 - x
        return torch.clamp(x + _normalize(d, "l2") * torch.min(e * torch.ones_like(x), _norms(d, "l2")), lo, hi)

    x_adv = out_adv.clone()
    wrong, loss_cur, grad = loss_grad(x_adv, y, target)
    st = {
        "x": x, "y": y, "target": target, "group": group, "ids": ids, "x_adv": x_adv, "x_old": x_adv.clone(),
        "x_best": x_adv.clone(), "grad": grad, "grad_best": grad.clone(), "loss_best": loss_cur.clone(),
        "loss_last": loss_cur.clone(), "reduced_last": torch.ones(n, dtype=torch.bool, device=x.device),
        "step": torch.full((n, *([1] * (x.dim() - 1))), 2.0 * eps, dtype=x.dtype, device=x.device),
        "history": torch.zeros(n, steps, device=x.device),  # fp32 as auto-attack keeps it; [row, step]
    }  # fmt: skip
    e = torch.full((n, *([1] * (x.dim() - 1))), eps, dtype=x.dtype, device=x.device)
    st["eps"] = e

    def record(wrong):
        if not bool(wrong.any()):
            return
        rows = st["ids"][wrong]
        out_adv[rows] = st["x_adv"][wrong]
        fooled[rows] = True
        if early_stop:
            done = torch.zeros(n, dtype=torch.bool, device=x.device)
            done[st["group"][wrong]] = True
            keep = ~done[st["group"]]
            for key, v in st.items():
                if v is not None:
                    st[key] = v[keep]

    record(wrong)
    k, counter = max(int(0.22 * steps), 1), 0
    k_min, k_decr = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    for i in range(steps):
        if len(st["ids"]) == 0:
            break
        used = st["step"].view(-1).clone() if trace is not None else None
        x_adv, x0, e = st["x_adv"], st["x"], st["eps"]
        grad2 = x_adv - st["x_old"]
        st["x_old"] = x_adv  # not written in place below: the step makes a new x_adv
        a = 0.75 if i > 0 else 1.0
        if norm == "linf":
            x1 = project(x_adv + st["step"] * torch.sign(st["grad"]), x0, e)
        else:
            x1 = project(x_adv + st["step"] * _normalize(st["grad"], "l2"), x0, e)
        x_adv = project(x_adv + (x1 - x_adv) * a + grad2 * (1 - a), x0, e)
        st["x_adv"] = x_adv
        wrong, loss_cur, grad = loss_grad(x_adv, st["y"], st["target"])
        st["grad"] = grad
        st["history"][:, i] = loss_cur
        better = loss_cur > st["loss_best"]
        better_v = better.view(-1, *([1] * (x.dim() - 1)))
        st["x_best"] = torch.where(better_v, x_adv, st["x_best"])
        st["grad_best"] = torch.where(better_v, grad, st["grad_best"])
        st["loss_best"] = torch.where(better, loss_cur, st["loss_best"])
        snapshot = (st["ids"].clone(), x_adv.clone(), used) if trace is not None else None
        record(wrong)
        counter += 1
        reduced = None
        if counter == k:
            # the loss rose in at most ρ·k of the window's k steps (index −1 wraps, as in auto-attack),
            # or the step was not halved last time and the best loss did not improve
            h = st["history"]
            cols = torch.tensor([(i - c) % steps for c in range(k)], device=x.device)
            prev = torch.tensor([(i - c - 1) % steps for c in range(k)], device=x.device)
            ups = (h[:, cols] > h[:, prev]).float().sum(1)
            reduced = (ups <= k * rho) | (~st["reduced_last"] & (st["loss_last"] >= st["loss_best"]))
            st["reduced_last"], st["loss_last"] = reduced.clone(), st["loss_best"].clone()
            st["step"][reduced] /= 2.0
            st["x_adv"][reduced] = st["x_best"][reduced]
            st["grad"][reduced] = st["grad_best"][reduced]
            counter, k = 0, max(k - k_decr, k_min)
        if trace is not None:
            trace.append((*snapshot, None if reduced is None else (st["ids"].clone(), reduced)))
    return out_adv, fooled


def autoattack(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    batch_size: int | None = None,
    steps: int = 100,
    n_target_classes: int = 9,
    queries: int = 5000,
    eot_iter: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> tuple[Tensor, Tensor]:
    """The AutoAttack sequence (Croce & Hein 2020): each attack on the points still robust; returns
    (x_adv, robust).

    ``version``: "standard" (APGD-CE → APGD-T → FAB-T → Square, auto-attack's: ``steps`` = 100
    iterations, ``n_target_classes`` = 9 targets for APGD-T and FAB-T, ``queries`` = 5000 for
    Square), "rand" (APGD-CE → APGD-DLR with EOT over ``eot_iter`` = 20 passes, for randomised
    models) or "apgd" (APGD-CE → APGD-T); or ``attacks``, a list of "apgd-ce", "apgd-dlr", "apgd-t",
    "fab-t", "square". FAB-T and Square are L∞ only here and need bounds (0, 1). With ``progress``,
    a tqdm bar over the attacks (when tqdm is installed) and one line per attack on stderr: robust
    accuracy after it and the time so far, as auto-attack logs. ``batch_size`` caps the points per
    call of an attack (APGD-T and FAB-T run n_target_classes rows per point). ``generator`` draws
    the random starts of APGD and Square's squares.
    """
    rand = attacks is None and _checks.choice("version", version, tuple(VERSIONS)) == "rand"
    attacks = list(VERSIONS[version] if attacks is None else attacks)
    for a in attacks:
        _checks.choice("attacks", a, ATTACKS)
    eot_iter = (20 if rand else 1) if eot_iter is None else _checks.integer("eot_iter", eot_iter, minimum=1)
    _check_model(model)
    _checks.batch("x", x)
    y = _checks.labels("y", y, x.shape[0], x.device)
    _checks.choice("norm", norm, NORMS)
    lo, hi = _checks.interval("bounds", bounds)
    needs_box = [a for a in attacks if a in LINF_ONLY]
    if needs_box and norm != "linf":
        raise NotImplementedError(f"{needs_box} are implemented for norm='linf' only; use attacks={list(ATTACKS[:3])}")
    if needs_box and (lo, hi) != (0.0, 1.0):
        raise ValueError(f"{needs_box} need bounds (0, 1) (images in [0, 1]), got {bounds!r}")
    bs = x.shape[0] if batch_size is None else _checks.integer("batch_size", batch_size, minimum=1)
    t0 = time.perf_counter()
    with torch.no_grad():
        clean = model(x)
    _check_logits(clean, x.shape[0])
    robust = clean.argmax(1) == y
    x_adv = x.detach().clone()
    n = x.shape[0]
    bar = _progress_bar(attacks, progress)
    _log(progress, bar, f"initial accuracy: {robust.double().mean().item():.2%}")
    apgd = dict(eps=eps, norm=norm, steps=steps, generator=generator, bounds=bounds, eot_iter=eot_iter)
    for name in attacks:
        if bar is not None:
            bar.set_description(name.upper())
        idx = robust.nonzero().view(-1)
        for c in range(0, len(idx), bs):
            rows = idx[c : c + bs]
            xr, yr = x[rows], y[rows]
            if name == "apgd-t":
                adv, won = apgd_attack(model, xr, yr, targeted=True, n_target_classes=n_target_classes, **apgd)
            elif name == "fab-t":
                adv, won = fab_attack(model, xr, yr, eps=eps, steps=steps, n_target_classes=n_target_classes)
            elif name == "square":
                adv, won = square_attack(model, xr, yr, eps=eps, queries=queries, generator=generator)
            else:
                adv, won = apgd_attack(model, xr, yr, loss=name.removeprefix("apgd-"), **apgd)
            x_adv[rows[won]] = adv[won]
            robust[rows[won]] = False
        if bar is not None:
            bar.update(1)
        _log(
            progress,
            bar,
            f"robust accuracy after {name.upper()}: {robust.double().sum().item() / n:.2%} "
            f"(total time {time.perf_counter() - t0:.1f} s)",
        )
    if bar is not None:
        bar.close()
    return x_adv, robust


def _progress_bar(attacks, progress: bool):
    if not _checks.flag("progress", progress):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: the per-attack lines are printed without a bar
        return None
    return tqdm(total=len(attacks), unit="attack", file=sys.stderr, leave=False)


def _log(progress: bool, bar, line: str) -> None:
    if not progress:
        return
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)


def _check_model(model) -> None:
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")


def _check_logits(out, b: int) -> int:
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != b:
        raise ValueError(f"model must return logits [B, C] with B = {b}, got {getattr(out, 'shape', type(out))}")
    return out.shape[1]


# -- adversarial training losses: TRADES and MART ------------------------------------------------------


def trades_loss(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    beta: float = 6.0,
    eps: float | Tensor = 8 / 255,
    step_size: float | Tensor = 2 / 255,
    steps: int = 10,
    norm: str = "linf",
    bounds: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
    eval_attack: bool = False,
    impl: str = "auto",
) -> Tensor:
    """The TRADES loss (Zhang et al. 2019) as yaodongyu/TRADES' ``trades_loss``: CE(f(x), y) + β·KL.

    KL = (1/B) Σ_i KL(p(x_i) ‖ p(x′_i)) with p = softmax(model(·)), x′ the inner maximiser of the
    summed KL: from x + 0.001·N(0, 1) (drawn from ``generator``), ``steps`` L∞ sign steps of
    ``step_size`` (the fused :func:`pgd_step_`) or, with norm="l2", TRADES's normalised-gradient
    steps on δ (TRADES takes step_size = 2ε/steps there; docs/design.md, "TRADES"). Gradients flow
    into the parameters through both f(x) and f(x′) (the KL's target p(x) is not detached, as in
    TRADES); the attack takes gradients with respect to the input only.

    Args:
        model: maps x [B, ...] to logits [B, C].
        beta: weight β ≥ 0 of the KL term.
        eps, step_size: radius and step of the inner maximisation (numbers or [B] tensors).
        steps: inner steps (0: x′ is the clamped noisy start).
        eval_attack: run the inner maximisation with ``model.eval()`` and restore the mode after
            it, as TRADES does (it calls eval() before and train() after). By default the model
            runs in the mode the caller left it throughout (see docs/design.md, "TRADES").
    """
    x, y, beta, eps_b, step_b, steps, lo, hi, impl = _training_loss_inputs(
        model, x, y, beta, eps, step_size, steps, norm, bounds, generator, impl
    )
    with _attack_mode(model, eval_attack):
        with torch.no_grad():
            p_clean = F.softmax(_logits(model, x), dim=1)

        def inner(out: Tensor) -> Tensor:  # summed KL(p(x) ‖ p(x′)), as nn.KLDivLoss(size_average=False)
            return F.kl_div(F.log_softmax(out, dim=1), p_clean, reduction="sum")

        x_adv = _inner_max(model, x, inner, eps_b, step_b, steps, norm, lo, hi, generator, impl)
    logits = _logits(model, x)
    kl = F.kl_div(F.log_softmax(_logits(model, x_adv), dim=1), F.softmax(logits, dim=1), reduction="sum")
    return F.cross_entropy(logits, y) + beta * kl / x.shape[0]


def mart_loss(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    beta: float = 6.0,
    eps: float | Tensor = 8 / 255,
    step_size: float | Tensor = 2 / 255,
    steps: int = 10,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
    eval_attack: bool = False,
    impl: str = "auto",
) -> Tensor:
    """The MART loss (Wang et al. 2020) as YisenWang/MART's ``mart_loss``: BCE(f(x′), y) + β·KL·(1 − p_y(x)).

    x′: L∞ PGD on the mean cross-entropy from x + 0.001·N(0, 1) (``steps`` sign steps of
    ``step_size``, the fused :func:`pgd_step_`). With q = p(x′) and t_i = argmax_{c≠y_i} q_ic:
    BCE = CE(f(x′), y) − mean_i log(1.0001 − q_{i,t_i} + 1e-12), and the robust term is
    (1/B) Σ_i KL(p(x_i) ‖ q_i + 1e-12)·(1.0000001 − p_{y_i}(x_i)) (docs/design.md, "MART").
    The arguments are those of :func:`trades_loss` (MART's attack is L∞ only).
    """
    x, y, beta, eps_b, step_b, steps, lo, hi, impl = _training_loss_inputs(
        model, x, y, beta, eps, step_size, steps, "linf", bounds, generator, impl
    )
    with _attack_mode(model, eval_attack):
        x_adv = _inner_max(model, x, lambda out: F.cross_entropy(out, y), eps_b, step_b, steps, "linf", lo, hi,
                           generator, impl)  # fmt: skip
    p = F.softmax(_logits(model, x), dim=1)
    logits_adv = _logits(model, x_adv)
    q = F.softmax(logits_adv, dim=1)
    rows = torch.arange(len(y), device=y.device)
    runner_up = q.masked_fill(F.one_hot(y, q.shape[1]).bool(), -1.0).argmax(1)  # the likeliest wrong class
    bce = F.cross_entropy(logits_adv, y) - torch.log(1.0001 - q[rows, runner_up] + 1e-12).mean()
    kl = (torch.xlogy(p, p) - p * torch.log(q + 1e-12)).sum(1)
    return bce + beta * (kl * (1.0000001 - p[rows, y])).sum() / x.shape[0]


def _training_loss_inputs(model, x, y, beta, eps, step_size, steps, norm, bounds, generator, impl):
    _check_model(model)
    _checks.batch("x", x)
    y = _checks.labels("y", y, x.shape[0], x.device)
    beta = _checks.nonnegative("beta", beta)
    eps_b = _checks.per_sample("eps", eps, x)
    step_b = _checks.per_sample("step_size", step_size, x, strict=True)
    steps = _checks.integer("steps", steps, minimum=0)
    _checks.choice("norm", norm, NORMS)
    lo, hi = _checks.interval("bounds", bounds)
    _check_inside("x", x, lo, hi)
    _checks.generator("generator", generator, x.device)
    impl = _ext.resolve_impl(impl, x.device)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("the adversarial training losses need gradients: call them outside torch.inference_mode()")
    return x.detach(), y, beta, eps_b, step_b, steps, lo, hi, impl


def _logits(model, x: Tensor) -> Tensor:
    out = model(x)
    _check_logits(out, x.shape[0])
    return out


@contextlib.contextmanager
def _attack_mode(model, eval_attack: bool):
    """With eval_attack, an nn.Module in train mode runs in eval mode inside the block (TRADES's and
    MART's model.eval() for the attack) and is back in train mode after it."""
    switch = _checks.flag("eval_attack", eval_attack) and isinstance(model, torch.nn.Module) and model.training
    if switch:
        model.eval()
    try:
        yield
    finally:
        if switch:
            model.train()


def _inner_max(model, x, objective, eps, step, steps, norm, lo, hi, generator, impl) -> Tensor:
    """TRADES's and MART's inner maximisation of objective(model(x′)) from x + 0.001·N(0, 1) (not clamped
    before the first step, as theirs); returns x′ clamped to the bounds (docs/design.md, "TRADES")."""
    noise = 0.001 * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    shape = (-1,) + (1,) * (x.dim() - 1)
    x_adv = x + noise
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(_logits(model, x_adv)), x_adv)
            x_adv = x_adv.detach()
            if norm == "linf":
                pgd_step(x_adv, grad, x, eps, step, "linf", lo, hi, impl)
                continue
            # TRADES's L2: δ += α·g/‖g‖ (a random direction where g = 0), δ ← clamp(x + δ) − x,
            # then δ scaled by ε/(‖δ‖ + 1e-7) where ‖δ‖ > ε (torch.renorm)
            g_norm = torch.linalg.vector_norm(grad.reshape(len(x), -1), dim=1)
            direction = grad / g_norm.view(shape)
            zero = g_norm == 0
            if bool(zero.any()):
                direction[zero] = -torch.randn(direction[zero].shape, generator=generator, dtype=x.dtype,
                                               device=x.device)  # fmt: skip
            delta = torch.clamp(x_adv + step.view(shape) * direction, lo, hi) - x
            d_norm = torch.linalg.vector_norm(delta.reshape(len(x), -1), dim=1)
            scale = torch.where(d_norm > eps, eps / (d_norm + 1e-7), torch.ones_like(d_norm))
            x_adv = (x + delta * scale.view(shape)).to(x.dtype)
    return torch.clamp(x_adv, lo, hi)


# -- FAB-T and Square ---------------------------------------------------------------------------------


def fab_attack(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int = 100,
    n_target_classes: int = 9,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    early_stop: bool = True,
) -> tuple[Tensor, Tensor]:
    """FAB-T (Croce & Hein 2020, targeted, L∞) as auto-attack's ``fab_base.py``/``fab_pt.py`` run it in
    AutoAttack's standard version (one run per target, no random start); returns (x_adv, success).

    For each target t (the 2nd … (n_target_classes+1)-th highest clean logit), ``steps`` FAB steps
    toward the linearised boundary z_t = z_y inside the box [0, 1] (docs/design.md, "FAB"); a point
    is broken when a run finds a misclassified point within ``eps`` (L∞) of x. As in
    :func:`apgd_attack`, points misclassified clean count as successes, x_adv = x where the attack
    failed, all targets of a point run as rows of one batch, and with ``early_stop`` a point leaves
    the batch as soon as one run has broken it (x_adv: that run's best point so far); without it
    every run goes on to the end, as auto-attack's, and x_adv is the first successful target's
    smallest adversarial perturbation.
    """
    _check_model(model)
    _checks.batch("x", x)
    y = _checks.labels("y", y, x.shape[0], x.device)
    eps = _checks.nonnegative("eps", eps, strict=True)
    steps = _checks.integer("steps", steps, minimum=1)
    n_target_classes = _checks.integer("n_target_classes", n_target_classes, minimum=1)
    alpha_max = _checks.nonnegative("alpha_max", alpha_max)
    eta = _checks.positive("eta", eta)
    beta = _checks.positive("beta", beta)
    early_stop = _checks.flag("early_stop", early_stop)
    _check_inside("x", x, 0.0, 1.0)
    x, y = x.detach(), y.detach()
    with torch.no_grad():
        clean = model(x)
    classes = _check_logits(clean, x.shape[0])
    if n_target_classes > classes - 1:
        raise ValueError(f"n_target_classes must be at most classes − 1 = {classes - 1}, got {n_target_classes}")
    robust = clean.argmax(1) == y
    x_adv = x.clone()
    idx = robust.nonzero().view(-1)
    p = len(idx)
    if p == 0:
        return x_adv, ~robust
    runs = n_target_classes
    order = clean[idx].sort(dim=1)[1]
    target = torch.cat([order[:, -r] for r in range(2, runs + 2)])
    x_rows = x[idx].repeat((runs,) + (1,) * (x.dim() - 1))
    group = torch.arange(p, device=x.device).repeat(runs)
    adv, fooled = _fab_rows(model, x_rows, y[idx].repeat(runs), target, group, eps, steps, alpha_max, eta, beta,
                            early_stop)  # fmt: skip
    fooled = fooled.view(runs, p)
    won = fooled.any(0)
    first = fooled.to(torch.int8).argmax(0)
    x_adv[idx[won]] = adv.view(runs, p, *x.shape[1:])[first[won], won.nonzero().view(-1)]
    robust[idx[won]] = False
    return x_adv, ~robust


def _fab_rows(model, x0, y, target, group, eps, steps, alpha_max, eta, beta, early_stop):
    """FAB-T on independent rows (docs/design.md, "FAB"); returns (best adversarial point, fooled) per row."""
    n, shape = len(x0), (-1,) + (1,) * (x0.dim() - 1)
    out_adv = x0.clone()
    fooled = torch.zeros(n, dtype=torch.bool, device=x0.device)
    res = torch.full((n,), 1e10, dtype=x0.dtype, device=x0.device)  # best adversarial distance so far
    st = {"ids": torch.arange(n, device=x0.device), "x0": x0, "x1": x0.clone(), "y": y, "target": target,
          "group": group, "adv": x0.clone(), "res": res}  # fmt: skip
    for _ in range(steps):
        if len(st["ids"]) == 0:
            break
        x1, x0_, b_rows = st["x1"], st["x0"], len(st["ids"])
        rows = torch.arange(b_rows, device=x0.device)
        x1g = x1.detach().requires_grad_(True)
        with torch.enable_grad():
            z = model(x1g)
            f = z[rows, st["target"]] - z[rows, st["y"]]  # < 0 on the correct side of the boundary z_t = z_y
            (g,) = torch.autograd.grad(f.sum(), x1g)
        w = g.reshape(b_rows, -1)
        b = (w * x1.reshape(b_rows, -1)).sum(1) - f.detach()  # the linearised boundary {v : w·v = b}
        d = _fab_projection_linf(torch.cat((x1.reshape(b_rows, -1), x0_.reshape(b_rows, -1))),
                                 torch.cat((w, w)), torch.cat((b, b)))  # fmt: skip
        d1, d2 = d[:b_rows].view(x1.shape), d[b_rows:].view(x1.shape)
        size = d.abs().max(1)[0].clamp_min(1e-8)
        a1, a2 = size[:b_rows], size[b_rows:]
        alpha = (a1 / (a1 + a2)).clamp(0.0, alpha_max).view(shape)
        # the step: a convex mix of the projections of x1 and of x0 (biased toward x0), overshot by η
        x1 = ((x1 + eta * d1) * (1 - alpha) + (x0_ + d2 * eta) * alpha).clamp(0.0, 1.0)
        with torch.inference_mode():
            is_adv = model(x1).argmax(1) != st["y"]
        t = (x1 - x0_).reshape(b_rows, -1).abs().max(1)[0]
        better = is_adv & (t < st["res"])
        st["adv"] = torch.where(better.view(shape), x1, st["adv"])
        st["res"] = torch.where(better, t, st["res"])
        # an adversarial iterate steps back toward x0 by β
        st["x1"] = torch.where(is_adv.view(shape), x0_ + (x1 - x0_) * beta, x1)
        done_rows = st["res"] <= eps
        if early_stop and bool(done_rows.any()):
            ids = st["ids"][done_rows]
            out_adv[ids], fooled[ids] = st["adv"][done_rows], True
            done = torch.zeros(n, dtype=torch.bool, device=x0.device)
            done[st["group"][done_rows]] = True
            keep = ~done[st["group"]]
            st = {k: v[keep] for k, v in st.items()}
    won = st["res"] <= eps
    out_adv[st["ids"][won]], fooled[st["ids"][won]] = st["adv"][won], True
    return out_adv, fooled


def _fab_projection_linf(t: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Per row, the smallest-L∞ move d with w·(t + d) = b and t + d in [0, 1]^n (the move toward
    the box corner where the hyperplane is out of reach); FAB's projection (docs/design.md, "FAB")."""
    n = w.shape[1]
    wt = (w * t).sum(1)
    side = 2 * (wt - b >= 0).to(w.dtype) - 1  # flip so that w·t ≥ b: w·v must decrease
    w, b = w * side.unsqueeze(1), b * side
    up = (w < 0).to(w.dtype)  # each coordinate's corner: 1 where w < 0, else 0
    nonzero = (w != 0).to(w.dtype)
    d = (up - t) * nonzero  # the move to the corner
    room = up - t * (2 * up - 1)  # |corner − t|: the radius at which coordinate j saturates
    desc = _argsort_rows(room, descending=True)  # largest room first
    need = b - side * wt  # the change of w·v to reach the plane (≤ 0); side·(w·t) is the flipped w's w·t
    full = (w * d).sum(1)  # the change when every coordinate is at its corner
    w_desc, room_desc = w.gather(1, desc), room.gather(1, desc)
    # with the k+1 largest-room coordinates free (moving by λ) and the rest saturated, the change is
    # sat[k] − free[k]·λ
    free = torch.cumsum(w_desc.abs(), dim=1)
    sat = torch.cumsum(-w_desc * d.gather(1, desc), dim=1) + full.unsqueeze(1)
    none_saturated = need - (sat[:, -1] - free[:, -1] * room_desc[:, -1]) > 0
    some_saturated = (need - full > 0) & ~none_saturated
    # binary search of the breakpoint k (run on every row, kept for the rows that saturate some coordinates)
    lo = torch.zeros(len(w), dtype=torch.float32, device=w.device)
    hi = torch.full_like(lo, n - 1)
    for _ in range(math.ceil(math.log2(n))):
        mid = torch.floor((lo + hi) / 2)
        k = mid.long().unsqueeze(1)
        ok = need - (sat.gather(1, k) - free.gather(1, k) * room_desc.gather(1, k)).squeeze(1) > 0
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    k = lo.long().unsqueeze(1)
    lam = torch.clamp_min((need - sat[:, -1]) / (-free[:, -1]), 0).unsqueeze(1)
    d_none = (2 * up - 1) * lam  # no coordinate saturates: all move by λ
    lam = torch.clamp_min((need - sat.gather(1, k).squeeze(1)) / (-free.gather(1, k).squeeze(1)), 0).unsqueeze(1)
    d_some = torch.min(lam, d) * up + torch.max(-lam, d) * (1 - up)  # every move clipped to ±λ
    d = torch.where(none_saturated.unsqueeze(1), d_none, torch.where(some_saturated.unsqueeze(1), d_some, d))
    return d * nonzero


def _argsort_rows(v: Tensor, descending: bool = False) -> Tensor:
    """Each row's ascending order, ties by index (a stable argsort), or that order reversed. For fp32
    on the CPU, numpy sorts the int64 keys (bits of v) · 2³² + column in place, several times faster
    than torch's sort on FAB's shapes: the bits of a float ≥ 0 order as the float does (v here is in
    [0, 1], never −0)."""
    if v.device.type != "cpu" or v.dtype != torch.float32 or v.shape[1] >= 2**31:
        order = torch.sort(v, dim=1, stable=True)[1]
        return order.flip((1,)) if descending else order
    key = v.contiguous().numpy().view(np.int32).astype(np.int64) << 32
    key |= np.arange(v.shape[1], dtype=np.int64)
    key.sort(axis=1)
    return torch.from_numpy((key[:, ::-1] if descending else key) & 0xFFFFFFFF)  # a new, contiguous array


def square_attack(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    queries: int = 5000,
    p_init: float = 0.8,
    rescale_schedule: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Square Attack (Andriushchenko et al. 2020, L∞, margin loss) as auto-attack's ``square.py`` runs it
    in AutoAttack's standard version; returns (x_adv, success).

    x: images [B, C, H, W] in [0, 1]. From vertical stripes x ± ε, each of ``queries`` iterations
    adds one random square of side ≈ √(p·H·W) (p from ``p_init`` by auto-attack's schedule;
    ``rescale_schedule`` stretches it to ``queries`` as torchattacks' default does) with a random
    ±2ε per channel, and keeps it for a point when the margin z_y − max_{i≠y} z_i decreases
    (docs/design.md, "Square"). Only points not yet broken are queried; the draws come from
    ``generator`` in auto-attack's order (so a generator seeded s gives auto-attack's and
    torchattacks' draws after torch.manual_seed(s) on the same points).
    """
    _check_model(model)
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be images [B, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    _checks.batch("x", x)
    y = _checks.labels("y", y, x.shape[0], x.device)
    eps = _checks.nonnegative("eps", eps, strict=True)
    queries = _checks.integer("queries", queries, minimum=1)
    p_init = _checks.probability("p_init", p_init)  # p = 0 still gives 1-pixel squares
    rescale_schedule = _checks.flag("rescale_schedule", rescale_schedule)
    _check_inside("x", x, 0.0, 1.0)
    _checks.generator("generator", generator, x.device)
    x, y = x.detach(), y.detach()
    with torch.inference_mode():
        clean = model(x)
        _check_logits(clean, x.shape[0])
        robust = clean.argmax(1) == y
        idx = robust.nonzero().view(-1)
        broken, adv = idx, x[idx]
        if len(idx):
            best = _square_rows(model, x[idx], y[idx], eps, queries, p_init, rescale_schedule, generator)
            won = model(best).argmax(1) != y[idx]
            broken, adv = idx[won], best[won]
    robust, broken, adv = robust.clone(), broken.clone(), adv.clone()  # plain tensors, not inference ones
    x_adv = x.clone()
    x_adv[broken] = adv
    robust[broken] = False
    return x_adv, ~robust


def _square_p(i: int, queries: int, p_init: float, rescale: bool) -> float:
    """auto-attack's schedule of the square's area fraction p: halved at iterations 10, 50, 200, 500,
    1000, 2000, 4000, 6000, 8000 (of 10000 when rescaled)."""
    if rescale:
        i = int(i / queries * 10000)
    halvings = sum(i > t for t in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2**halvings


def _margin(model, x: Tensor, y: Tensor) -> Tensor:
    z = model(x)
    rows = torch.arange(len(y), device=y.device)
    return z[rows, y] - z.scatter(1, y.unsqueeze(1), -math.inf).max(1)[0]


LOOKAHEAD = 32  # Square: at most this many future queries of a point per forward,
LOOKAHEAD_VALUES = 2**16  # and at most this many input values per forward (or one query per point)


def _square_rows(model, x, y, eps, queries, p_init, rescale, generator) -> Tensor:
    """Square's iterations on points classified right (docs/design.md, "Square"); returns the best points.

    Look-ahead: a query of a point depends on its earlier queries only through its best point,
    which changes only when a query is accepted. So each forward scores, per point, the next k
    queries (iterations it, …, it + k − 1) all applied to its current best point; the first
    accepted one (lower margin) is the one the sequential algorithm takes, the later ones are
    discarded, and the point goes on from the iteration after it (after it + k when none was
    accepted). Each iteration's window and signs are drawn once, in auto-attack's order; draws past
    the iteration where the sequential run would have stopped (every point broken) are undone, so
    the generator ends where auto-attack's does. k follows the acceptance rate (about 1/rate).
    A query changes only the window of the best point: clamp(best + δ, x − ε, x + ε) then [0, 1]
    equals clamp(best + δ, max(x − ε, 0), min(x + ε, 1)) there, and best is unchanged elsewhere.
    """
    b, c, h, w = x.shape
    dev = x.device
    rng = generator if generator is not None else _default_generator(dev)

    def rand(*shape):  # float32 draws, as auto-attack's torch.rand(shape)
        return torch.rand(shape, generator=rng, device=dev)

    best = torch.clamp(x + eps * torch.sign(2 * rand(b, c, 1, w) - 1), 0.0, 1.0)
    margin = _margin(model, best, y)
    keep = margin > 0
    if not bool(keep.any()):
        return best
    ids = keep.nonzero().view(-1)
    best_a, margin_a, y_a = best[keep], margin[keep], y[keep]
    lo_a, hi_a = (x[keep] - eps).clamp_min(0.0), (x[keep] + eps).clamp_max(1.0)
    it = torch.zeros(len(ids), dtype=torch.long, device=dev)  # each point's next iteration
    # per iteration: the window's first row and column and its side [queries], the ±2ε per channel [queries, C]
    corner_h, corner_w, side = (torch.zeros(queries, dtype=torch.long, device=dev) for _ in range(3))
    deltas = torch.zeros(queries, c, dtype=x.dtype, device=dev)
    # states[j]: the generator before iteration base + j was drawn (drawn = base + len(states)); the
    # sequential run draws `stop` iterations, stop > every iteration a point was still active at
    drawn, base, states, stop = 0, 0, [], 0
    k, lines = 1, torch.arange(max(h, w), device=dev)
    recent_consumed = recent_accepted = 0.0  # decayed counts of the queries consumed and accepted, for k
    while len(ids):
        k = min(k, max(1, LOOKAHEAD_VALUES // (len(ids) * c * h * w)))
        last = int(it.max())
        need = min(queries, last + k)
        if last > base:  # stop > last: the states before it are never restored
            states, base = states[last - base :], last
        rh, rw, signs, sides = [], [], [], []
        for i in range(drawn, need):
            states.append(rng.get_state())
            p = _square_p(i, queries, p_init, rescale)
            s = min(max(round(math.sqrt(p * (c * h * w) / c)), 1), h, w)  # auto-attack's p·n_features/c
            rh.append(rand(1))
            rw.append(rand(1))
            signs.append(rand(c))
            sides.append(s)
        if need > drawn:  # the draws' arithmetic, per iteration as auto-attack's, for the new ones at once
            s_t = torch.tensor(sides, device=dev)
            side[drawn:need] = s_t
            corner_h[drawn:need] = ((h - s_t).float() * torch.cat(rh)).long()  # auto-attack's int((h − s)·rand)
            corner_w[drawn:need] = ((w - s_t).float() * torch.cat(rw)).long()
            deltas[drawn:need] = 2.0 * eps * torch.sign(2 * torch.stack(signs) - 1)
            drawn = need
        # candidates [n, k, C, H, W]: query it + j applied to the current best point
        t = it[:, None] + torch.arange(k, device=dev)
        valid = t < queries
        t = t.clamp_max(queries - 1)
        bk, lo_k, hi_k = best_a[:, None], lo_a[:, None], hi_a[:, None]
        moved = torch.clamp(bk + deltas[t][..., None, None], lo_k, hi_k)
        top, left, s_k = corner_h[t].unsqueeze(-1), corner_w[t].unsqueeze(-1), side[t].unsqueeze(-1)
        in_h = (lines[:h] >= top) & (lines[:h] < top + s_k)  # [n, k, H]
        in_w = (lines[:w] >= left) & (lines[:w] < left + s_k)
        cand = torch.where((in_h.unsqueeze(-1) & in_w.unsqueeze(-2)).unsqueeze(2), moved, bk)  # the window
        # a query that moves no pixel (its window already at the clamp) keeps the margin: not accepted,
        # and not sent through the model (its margin there could differ in the last bit)
        query = valid & (cand != bk).flatten(2).any(2)
        m = torch.full(t.shape, math.inf, dtype=margin_a.dtype, device=dev)
        if bool(query.all()):
            m = _margin(model, cand.flatten(0, 1), y_a.repeat_interleave(k)).view(t.shape)
        elif bool(query.any()):
            m[query] = _margin(model, cand[query], y_a[:, None].expand(t.shape)[query])
        better = m < margin_a[:, None]  # the margin is the loss (and m ≤ 0 implies better)
        took = better.any(1)
        j = better.to(torch.int8).argmax(1)  # the first accepted query
        rows = torch.arange(len(ids), device=dev)
        best_a = torch.where(took.view(-1, 1, 1, 1), cand[rows, j], best_a)
        margin_a = torch.where(took, m[rows, j], margin_a)
        it_new = torch.where(took, it + j + 1, (it + k).clamp_max(queries))
        accepted, consumed = int(took.sum()), int((it_new - it).sum())
        it = it_new
        # about one accepted query per point per forward: k ≈ queries consumed per accepted one, over
        # the last few forwards (counts decayed by 3/4 per forward); none accepted yet: the rate is
        # below 1 / consumed, so k doubles past it (consumed / 1 kept a lone point's k at 1: 5000
        # forwards of one row)
        recent_consumed = 0.75 * recent_consumed + consumed
        recent_accepted = 0.75 * recent_accepted + accepted
        k = min(LOOKAHEAD, max(1, round(recent_consumed / recent_accepted) if recent_accepted else 2 * consumed))
        done = (margin_a <= 0) | (it >= queries)
        if bool(done.any()):
            best[ids[done]] = best_a[done]
            stop = max(stop, int(it[done].max()))
            keep = ~done
            ids, best_a, margin_a, y_a, lo_a, hi_a, it = (v[keep] for v in (ids, best_a, margin_a, y_a, lo_a, hi_a, it))
    if stop < drawn:  # undo the draws the sequential run would not have made
        rng.set_state(states[stop - base])
    return best


def _default_generator(device: torch.device) -> torch.Generator:
    """The generator torch.rand(..., device=device) draws from when given none."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator
