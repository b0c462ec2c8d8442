"""PGD: the fused step against the eager reference, attacks against torchattacks, invariants, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _assertions import assert_verbose_allclose
from torch import nn

import fastssl
from fastssl.ops.pgd import pgd_step
from fastssl.reference import pgd as reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOWP = [torch.float32, torch.bfloat16, torch.float16]


def _cnn(classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, classes),
    ).eval()


def _images(b: int = 8, size: int = 16, classes: int = 10):
    return torch.rand(b, 3, size, size), torch.randint(0, classes, (b,))


def _step_inputs(shape, dtype=torch.float32, device="cpu"):
    """x0 in [0, 1], x_adv near x0 (some entries outside the ε-ball), g with some zeros, per-sample ε and α."""
    b = shape[0]
    x0 = torch.rand(shape, device=device)
    x = (x0 + 0.05 * torch.randn(shape, device=device)).clamp(0, 1)
    g = torch.randn(shape, device=device) * (torch.rand(shape, device=device) > 0.1)
    eps = torch.rand(b, device=device) * 0.1
    eps[0] = 0.0  # the 0-ball: the step must return x0
    alpha = 0.01 + 0.05 * torch.rand(b, device=device)
    return x0.to(dtype), x.to(dtype), g.to(dtype), eps, alpha


def _ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


@pytest.fixture
def small_triton_blocks(monkeypatch):
    """Many blocks per sample on small inputs, and several partial-sum iterations."""
    import fastssl.kernels.pgd as kernels

    monkeypatch.setattr(kernels, "_BLOCK", 64)
    monkeypatch.setattr(kernels, "_SUM_BLOCK", 4)


# -- the step against the eager reference -------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize(
    "shape, bounds", [((1, 1), None), ((3, 7), (0.0, 1.0)), ((5, 3, 11, 13), None), ((2, 1000), (0.0, 1.0))]
)
def test_step_matches_reference(impl, norm, dtype, shape, bounds, small_triton_blocks):
    x0, x, g, eps, alpha = _step_inputs(shape, dtype)
    lo, hi = (-math.inf, math.inf) if bounds is None else bounds
    expected = reference.pgd_step(x, g, x0, eps, alpha, norm, lo, hi)
    out = fastssl.pgd_step_(x, g, x0, eps=eps, alpha=alpha, norm=norm, bounds=bounds, impl=impl)
    assert out is x
    # one rounding to the dtype at the end, as the reference; 1 ulp of slack for fp32 sums taken in another
    # order, and because Triton's interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest)
    tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert_verbose_allclose(x, expected, rtol=tol, atol=1e-6, name=f"{impl} {norm} {dtype}")
    assert_verbose_allclose(x[0], x0[0], rtol=0, atol=0, name="eps = 0 sample")


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_step_fp64_and_scalar_hyperparameters(impl, norm):
    x0, x, g, _, _ = _step_inputs((4, 30), torch.float64)
    expected = reference.pgd_step(
        x,
        g,
        x0,
        torch.full((4,), 0.03, dtype=torch.float64),
        torch.full((4,), 0.01, dtype=torch.float64),
        norm,
        0.0,
        1.0,
    )
    fastssl.pgd_step_(x, g, x0, eps=0.03, alpha=0.01, norm=norm, impl=impl)
    assert_verbose_allclose(x, expected, rtol=1e-12, atol=1e-14)


def test_step_known_values():
    x0 = torch.full((1, 4), 0.5)
    x = x0.clone()
    g = torch.tensor([[1.0, -1.0, 0.0, 2.0]])
    # L∞: α = 0.1 past ε = 0.05 is cut back to the box
    fastssl.pgd_step_(x, g, x0, eps=0.05, alpha=0.1)
    assert_verbose_allclose(x, torch.tensor([[0.55, 0.45, 0.5, 0.55]]))
    # L2: a step of length α = 0.3 along g/‖g‖ (‖g‖ = √6), inside ε = 1
    x = x0.clone()
    fastssl.pgd_step_(x, g, x0, eps=1.0, alpha=0.3, norm="l2")
    assert_verbose_allclose(x, x0 + 0.3 * g / math.sqrt(6))
    # ... and projected back onto the ball of radius 0.1
    x = x0.clone()
    fastssl.pgd_step_(x, g, x0, eps=0.1, alpha=0.3, norm="l2")
    assert_verbose_allclose(x, x0 + 0.1 * g / math.sqrt(6))
    # the bounds clamp last: 0.5 + 0.55 > 1
    x = x0.clone()
    fastssl.pgd_step_(x, g, x0, eps=1.0, alpha=0.55, bounds=(0.0, 1.0))
    assert_verbose_allclose(x, torch.tensor([[1.0, 0.0, 0.5, 1.0]]))


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_step_non_contiguous(impl):
    x0, x, g, eps, alpha = _step_inputs((6, 5, 4))
    xt, gt, x0t = (t.transpose(1, 2) for t in (x, g, x0))  # [6, 4, 5] views, not contiguous
    expected = reference.pgd_step(xt, gt, x0t, eps, alpha, "l2", 0.0, 1.0)
    fastssl.pgd_step_(xt, gt, x0t, eps=eps, alpha=alpha, norm="l2", impl=impl)
    assert_verbose_allclose(xt, expected, rtol=1e-6, atol=1e-6)  # the view (and so x) was updated


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_step_nan_gradient_gives_nan(impl):
    x0, x, g, eps, alpha = _step_inputs((3, 10))
    g[1, 4] = float("nan")
    linf = fastssl.pgd_step_(x.clone(), g, x0, eps=eps, alpha=alpha, impl=impl)
    assert linf[1, 4].isnan() and torch.isfinite(linf[[0, 2]]).all() and torch.isfinite(linf[1, :4]).all()
    l2 = fastssl.pgd_step_(x.clone(), g, x0, eps=eps, alpha=alpha, norm="l2", impl=impl)
    assert l2[1].isnan().all() and torch.isfinite(l2[[0, 2]]).all()


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("shape", [(3, 10), (3, 300)])  # one block, and many blocks with small_triton_blocks
def test_step_l2_scale_safe(impl, shape, small_triton_blocks):
    """L2 in fp32 with g ≈ 1e30, whose ‖g‖² overflows fp32: the step equals the step along the
    unscaled gradient, not 0 (the sums are fp64)."""
    x0, x, g, _, alpha = _step_inputs(shape)
    want = fastssl.pgd_step_(x.clone(), g, x0, eps=10.0, alpha=alpha, norm="l2", impl="reference")
    got = fastssl.pgd_step_(x.clone(), g * 1e30, x0, eps=10.0, alpha=alpha, norm="l2", impl=impl)
    assert not torch.equal(want, x)
    assert_verbose_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_opcheck(impl, norm):
    x0, x, g, eps, alpha = _step_inputs((3, 2, 5))
    torch.library.opcheck(pgd_step, (x, g, x0, eps, alpha, norm, 0.0, 1.0, impl))


def test_torch_compile_fullgraph():
    def attack_step(x, g, x0):
        return fastssl.pgd_step_(x, g, x0, eps=0.03, alpha=0.01, norm="l2") * 1.0

    x0, x, g, _, _ = _step_inputs((4, 3, 5))
    expected = attack_step(x.clone(), g, x0)
    out = torch.compile(attack_step, fullgraph=True, backend="inductor")(x, g, x0)
    assert_verbose_allclose(out, expected)
    assert_verbose_allclose(x, expected, name="x mutated in place")


# -- whole attacks against torchattacks ---------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [False, True])
def test_matches_torchattacks(impl, norm, targeted):
    import torchattacks

    if targeted and impl == "triton":
        pytest.skip("one kernel suffices for the targeted mode")
    model = _cnn()
    x, y = _images()
    eps, alpha = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.1)
    attack = (torchattacks.PGD if norm == "linf" else torchattacks.PGDL2)(
        model, eps=eps, alpha=alpha, steps=10, random_start=False
    )
    labels = (y + 1) % 10 if targeted else y
    if targeted:
        attack.set_mode_targeted_by_label(quiet=True)
    theirs = attack(x, labels)
    ours = fastssl.pgd_attack(
        model, x, labels, eps=eps, alpha=alpha, steps=10, norm=norm, random_start=False, targeted=targeted, impl=impl
    )
    assert not torch.equal(ours, x)
    assert_verbose_allclose(ours, theirs, rtol=0, atol=1e-6, name=f"pgd_attack vs torchattacks {norm}")


# -- invariants ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack_stays_in_ball_and_bounds(norm):
    model = _cnn()
    x, y = _images()
    eps = torch.linspace(0, 8 / 255, 8) if norm == "linf" else torch.linspace(0, 0.5, 8)
    x_adv = fastssl.pgd_attack(model, x, y, eps=eps, alpha=eps.clamp(min=1e-3) / 2, norm=norm, restarts=2, steps=5)
    dist = (x_adv - x).flatten(1)
    dist = dist.abs().amax(1) if norm == "linf" else dist.norm(dim=1)
    assert (dist <= eps + 1e-6).all(), (dist, eps)
    assert (dist[1:] > 0.5 * eps[1:]).all()  # the attack moved
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (_ce(model, x_adv, y) >= _ce(model, x, y)).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_restarts_never_lose_to_their_first_run(norm):
    model = _cnn()
    x, y = _images(16)
    eps, alpha = (4 / 255, 1 / 255) if norm == "linf" else (0.25, 0.05)
    kw = dict(eps=eps, alpha=alpha, steps=3, norm=norm)
    single = fastssl.pgd_attack(model, x, y, generator=torch.Generator().manual_seed(5), **kw)
    many = fastssl.pgd_attack(model, x, y, restarts=4, generator=torch.Generator().manual_seed(5), **kw)
    chunked = fastssl.pgd_attack(
        model, x, y, restarts=4, restarts_per_forward=3, generator=torch.Generator().manual_seed(5), **kw
    )
    loss_single, loss_many = _ce(model, single, y), _ce(model, many, y)
    assert (loss_many >= loss_single - 1e-6).all()
    assert (loss_many > loss_single + 1e-4).any()  # some later run did better
    assert_verbose_allclose(chunked, many, rtol=1e-6, atol=1e-6, name="restarts in chunks")


def test_targeted_attack_lowers_target_loss():
    model = _cnn()
    x, y = _images()
    target = (y + 3) % 10
    x_adv = fastssl.pgd_attack(model, x, target, targeted=True, steps=5)
    assert (_ce(model, x_adv, target) < _ce(model, x, target)).all()


def test_model_state_untouched():
    model = _cnn().train()
    model[0].weight.grad = torch.randn_like(model[0].weight)
    model[3].requires_grad_(False)
    grads = {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x, y = _images()
    fastssl.pgd_attack(model, x, y, steps=2, restarts=2)
    with torch.no_grad():  # also from inside no_grad, as evaluation loops call it
        fastssl.pgd_attack(model, x, y, steps=2)
    assert all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        before, values = grads[n]
        assert p.grad is before, n
        if values is not None:
            assert torch.equal(p.grad, values), n


def test_random_start():
    x = torch.rand(64, 3, 8, 8)
    eps = torch.linspace(0.1, 0.3, 64)
    gen = torch.Generator().manual_seed(0)
    linf = fastssl.random_start(x, eps, generator=gen, bounds=None)
    scaled = (linf - x).flatten(1) / eps[:, None]  # U(-1, 1)
    assert (scaled.abs() <= 1 + 1e-6).all()
    assert scaled.mean().abs() < 0.05 and (scaled.abs().mean() - 0.5).abs() < 0.05
    l2 = fastssl.random_start(x, eps, norm="l2", generator=gen, bounds=None)
    radius = (l2 - x).flatten(1).norm(dim=1) / eps
    assert (radius <= 1 + 1e-6).all()
    assert 0.3 < radius.mean() < 0.7  # ε·U(0, 1): mean ε/2
    again = fastssl.random_start(x, eps, generator=torch.Generator().manual_seed(0), bounds=None)
    assert torch.equal(again, linf)  # the generator makes the draw repeatable
    clamped = fastssl.random_start(x, eps, generator=torch.Generator().manual_seed(0))
    assert_verbose_allclose(clamped, linf.clamp(0, 1), name="clamped start")


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_one_dimensional_x(norm):
    """x of shape [B] (one value per sample), as pgd_step_ takes it: random_start and pgd_attack too (issue 13, 6)."""
    x = torch.rand(6, dtype=torch.float64)
    start = fastssl.random_start(x, 0.1, norm=norm, generator=torch.Generator().manual_seed(0), bounds=None)
    assert start.shape == x.shape and ((start - x).abs() <= 0.1 + 1e-12).all()
    w = torch.linspace(-1, 1, 6, dtype=torch.float64)
    model = lambda v: torch.stack([v * w, -v * w], 1)  # [B] -> [B, 2] logits
    y = torch.zeros(6, dtype=torch.long)
    kw = dict(eps=0.1, alpha=0.03, steps=3, norm=norm)
    ours = fastssl.pgd_attack(model, x, y, random_start=False, **kw)
    expected = reference.pgd_attack(lambda v: F.cross_entropy(model(v), y), x, x, **kw)
    assert_verbose_allclose(ours, expected, rtol=1e-12, atol=1e-14)
    assert fastssl.pgd_attack(model, x, y, generator=torch.Generator().manual_seed(0), **kw).shape == x.shape


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
def test_step_expanded_x_adv_raises(impl):
    """An expanded x_adv (stride 0) would be written through one element many times (issue 13, 11)."""
    x0 = torch.rand(4, 5)
    x = torch.rand(1, 5).expand(4, 5)
    with pytest.raises(ValueError, match="x_adv"):
        fastssl.pgd_step_(x, torch.randn(4, 5), x0, eps=0.1, alpha=0.01, impl=impl)
    # expanded grad and x_orig are only read: fine
    g = torch.randn(1, 5).expand(4, 5)
    out = fastssl.pgd_step_(x0.clone(), g, x0, eps=0.1, alpha=0.01, impl=impl)
    assert_verbose_allclose(out, (x0 + 0.01 * g.sign()).clamp(0, 1))


def test_triton_bounds_at_input_precision(monkeypatch):
    """The Triton step gets no Python float (compiled Triton types one as fp32: fp64 clamps off by ~1e-8,
    which the interpreter hides), and its bounds arrive in the accumulation dtype (issue 12, 5)."""
    import fastssl.kernels.pgd as kernels

    seen = []
    real = kernels._pgd_step_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(args)
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(kernels, "_pgd_step_kernel", Recorder())
    lo, hi = 1 / 3, 2 / 3  # not fp32 numbers
    for dtype in (torch.float64, torch.float32):
        x0 = torch.full((2, 3), 0.5, dtype=dtype)
        g = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 1.0]], dtype=dtype)
        x = fastssl.pgd_step_(x0.clone(), g, x0, eps=1.0, alpha=1.0, bounds=(lo, hi), impl="triton")
        args = seen.pop()
        assert not any(isinstance(a, float) for a in args), [type(a).__name__ for a in args]
        bounds = [a for a in args if isinstance(a, torch.Tensor) and a.shape == (2,)]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert bounds and all(b.dtype == acc for b in bounds)
        want = torch.tensor([[hi, lo, 0.5], [lo, hi, hi]], dtype=torch.float64).to(dtype)
        assert torch.equal(x, want), (x - want).abs().max()


# -- label-free attacks and robustness curves ------------------------------------------------------------------


def _encoder() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 16)).double().eval()


def test_instance_attack_matches_eager_loop():
    encoder = _encoder()
    x1, x2 = torch.rand(6, 3, 8, 8, dtype=torch.float64), torch.rand(6, 3, 8, 8, dtype=torch.float64)
    kw = dict(eps=0.5, alpha=0.1, steps=4, norm="l2")
    ours = fastssl.instance_attack(encoder, x1, x2, temperature=0.2, random_start=False, **kw)
    z2 = encoder(x2).detach()
    expected = reference.pgd_attack(
        lambda xa: fastssl.nt_xent(encoder(xa), z2, temperature=0.2, impl="reference"), x1, x1, **kw
    )
    assert_verbose_allclose(ours, expected, rtol=1e-9, atol=1e-9)
    clean = fastssl.nt_xent(encoder(x1), z2, temperature=0.2)
    assert fastssl.nt_xent(encoder(ours), z2, temperature=0.2) > clean + 0.01


def test_feature_attack_matches_eager_loop():
    encoder = _encoder()
    x = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    kw = dict(eps=0.3, alpha=0.05, steps=4, norm="l2")
    ours = fastssl.feature_attack(encoder, x, generator=torch.Generator().manual_seed(2), **kw)
    start = fastssl.random_start(x, 0.3, norm="l2", generator=torch.Generator().manual_seed(2))
    z = encoder(x).detach()
    expected = reference.pgd_attack(lambda xa: (encoder(xa) - z).pow(2).sum(1).mean(), x, start, **kw)
    assert_verbose_allclose(ours, expected, rtol=1e-9, atol=1e-9)
    assert ((encoder(ours) - z).norm(dim=1) > (encoder(start) - z).norm(dim=1)).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_robust_accuracy_matches_separate_attacks(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))  # predictions that a small ε can change
    x, y = _images(32, classes=3)
    radii = (0, 2 / 255, 8 / 255) if norm == "linf" else (0, 0.1, 0.5)
    curve = fastssl.robust_accuracy(model, x, y, eps=radii, steps=5, norm=norm, random_start=False)
    assert list(curve) == [float(r) for r in radii]
    clean = (model(x).argmax(1) == y).double().mean().item()
    assert curve[0.0] == clean
    for r in radii[1:]:
        x_adv = fastssl.pgd_attack(model, x, y, eps=r, alpha=r / 4, steps=5, norm=norm, random_start=False)
        assert curve[r] == pytest.approx((model(x_adv).argmax(1) == y).double().mean().item(), abs=1.5 / 32), r
    assert curve[radii[-1]] < clean


def test_adversarial_training_matches_reference():
    """A few steps of adversarial training with the fused step and with the reference step end in the same place."""
    torch.manual_seed(1)
    x, y = torch.rand(32, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (32,))
    finals = {}
    for impl in ("cpp", "reference"):
        model = _cnn(classes=3, seed=2).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(5):
            x_adv = fastssl.pgd_attack(
                model,
                x,
                y,
                eps=0.5,
                alpha=0.2,
                steps=3,
                norm="l2",
                generator=torch.Generator().manual_seed(0),
                impl=impl,
            )
            loss = F.cross_entropy(model(x_adv), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        finals[impl] = (torch.tensor(losses), torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert_verbose_allclose(finals["cpp"][0], finals["reference"][0], rtol=1e-9, atol=1e-9, name="losses")
    assert_verbose_allclose(finals["cpp"][1], finals["reference"][1], rtol=1e-8, atol=1e-9, name="params")


# -- bad input ------------------------------------------------------------------------------------------------

X = torch.rand(4, 3, 2, 2)
Y = torch.randint(0, 10, (4,))
MODEL = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"eps": -0.1}, ValueError, "eps"),
        ({"eps": float("nan")}, ValueError, "eps"),
        ({"eps": torch.tensor([0.1, 0.1, -0.1, 0.1])}, ValueError, "eps"),
        ({"eps": torch.full((5,), 0.1)}, ValueError, "eps"),
        ({"eps": "0.1"}, TypeError, "eps"),
        ({"alpha": 0.0}, ValueError, "alpha"),
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"alpha": torch.tensor([0.1, 0.0, 0.1, 0.1])}, ValueError, "alpha"),
        ({"norm": "l1"}, ValueError, "norm"),
        ({"steps": -1}, ValueError, "steps"),
        ({"steps": 1.5}, TypeError, "steps"),
        ({"restarts": 0}, ValueError, "restarts"),
        ({"restarts_per_forward": 0}, ValueError, "restarts_per_forward"),
        ({"bounds": (1.0, 0.0)}, ValueError, "bounds"),
        ({"bounds": 1.0}, TypeError, "bounds"),
        ({"x": X + 1}, ValueError, "bounds"),
        ({"x": X.masked_fill(X > 0.9, float("nan"))}, ValueError, "non-finite"),
        ({"x": X[:0]}, ValueError, "empty"),
        ({"x": X.long()}, TypeError, "x"),
        ({"y": Y[:3]}, ValueError, "y"),
        ({"y": None}, ValueError, "loss_fn"),
        ({"loss_fn": lambda out, y: out}, ValueError, "loss_fn"),
        ({"impl": "cuda"}, ValueError, "cuda"),
        ({"model": "resnet"}, TypeError, "model"),
        ({"generator": 0}, TypeError, "generator"),
    ],
)
def test_attack_bad_input(kwargs, error, match):
    args = {"model": MODEL, "x": X, "y": Y, **kwargs}
    with pytest.raises(error, match=match):
        fastssl.pgd_attack(args.pop("model"), args.pop("x"), args.pop("y"), **args)


def test_attack_in_inference_mode_raises():
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        fastssl.pgd_attack(MODEL, X, Y)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((X.clone(), X[:, :1], X), {}, ValueError, "grad"),
        ((X.clone(), X.double(), X), {}, TypeError, "grad"),
        ((X.clone(), X, X[:3]), {}, ValueError, "x_orig"),
        ((X.clone(), X, X), {"eps": -1.0}, ValueError, "eps"),
        ((X.clone(), X, X), {"eps": torch.full((3,), 0.1)}, ValueError, "eps"),
        ((X.clone(), X, X), {"alpha": 0.0}, ValueError, "alpha"),
        ((X.clone(), X, X), {"norm": "linf2"}, ValueError, "norm"),
        ((X.clone(), X, X), {"bounds": (0.0, float("nan"))}, ValueError, "bounds"),
        ((torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0)), {}, ValueError, "x_adv"),
    ],
)
def test_step_bad_input(args, kwargs, error, match):
    kwargs = {"eps": 0.1, "alpha": 0.01, **kwargs}
    with pytest.raises(error, match=match):
        fastssl.pgd_step_(*args, **kwargs)


@pytest.mark.parametrize(
    "fn, kwargs, error, match",
    [
        (fastssl.random_start, {"eps": -1.0}, ValueError, "eps"),
        (fastssl.random_start, {"x": X + 2}, ValueError, "bounds"),
        (fastssl.random_start, {"norm": "l3"}, ValueError, "norm"),
        (fastssl.robust_accuracy, {"eps": (0.1, -0.1)}, ValueError, "eps"),
        (fastssl.robust_accuracy, {"eps": ()}, ValueError, "eps"),
        (fastssl.robust_accuracy, {"targeted": True}, ValueError, "targeted"),
        (fastssl.robust_accuracy, {"y": Y.float()}, TypeError, "y"),
        (fastssl.instance_attack, {"x2": X[:3]}, ValueError, "x2"),
        (fastssl.instance_attack, {"temperature": 0.0, "steps": 0}, ValueError, "temperature"),
        (fastssl.instance_attack, {"temperature": -1.0, "steps": 0}, ValueError, "temperature"),
    ],
)
def test_other_bad_input(fn, kwargs, error, match):
    if fn is fastssl.random_start:
        args = {"x": X, "eps": 0.1, **kwargs}
        call = lambda: fn(args.pop("x"), args.pop("eps"), **args)
    elif fn is fastssl.robust_accuracy:
        args = {"x": X, "y": Y, **kwargs}
        call = lambda: fn(MODEL, args.pop("x"), args.pop("y"), **args)
    else:
        args = {"x2": X, **kwargs}
        call = lambda: fn(MODEL, X, args.pop("x2"), **args)
    with pytest.raises(error, match=match):
        call()


# -- GPU ------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (37, 3, 32, 32), (2, 3, 224, 224)])
def test_step_gpu(impl, norm, dtype, shape):
    x0, x, g, eps, alpha = _step_inputs(shape, dtype, device="cuda")
    expected = reference.pgd_step(x, g, x0, eps, alpha, norm, 0.0, 1.0)
    fastssl.pgd_step_(x, g, x0, eps=eps, alpha=alpha, norm=norm, impl=impl)
    tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert_verbose_allclose(x, expected, rtol=tol, atol=1e-6, name=f"{impl} {norm} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_matches_torchattacks_gpu(norm):
    import torchattacks

    model = _cnn().cuda()
    x, y = (t.cuda() for t in _images())
    eps, alpha = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.1)
    attack = (torchattacks.PGD if norm == "linf" else torchattacks.PGDL2)(
        model, eps=eps, alpha=alpha, steps=10, random_start=False
    )
    ours = fastssl.pgd_attack(model, x, y, eps=eps, alpha=alpha, steps=10, norm=norm, random_start=False)
    assert_verbose_allclose(ours, attack(x, y), rtol=0, atol=1e-6)
