"""FAB-T: against torchattacks' FAB (multi-targeted, the port of auto-attack's fab_pt.py) on the same
points: without a random start both are deterministic, so success and x_adv must agree."""

from __future__ import annotations

import pytest
import torch
from _assertions import assert_verbose_allclose
from torch import nn

import fastssl


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10)).eval()


def _data(model, b: int = 12):
    x = torch.rand(b, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return x, model(x).argmax(1)


@pytest.mark.parametrize("eps", [0.02, 0.05])
def test_matches_torchattacks(eps):
    import torchattacks

    model = _model()
    x, y = _data(model)
    theirs = torchattacks.FAB(model, eps=eps, steps=20, multi_targeted=True, n_classes=4, n_restarts=1)(x, y)
    with torch.no_grad():
        their_success = model(theirs).argmax(1) != y
    ours, success = fastssl.fab_attack(model, x, y, eps=eps, steps=20, n_target_classes=3, early_stop=False)
    assert 0 < int(success.sum()) < len(y)
    assert torch.equal(success, their_success)
    assert_verbose_allclose(ours, theirs, rtol=0, atol=1e-6, name="x_adv vs torchattacks")
    fast, fast_success = fastssl.fab_attack(model, x, y, eps=eps, steps=20, n_target_classes=3)
    assert torch.equal(fast_success, success)
    with torch.no_grad():
        assert (model(fast).argmax(1) != y)[fast_success].all()
    assert ((fast - x).abs().flatten(1).max(1)[0] <= eps + 1e-6).all()


def test_misclassified_points_and_bad_input():
    model = _model()
    x, y = _data(model, 4)
    y[0] = (y[0] + 1) % 10
    x_adv, success = fastssl.fab_attack(model, x, y, eps=1e-4, steps=3)
    assert success[0] and torch.equal(x_adv[0], x[0])
    with pytest.raises(ValueError, match="n_target_classes"):
        fastssl.fab_attack(model, x, y, eps=0.1, n_target_classes=10)
    with pytest.raises(ValueError, match="bounds"):
        fastssl.fab_attack(model, x + 1, y, eps=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (54, 3072)])
def test_projection_sort_is_stable(dtype, shape):
    """The projection's row sort (numpy keys for fp32 on the CPU) equals torch's stable sort, ties
    (many here: values k/16) by column, and its descending form is that order reversed."""
    from fastssl.adversarial import _argsort_rows

    v = (torch.randint(0, 17, shape, generator=torch.Generator().manual_seed(0)) / 16).to(dtype)
    stable = torch.sort(v, dim=1, stable=True)[1]
    assert torch.equal(_argsort_rows(v), stable)
    assert torch.equal(_argsort_rows(v, descending=True), stable.flip((1,)))
