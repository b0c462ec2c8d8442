"""Comparisons that say how many elements differ and where (after Liger-Kernel's assert_verbose_allclose)."""

from __future__ import annotations

import torch


def assert_verbose_allclose(actual, expected, *, rtol=1e-5, atol=1e-6, max_print=5, name="tensor"):
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()
        diff = (a - e).abs()
        lines = [
            f"{name}: {int(bad.sum())} of {a.numel()} elements differ (rtol={rtol}, atol={atol}), "
            f"max abs diff {diff[bad].max().item():.3e}"
        ]
        for i in idx[:max_print]:
            i = tuple(i.tolist())
            lines.append(f"  at {i}: actual {a[i].item():.6g}, expected {e[i].item():.6g}")
        raise AssertionError("\n".join(lines))


def assert_lowprec_close(actual, ref_fp32, ref_lowprec, *, atol, name="tensor"):
    """flash-attention's error-relative check: |ours − ref32| ≤ 2·|torch_lowprec − ref32| + atol."""
    a, r, lp = (torch.as_tensor(t).detach().double().cpu() for t in (actual, ref_fp32, ref_lowprec))
    err, bound = (a - r).abs(), 2 * (lp - r).abs() + atol
    bad = err > bound
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements exceed 2·|lowprec − fp32| + {atol}; "
            f"first at {i}: ours {a[i].item():.6g}, fp32 ref {r[i].item():.6g}, lowprec ref {lp[i].item():.6g}"
        )


def assert_training_matches_reference(n: int, steps: int, make_loss) -> None:
    """Trains a small MLP encoder (10 → 32 → 16, fp64, SGD) on two noisy views of n fixed points,
    once with impl="cpp" and once with impl="reference": it must learn, and both runs must give the
    same losses and end with the same weights. ``make_loss(impl)`` is called at the start of each
    run and returns ``loss(model, v1, v2)``, one step's loss."""
    torch.manual_seed(1)
    x = torch.randn(n, 10)
    finals = {}
    for impl in ("cpp", "reference"):
        torch.manual_seed(2)
        model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        gen = torch.Generator().manual_seed(3)
        loss_fn = make_loss(impl)
        losses = []
        for _ in range(steps):
            v1 = x + 0.1 * torch.randn(x.shape, generator=gen)
            v2 = x + 0.1 * torch.randn(x.shape, generator=gen)
            loss = loss_fn(model, v1.double(), v2.double())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        finals[impl] = (torch.tensor(losses), torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert finals["cpp"][0][-1] < finals["cpp"][0][0] - 0.5  # it learned
    assert_verbose_allclose(finals["cpp"][0], finals["reference"][0], rtol=1e-9, atol=1e-9, name="losses")
    assert_verbose_allclose(finals["cpp"][1], finals["reference"][1], rtol=1e-8, atol=1e-9, name="params")


def zero_fills_in_backward(loss, shape) -> list[str]:
    """The aten ops of loss.backward() that make a new zero tensor of `shape`, as autograd does to
    materialise the gradient of an op output that nothing used (ctx.set_materialize_grads)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape == shape and "zeros" in str(func):
                seen.append(str(func))
            return out

    with Record():
        loss.backward()
    return seen
