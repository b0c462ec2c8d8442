"""TRADES (Zhang et al. 2019) written out plainly as yaodongyu/TRADES `trades.py` (`trades_loss`) runs it.

For clarity, not speed: the clean forward is repeated at every step of the inner maximisation,
the L2 inner loop is TRADES's SGD on δ, and the model is switched to eval() for the attack and
to train() for the loss, as TRADES does. The random start draws from `generator` (TRADES: the
global CUDA generator). The tests hold fastssl.trades_loss to this (docs/design.md, "TRADES").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def kl_sum(logits_adv: Tensor, logits_clean: Tensor) -> Tensor:
    """nn.KLDivLoss(size_average=False)(log_softmax(adv), softmax(clean)): Σ_i Σ_c p_c (log p_c − log q_c)."""
    return nn.KLDivLoss(reduction="sum")(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1))


def trades_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    generator: torch.Generator,
    step_size: float = 0.003,
    epsilon: float = 0.031,
    perturb_steps: int = 10,
    beta: float = 1.0,
    distance: str = "l_inf",
) -> Tensor:
    """CE(f(x), y) + β·KL(p(x) ‖ p(x′))/B, x′ the inner maximiser of Σ KL from x + 0.001·N(0, 1)."""
    model.eval()
    b = len(x)
    noise = 0.001 * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if distance == "l_inf":
        x_adv = x.detach() + noise
        for _ in range(perturb_steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss_kl = kl_sum(model(x_adv), model(x))
            grad = torch.autograd.grad(loss_kl, [x_adv])[0]
            x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - epsilon), x + epsilon)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
    else:
        # SGD on δ with lr 2ε/steps against −KL, its gradient normalised per sample (a random
        # direction where it is 0); then δ ← clamp(x + δ, 0, 1) − x and renorm to ‖δ‖ ≤ ε
        delta = noise.clone().requires_grad_(True)
        opt = torch.optim.SGD([delta], lr=epsilon / max(perturb_steps, 1) * 2)  # TRADES: ε/steps·2
        for _ in range(perturb_steps):
            opt.zero_grad()
            with torch.enable_grad():
                loss = -kl_sum(model(x + delta), model(x))
            (delta.grad,) = torch.autograd.grad(loss, [delta])
            norms = delta.grad.view(b, -1).norm(p=2, dim=1)
            delta.grad.div_(norms.view(-1, *([1] * (x.dim() - 1))))
            if (norms == 0).any():
                zero = norms == 0
                delta.grad[zero] = torch.randn(
                    delta.grad[zero].shape, generator=generator, dtype=x.dtype, device=x.device
                )
            opt.step()
            delta.data.add_(x)
            delta.data.clamp_(0, 1).sub_(x)
            delta.data.renorm_(p=2, dim=0, maxnorm=epsilon)
        x_adv = (x + delta).detach()
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    logits = model(x)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / b) * kl_sum(model(x_adv), model(x))
    return loss_natural + beta * loss_robust
