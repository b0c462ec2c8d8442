"""Square: against torchattacks' Square (the port of auto-attack's square.py) from the same seed: the
draws follow auto-attack's order, so success and x_adv must agree."""

from __future__ import annotations

import pytest
import torch
from test_fab import _data, _model

import fastssl


@pytest.mark.parametrize("rescale", [False, True])
def test_matches_torchattacks(rescale):
    import torchattacks

    model = _model()
    x, y = _data(model, 16)
    theirs = torchattacks.Square(model, eps=0.05, n_queries=150, resc_schedule=rescale, seed=3)(x, y)
    with torch.no_grad():
        their_success = model(theirs).argmax(1) != y
    gen = torch.Generator().manual_seed(3)
    ours, success = fastssl.square_attack(model, x, y, eps=0.05, queries=150, rescale_schedule=rescale, generator=gen)
    assert 0 < int(success.sum()) < len(y)
    assert torch.equal(success, their_success)
    assert torch.equal(ours, theirs)
    assert ((ours - x).abs().flatten(1).max(1)[0] <= 0.05 + 1e-6).all()


def test_misclassified_points_and_bad_input():
    model = _model()
    x, y = _data(model, 4)
    y[1] = (y[1] + 1) % 10
    x_adv, success = fastssl.square_attack(model, x, y, eps=1e-4, queries=2)
    assert success[1] and torch.equal(x_adv[1], x[1])
    with pytest.raises(ValueError, match="images"):
        fastssl.square_attack(model, x.flatten(1), y, eps=0.1)
    with pytest.raises(ValueError, match="p_init"):
        fastssl.square_attack(model, x, y, eps=0.1, p_init=1.5)
