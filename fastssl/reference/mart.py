"""MART (Wang et al. 2020) written out plainly as YisenWang/MART `mart.py` (`mart_loss`) runs it.

For clarity, not speed: the model is switched to eval() for the attack (L∞ PGD on the mean
cross-entropy from x + 0.001·N(0, 1)) and to train() for the loss, as MART does. The random
start draws from `generator` (MART: the global CUDA generator). The tests hold
fastssl.mart_loss to this (docs/design.md, "MART").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mart_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    generator: torch.Generator,
    step_size: float = 0.007,
    epsilon: float = 0.031,
    perturb_steps: int = 10,
    beta: float = 6.0,
) -> Tensor:
    """BCE(f(x′), y) + β·(1/B) Σ_i KL(p(x_i) ‖ p(x′_i))·(1 − p_y(x_i)), x′ the CE-PGD point."""
    kl = nn.KLDivLoss(reduction="none")
    model.eval()
    b = len(x)
    x_adv = x.detach() + 0.001 * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_ce = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - epsilon), x + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    logits = model(x)
    logits_adv = model(x_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    # boosted CE: CE plus the margin term −log(1.0001 − p_{new_y}(x′))
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze()
    loss_robust = (1.0 / b) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs)
    )
    return loss_adv + float(beta) * loss_robust
