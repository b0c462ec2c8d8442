"""MART: loss and parameter gradients against a reference written out from YisenWang/MART's
mart.py, in fp64 on a small deterministic model with a fixed generator."""

from __future__ import annotations

import copy

import pytest
import torch
from test_trades import _compare, _data, _model

import fastssl
from fastssl.reference import mart as reference


@pytest.mark.parametrize("steps, beta", [(0, 6.0), (10, 6.0), (3, 0.5)])
def test_matches_reference(steps, beta):
    model = _model().eval()
    x, y = _data()
    ours = fastssl.mart_loss(model, x, y, beta=beta, eps=0.05, step_size=0.02, steps=steps,
                             generator=torch.Generator().manual_seed(4))  # fmt: skip
    assert not model.training and all(p.grad is None for p in model.parameters())
    theirs = reference.mart_loss(model, x, y, generator=torch.Generator().manual_seed(4), step_size=0.02,
                                 epsilon=0.05, perturb_steps=steps, beta=beta)  # fmt: skip
    _compare(ours, theirs, list(model.parameters()))


def test_eval_attack_batch_norm():
    model = _model(batch_norm=True).train()
    twin = copy.deepcopy(model)  # the loss's train-mode forwards move the running statistics
    x, y = _data()
    ours = fastssl.mart_loss(model, x, y, eps=0.05, step_size=0.02, steps=4, eval_attack=True,
                             generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert model.training
    theirs = reference.mart_loss(twin, x, y, generator=torch.Generator().manual_seed(3), step_size=0.02,
                                 epsilon=0.05, perturb_steps=4)  # fmt: skip
    _compare(ours, theirs, list(model.parameters()), list(twin.parameters()))
