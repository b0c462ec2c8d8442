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
