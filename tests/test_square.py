"""Square: against torchattacks' Square (the port of auto-attack's square.py) from the same seed: the
draws follow auto-attack's order, so success, x_adv and the generator's final state must agree.

fastssl scores several future queries of a point in one forward (look-ahead), so its batches differ
from torchattacks' one-query-per-point batches; a CPU GEMM's last bit can depend on the batch, which
could flip a near-tie (a query that changes only pixels the model ignores). The equality checks
therefore run the model one row at a time (_RowWise): its outputs then do not depend on the batch.
"""

from __future__ import annotations

import pytest
import torch
from test_fab import _data, _model
from torch import nn

import fastssl


class _RowWise(nn.Module):
    """The model applied to each row on its own: outputs independent of the batch they come in."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.cat([self.model(r.unsqueeze(0)) for r in x])


@pytest.mark.parametrize(
    "eps, queries, rescale",
    [(0.05, 150, False), (0.05, 150, True), (0.05, 1000, False), (0.1, 1000, False), (0.03, 2000, True)],
)
def test_matches_torchattacks(eps, queries, rescale):
    """(0.1, 1000): every point breaks, so the generator is rewound past the look-ahead's extra draws."""
    import torchattacks

    model = _RowWise(_model()).eval()
    x, y = _data(model, 16)
    theirs = torchattacks.Square(model, eps=eps, n_queries=queries, resc_schedule=rescale, seed=3)(x, y)
    their_state = torch.get_rng_state()  # torchattacks draws from the global generator
    with torch.no_grad():
        their_success = model(theirs).argmax(1) != y
    gen = torch.Generator().manual_seed(3)
    ours, success = fastssl.square_attack(model, x, y, eps=eps, queries=queries, rescale_schedule=rescale,
                                          generator=gen)  # fmt: skip
    assert 0 < int(success.sum())
    assert torch.equal(success, their_success)
    assert torch.equal(ours, theirs)
    assert torch.equal(gen.get_state(), their_state)
    assert ((ours - x).abs().flatten(1).max(1)[0] <= eps + 1e-6).all()
    assert not ours.is_inference() and not success.is_inference()


def test_global_generator():
    """generator=None draws from (and rewinds) torch's global generator, as torchattacks does."""
    import torchattacks

    model = _RowWise(_model()).eval()
    x, y = _data(model, 8)
    theirs = torchattacks.Square(model, eps=0.1, n_queries=400, seed=5, resc_schedule=False)(x, y)
    their_state = torch.get_rng_state()
    torch.manual_seed(5)
    ours, _ = fastssl.square_attack(model, x, y, eps=0.1, queries=400)
    assert torch.equal(ours, theirs)
    assert torch.equal(torch.get_rng_state(), their_state)


def test_lone_point_scores_queries_ahead():
    """A lone point that resists: the sequential run's result and generator state, from far fewer
    forwards than queries (the look-ahead grows k while no query is accepted; it had stayed at 1
    for a single point, one forward per query)."""
    import torchattacks

    model = _RowWise(_model()).eval()
    x, y = _data(model, 16)
    eps, queries = 0.03, 1000
    theirs = torchattacks.Square(model, eps=eps, n_queries=queries, resc_schedule=False, seed=3)(x, y)
    with torch.no_grad():
        robust = (model(theirs).argmax(1) == y).nonzero().view(-1)
    assert len(robust) > 0
    x, y = x[robust[:1]], y[robust[:1]]
    theirs = torchattacks.Square(model, eps=eps, n_queries=queries, resc_schedule=False, seed=3)(x, y)
    their_state = torch.get_rng_state()
    forwards = []
    counted = _RowWise(model.model)
    counted.register_forward_hook(lambda *_: forwards.append(1))
    gen = torch.Generator().manual_seed(3)
    ours, success = fastssl.square_attack(counted, x, y, eps=eps, queries=queries, generator=gen)
    assert not bool(success.any())
    assert torch.equal(ours, theirs)
    assert torch.equal(gen.get_state(), their_state)
    assert len(forwards) < queries / 4, len(forwards)


def test_plain_model_robust_accuracy():
    """On the batched model itself: the same points broken as torchattacks' Square."""
    import torchattacks

    model = _model()
    x, y = _data(model, 16)
    theirs = torchattacks.Square(model, eps=0.05, n_queries=300, resc_schedule=False, seed=3)(x, y)
    with torch.no_grad():
        their_success = model(theirs).argmax(1) != y
    _, success = fastssl.square_attack(model, x, y, eps=0.05, queries=300, generator=torch.Generator().manual_seed(3))
    assert abs(int(success.sum()) - int(their_success.sum())) <= 1


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
