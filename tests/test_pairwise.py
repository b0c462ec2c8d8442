"""Alignment, the hypersphere loss and the negative cosine similarity: equal in fp64 (loss and
gradients) to lightly's HypersphereLoss and NegativeCosineSimilarity and to Wang & Isola's formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _assertions import assert_verbose_allclose
from _peers import peer

import fastssl


def _views(n, d, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return z1.to(dtype), (z1 + 0.6 * torch.randn(n, d, generator=gen, dtype=torch.float64)).to(dtype)


def _check(ours_fn, theirs_fn, z1, z2, name):
    outs = []
    for fn in (ours_fn, theirs_fn):
        leaves = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
        value = fn(*leaves)
        outs.append((value, *torch.autograd.grad(value, leaves)))
    for a, b in zip(*outs, strict=True):
        assert_verbose_allclose(a, b, rtol=1e-10, atol=1e-12, name=name)


@pytest.mark.parametrize("t, lam, alpha", [(1.0, 1.0, 2.0), (2.0, 0.5, 1.0), (5.0, 3.0, 3.0)])
@pytest.mark.parametrize("n, d", [(2, 3), (17, 8)])
def test_hypersphere_equals_lightly(n, d, t, lam, alpha):
    theirs = peer("lightly.loss.hypersphere_loss").HypersphereLoss(t=t, lam=lam, alpha=alpha)
    _check(lambda a, b: fastssl.hypersphere_loss(a, b, t=t, lam=lam, alpha=alpha), theirs, *_views(n, d), "hypersphere")


@pytest.mark.parametrize("alpha", [1.0, 2.0, 2.5])
def test_alignment_equals_wang_isola(alpha):
    def align(x, y):  # Wang & Isola (2020), Figure 5, on normalised features
        return (F.normalize(x, dim=1) - F.normalize(y, dim=1)).norm(p=2, dim=1).pow(alpha).mean()

    _check(lambda a, b: fastssl.alignment_loss(a, b, alpha=alpha), align, *_views(11, 6), "alignment")


@pytest.mark.parametrize("t", [0.5, 2.0, 30.0])
@pytest.mark.parametrize("n, d", [(2, 3), (23, 6)])
def test_uniformity_equals_wang_isola(n, d, t):
    def uniformity(x):  # Wang & Isola (2020), Figure 5, on normalised features
        return torch.pdist(F.normalize(x, dim=1), p=2).pow(2).mul(-t).exp().mean().log()

    _check(lambda a, b: fastssl.uniformity_loss(a, t=t) + 0 * b.sum(), lambda a, b: uniformity(a) + 0 * b.sum(),
           *_views(n, d), f"uniformity t={t}")  # fmt: skip


def test_negative_cosine_equals_lightly():
    theirs = peer("lightly.loss.negative_cosine_similarity").NegativeCosineSimilarity()
    _check(fastssl.negative_cosine_similarity, theirs, *_views(13, 7), "negative cosine")


def test_uniformity_stays_finite_at_large_t():
    """log mean exp(−t‖·‖²) as a log-sum-exp: finite where exp underflows (lightly's gives −inf)."""
    z1, z2 = _views(8, 4)
    assert torch.isfinite(fastssl.hypersphere_loss(z1, z2, t=2000.0))
    assert peer("lightly.loss.hypersphere_loss").HypersphereLoss(t=2000.0)(z1, z2) == -float("inf")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_input(dtype):
    z1, z2 = _views(10, 6, dtype)
    for fn in (fastssl.alignment_loss, fastssl.hypersphere_loss, fastssl.negative_cosine_similarity):
        out = fn(z1, z2)
        assert out.dtype == torch.float32
        assert_verbose_allclose(out, fn(z1.double(), z2.double()), rtol=1e-5, atol=1e-6, name=fn.__name__)
    out = fastssl.uniformity_loss(z1)
    assert out.dtype == torch.float32
    assert_verbose_allclose(out, fastssl.uniformity_loss(z1.double()), rtol=1e-5, atol=1e-6, name="uniformity")
