"""Adversarial attacks: PGD with batched restarts, label-free attacks on encoders, robustness curves.

Every attack is projected gradient ascent (Madry et al. 2018) on a loss of the model's output,
each step the fused op :func:`fastssl.pgd_step_`. Gradients are taken with
``torch.autograd.grad`` with respect to the input only: the model's parameters' ``.grad``,
their ``requires_grad`` flags and the model's train/eval mode are left exactly as they were.
The model runs in the mode it is in; call ``model.eval()`` first if batch-norm statistics and
dropout should be frozen during the attack (torchattacks does that for you).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl import _checks, _ext
from fastssl.contrastive import nt_xent
from fastssl.ops.pgd import NORMS, pgd_step_, pgd_step_op, step_sizes

__all__ = ["feature_attack", "instance_attack", "pgd_attack", "pgd_step_", "random_start", "robust_accuracy"]


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
        delta = u * (r * e / torch.linalg.vector_norm(u.flatten(1), dim=1).view(shape))
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
                pgd_step_op(x_adv, grad, rows, eps_k, alpha_k, norm, lo, hi, impl)
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
        z = encoder(x).flatten(1)

    def loss_fn(z_adv: Tensor) -> Tensor:
        return (z_adv.flatten(1) - z).pow(2).sum(1)

    return pgd_attack(encoder, x, None, loss_fn=loss_fn, **pgd)


def robust_accuracy(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: Sequence[float] = (0, 2 / 255, 4 / 255, 8 / 255),
    **pgd,
) -> dict[float, float]:
    """Accuracy under PGD at each ε: {ε: fraction of x classified as y after the attack}.

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
    radii = [_checks.nonnegative("eps", e) for e in ((eps,) if isinstance(eps, numbers.Real) else eps)]
    if not radii:
        raise ValueError("eps must hold at least one radius")
    attacked = sorted({r for r in radii if r > 0})
    b, ndim = x.shape[0], x.dim()
    accuracy = {}
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
