"""APGD and AutoAttack: iterates against a reference written out from auto-attack's autopgd_base.py,
and torchattacks' APGD/APGDT, on a deterministic fp64 model from a fixed start."""

from __future__ import annotations

import pytest
import torch
from _assertions import assert_verbose_allclose
from torch import nn

import fastssl
from fastssl.adversarial import _apgd_rows, _apgd_start
from fastssl.reference import apgd as reference

EPS = {"linf": 0.05, "l2": 0.3}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10)).double().eval()


def _data(model, b: int = 16):
    x = torch.rand(b, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:2] = (y[:2] + 1) % 10  # two points misclassified clean: never attacked, counted as successes
    return x, y


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss, targeted", [("ce", False), ("dlr", False), ("ce", True)])
def test_matches_reference(norm, loss, targeted):
    """Batched runs (targets as rows) equal the sequential reference: success and x_adv; with
    early_stop the same points are broken, by misclassified points inside the ball."""
    model = _model()
    x, y = _data(model)
    eps = EPS[norm]
    start = _apgd_start(x, eps, norm, torch.Generator().manual_seed(0))
    kw = dict(eps=eps, norm=norm, steps=20, loss=loss, targeted=targeted, n_target_classes=3)
    want_adv, want = reference.apgd_attack(model, x, y, start, **kw)
    adv, success = fastssl.apgd_attack(model, x, y, x_init=start, early_stop=False, **kw)
    assert 2 < int(want.sum()) < len(y), "the case should break some points and not others"
    assert torch.equal(success, want)
    assert_verbose_allclose(adv, want_adv, rtol=0, atol=1e-12, name="x_adv")
    fast_adv, fast = fastssl.apgd_attack(model, x, y, x_init=start, **kw)
    assert torch.equal(fast, want)
    with torch.no_grad():
        assert (model(fast_adv).argmax(1) != y)[fast].all()
    dist = (fast_adv - x).flatten(1).abs().max(1)[0] if norm == "linf" else (fast_adv - x).flatten(1).norm(dim=1)
    assert (dist <= eps + 1e-9).all() and (fast_adv >= 0).all() and (fast_adv <= 1).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_iterates_step_sizes_and_checkpoints(norm):
    """Every iterate, step size and checkpoint decision of a 100-step run equals the reference's."""
    model = _model()
    x, y = _data(model, 6)
    eps = EPS[norm]
    start = _apgd_start(x, eps, norm, torch.Generator().manual_seed(3))
    want = reference.apgd_run(model, x, y, start, eps=eps, norm=norm, steps=100, loss="dlr")
    trace = []
    adv, fooled = _apgd_rows(
        model, x, y, None, torch.arange(6), start, eps, norm, 100, "dlr", 0.75, 0.0, 1.0, False, trace
    )
    assert torch.equal(fooled, want["fooled"])
    assert_verbose_allclose(adv, want["x_best_adv"], rtol=0, atol=1e-12)
    assert [i for i, t in enumerate(want["trace"]) if t[2] is not None] == reference.checkpoints(100)
    halvings = 0
    for i, ((ids, x_i, step_i, red), (rx, rstep, rred)) in enumerate(zip(trace, want["trace"], strict=True)):
        assert torch.equal(ids, torch.arange(6))
        assert_verbose_allclose(x_i, rx, rtol=0, atol=1e-12, name=f"x_adv after step {i}")
        assert torch.equal(step_i, rstep), i
        assert (red is None) == (rred is None), i
        if red is not None:
            assert torch.equal(red[1], rred), i
            halvings += int(rred.sum())
    assert halvings > 0


def _torchattacks_start(x, eps, norm, seed=0):
    """The start torchattacks' APGD draws for its first run (after torch.manual_seed(seed))."""
    torch.manual_seed(seed)
    if norm == "linf":
        t = 2 * torch.rand(x.shape).to(x.dtype) - 1
        return x + eps * t / t.flatten(1).abs().max(1, keepdim=True)[0].view(-1, 1, 1, 1)
    t = torch.randn(x.shape).to(x.dtype)
    return x + eps * t / ((t**2).sum(dim=(1, 2, 3), keepdim=True).sqrt() + 1e-12)


@pytest.mark.parametrize(
    "norm, loss, targeted", [("linf", "ce", False), ("linf", "dlr", False), ("l2", "ce", False), ("linf", "ce", True)]
)
def test_matches_torchattacks(norm, loss, targeted):
    """torchattacks' APGD / APGDT (steps=100) from the start they draw: the same adversarial examples.
    (torchattacks' APGDT L2 steps every sample by sample 0's step size, so it is compared in L∞ only;
    it has one target class when n_classes=2 is given: the second highest logit.)"""
    import torchattacks

    model = _model()
    x, y = _data(model, 8)
    x, y = x[2:], y[2:]  # all classified right: torchattacks draws the start for the whole batch
    eps = EPS[norm]
    start = _torchattacks_start(x, eps, norm).clamp(0, 1)
    if targeted:
        attack = torchattacks.APGDT(
            model, norm=norm.capitalize() if norm == "l2" else "Linf", eps=eps, steps=100, n_classes=2
        )
    else:
        attack = torchattacks.APGD(model, norm="L2" if norm == "l2" else "Linf", eps=eps, steps=100, loss=loss)
    theirs = attack(x, y)
    ours, success = fastssl.apgd_attack(
        model, x, y, eps=eps, norm=norm, steps=100, loss=loss, targeted=targeted, n_target_classes=1, x_init=start,
        early_stop=False,
    )  # fmt: skip
    with torch.no_grad():
        assert torch.equal(success, model(theirs).argmax(1) != y)
    assert 0 < int(success.sum()) < len(y)
    # 100 steps amplify 1-ulp differences (their L∞ start has no +1e-12; their L2 projection adds 1e-12 to ‖δ‖)
    assert_verbose_allclose(ours, theirs, rtol=0, atol=1e-7 if norm == "linf" else 1e-6, name="x_adv vs torchattacks")


def test_early_stop_saves_passes():
    """Broken points leave the batch: fewer rows through the model, the same points broken."""
    model = _model()
    x, y = _data(model)
    rows = {True: 0, False: 0}
    for early in (True, False):

        def counted(v, early=early):
            rows[early] += len(v)
            return model(v)

        _, ok = fastssl.apgd_attack(counted, x, y, eps=0.05, steps=20, targeted=True, n_target_classes=3,
                                    generator=torch.Generator().manual_seed(0), early_stop=early)  # fmt: skip
        rows[f"ok{early}"] = ok
    assert torch.equal(rows["okTrue"], rows["okFalse"])
    assert rows[True] < 0.8 * rows[False]


def test_autoattack_apgd_version(capsys):
    model = _model()
    x, y = _data(model)
    x_adv, robust = fastssl.autoattack(
        model, x, y, eps=0.05, version="apgd", steps=20, generator=torch.Generator().manual_seed(0)
    )
    err = capsys.readouterr().err
    assert "initial accuracy: 87.50%" in err and "after APGD-CE" in err and "after APGD-T" in err
    with torch.no_grad():
        assert torch.equal(robust, model(x_adv).argmax(1) == y)
    _, ce_only = fastssl.apgd_attack(model, x, y, eps=0.05, steps=20, generator=torch.Generator().manual_seed(0))
    assert int(robust.sum()) <= int((~ce_only).sum())
    gen = torch.Generator().manual_seed(0)
    kw = dict(attack="autoattack", version="apgd", steps=20, progress=False, generator=gen)
    acc = fastssl.robust_accuracy(model, x, y, eps=(0, 0.05), **kw)
    assert acc[0.05] == robust.double().mean().item() and acc[0.0] == 14 / 16
    with pytest.raises(NotImplementedError, match="linf"):
        fastssl.autoattack(model, x, y, eps=0.05, norm="l2")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"eps": 0.0}, ValueError, "eps"),
        ({"norm": "l1"}, ValueError, "norm"),
        ({"loss": "mse"}, ValueError, "loss"),
        ({"steps": 0}, ValueError, "steps"),
        ({"restarts": 2, "x_init": "x"}, ValueError, "restarts"),
        ({"targeted": True, "n_target_classes": 10}, ValueError, "n_target_classes"),
        ({"x_init": "short"}, ValueError, "x_init"),
        ({"y": "float"}, TypeError, "y"),
    ],
)
def test_bad_input(kwargs, error, match):
    model = _model()
    x, y = _data(model, 4)
    kwargs = dict(kwargs)
    if kwargs.get("x_init") == "x":
        kwargs["x_init"] = x
    if kwargs.get("x_init") == "short":
        kwargs["x_init"] = x[:3]
    if kwargs.pop("y", None) == "float":
        y = y.double()
    kwargs = {"eps": 0.05, **kwargs}
    with pytest.raises(error, match=match):
        fastssl.apgd_attack(model, x, y, **kwargs)
