"""TRADES: loss and parameter gradients against a reference written out from yaodongyu/TRADES'
trades.py, in fp64 on a small deterministic model with a fixed generator."""

from __future__ import annotations

import copy

import pytest
import torch
from _assertions import assert_verbose_allclose
from torch import nn

import fastssl
from fastssl.reference import trades as reference


def _model(batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)] if batch_norm else [nn.Conv2d(1, 4, 3)]
    return nn.Sequential(*layers, nn.ReLU(), nn.Flatten(), nn.Linear(64, 10)).double()


def _data(b: int = 8):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(b, 1, 6, 6, dtype=torch.float64, generator=gen), torch.randint(0, 10, (b,), generator=gen)


def _compare(ours, theirs, params, their_params=None):
    """Loss and the gradient of every parameter equal (fp64, 1e-12)."""
    assert torch.isfinite(ours) and ours.dtype == torch.float64
    assert_verbose_allclose(ours, theirs, rtol=0, atol=1e-12, name="loss")
    g_ours = torch.autograd.grad(ours, params)
    g_theirs = torch.autograd.grad(theirs, params if their_params is None else their_params)
    for i, (a, b) in enumerate(zip(g_ours, g_theirs, strict=True)):
        assert_verbose_allclose(a, b, rtol=0, atol=1e-12, name=f"grad of parameter {i}")


@pytest.mark.parametrize("norm, eps, step", [("linf", 0.05, 0.02), ("l2", 0.5, None)])
@pytest.mark.parametrize("steps", [0, 1, 10])
def test_matches_reference(norm, eps, step, steps):
    model = _model().eval()
    x, y = _data()
    step = step if step is not None else 2 * eps / max(steps, 1)  # the L2 step is TRADES's 2ε/steps
    ours = fastssl.trades_loss(model, x, y, beta=6.0, eps=eps, step_size=step, steps=steps, norm=norm,
                               generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert not model.training and all(p.grad is None for p in model.parameters())
    theirs = reference.trades_loss(model, x, y, generator=torch.Generator().manual_seed(5), step_size=step,
                                   epsilon=eps, perturb_steps=steps, beta=6.0, distance="l_inf" if norm == "linf"
                                   else "l_2")  # fmt: skip
    _compare(ours, theirs, list(model.parameters()))


def test_eval_attack_batch_norm():
    """A batch-norm model in train mode: with eval_attack the attack sees running statistics and the
    loss batch statistics, as TRADES's eval()/train() switch; the model stays in train mode."""
    model = _model(batch_norm=True).train()
    twin = copy.deepcopy(model)  # the loss's train-mode forwards move the running statistics
    x, y = _data()
    kw = dict(eps=0.05, step_size=0.02, steps=5)
    ours = fastssl.trades_loss(model, x, y, eval_attack=True, generator=torch.Generator().manual_seed(2), **kw)
    assert model.training
    theirs = reference.trades_loss(twin, x, y, generator=torch.Generator().manual_seed(2), step_size=0.02,
                                   epsilon=0.05, perturb_steps=5, beta=6.0)  # fmt: skip
    _compare(ours, theirs, list(model.parameters()), list(twin.parameters()))
    # by default the attack runs in train mode (batch statistics): a different inner maximiser
    default = fastssl.trades_loss(model, x, y, generator=torch.Generator().manual_seed(2), **kw)
    assert model.training and not torch.allclose(default, ours, rtol=0, atol=1e-9)


def test_beta_zero_is_cross_entropy_and_inner_point_in_ball():
    model = _model().eval()
    x, y = _data()
    loss = fastssl.trades_loss(model, x, y, beta=0.0, generator=torch.Generator().manual_seed(0))
    assert_verbose_allclose(loss, nn.functional.cross_entropy(model(x), y), rtol=0, atol=1e-14)
