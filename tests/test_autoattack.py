"""AutoAttack standard on a small CNN trained on sklearn's digits: robust accuracy no higher than
torchattacks' AutoAttack on the same model, every reported robust point robust and every adversarial
point inside the ball."""

from __future__ import annotations

import pytest
import torch

import fastssl
from benchmarks.bench_autoattack import digits_classifier


@pytest.fixture(scope="module")
def digits():
    """(model, x, y): a CNN trained 4 epochs on 1500 digits (8×8, in [0, 1]); 48 held-out points."""
    return digits_classifier(48)


def _check(model, x, y, x_adv, robust, eps):
    with torch.no_grad():
        assert torch.equal(robust, model(x_adv).argmax(1) == y)
    assert ((x_adv - x).abs().flatten(1).max(1)[0] <= eps + 1e-6).all()
    assert (x_adv >= 0).all() and (x_adv <= 1).all()


def test_standard_no_weaker_than_torchattacks_same_settings(digits, capsys):
    """Short settings (20 steps, 300 queries) on both sides: torchattacks' APGD, APGDT, FAB and Square
    chained by its MultiAttack, as its AutoAttack does."""
    import torchattacks

    model, x, y = digits
    eps = 0.1
    x_adv, robust = fastssl.autoattack(model, x, y, eps=eps, steps=20, queries=300,
                                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    err = capsys.readouterr().err
    for name in ("APGD-CE", "APGD-T", "FAB-T", "SQUARE"):
        assert f"robust accuracy after {name}" in err
    _check(model, x, y, x_adv, robust, eps)
    theirs = torchattacks.MultiAttack([
        torchattacks.APGD(model, eps=eps, steps=20, loss="ce", seed=0),
        torchattacks.APGDT(model, eps=eps, steps=20, n_classes=10, seed=0),
        torchattacks.FAB(model, eps=eps, steps=20, multi_targeted=True, n_classes=10, seed=0),
        torchattacks.Square(model, eps=eps, n_queries=300, resc_schedule=False, seed=0),
    ])(x, y)  # fmt: skip
    with torch.no_grad():
        their_robust = model(theirs).argmax(1) == y
    assert 0 < int(robust.sum()) < len(y)
    assert int(robust.sum()) <= int(their_robust.sum())


@pytest.mark.slow
def test_standard_no_weaker_than_torchattacks_autoattack(digits):
    """The full standard version (100 steps, 5000 queries) against torchattacks' AutoAttack(standard)."""
    import torchattacks

    model, x, y = digits
    for eps in (0.05, 0.1):
        x_adv, robust = fastssl.autoattack(model, x, y, eps=eps, progress=False,
                                           generator=torch.Generator().manual_seed(0))  # fmt: skip
        _check(model, x, y, x_adv, robust, eps)
        theirs = torchattacks.AutoAttack(model, eps=eps, n_classes=10, seed=0)(x, y)
        with torch.no_grad():
            their_robust = model(theirs).argmax(1) == y
        assert int(robust.sum()) <= int(their_robust.sum())


def test_rand_version(digits):
    """APGD-CE then APGD-DLR with EOT (deterministic model: EOT averages equal gradients)."""
    model, x, y = digits
    gen = torch.Generator().manual_seed(0)
    x_adv, robust = fastssl.autoattack(model, x, y, eps=0.1, version="rand", steps=10, eot_iter=3, progress=False,
                                       generator=gen)  # fmt: skip
    _check(model, x, y, x_adv, robust, 0.1)
    _, ce = fastssl.apgd_attack(model, x, y, eps=0.1, steps=10, eot_iter=3, generator=torch.Generator().manual_seed(0))
    assert int(robust.sum()) <= int((~ce).sum())
    # EOT over copies of the rows: on a deterministic model, the same iterates as one pass
    a1, s1 = fastssl.apgd_attack(model, x, y, eps=0.1, steps=10, generator=torch.Generator().manual_seed(1))
    a3, s3 = fastssl.apgd_attack(model, x, y, eps=0.1, steps=10, eot_iter=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s3) and torch.allclose(a1, a3, rtol=0, atol=1e-6)
