"""Barlow Twins and VICReg: equal in fp64 (loss and gradients) to lightly's losses and to the eager
D×D reference on both sides of the Gram switch (N < D and N ≥ D), gradcheck, low-precision input,
and gather=True over 2 and 4 gloo processes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _assertions import assert_verbose_allclose
from _dist import free_port
from _peers import peer

import fastssl
from fastssl.ops.redundancy import frobenius_sq
from fastssl.reference import redundancy as reference


def _views(n, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 2, d, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64) + 1.0
    return z1.to(dtype), z2.to(dtype)


def _value_and_grads(fn, z1, z2, weight=1.0):
    leaves = [z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad((out * weight).sum(), leaves)


def _lightly(name, **kw):
    module = {"barlow": "barlow_twins_loss", "vicreg": "vicreg_loss"}[name]
    cls = {"barlow": "BarlowTwinsLoss", "vicreg": "VICRegLoss"}[name]
    return getattr(peer(f"lightly.loss.{module}"), cls)(**kw)


CASES = {
    "barlow": (
        lambda z1, z2: fastssl.barlow_twins_loss(z1, z2, lambda_=0.01),
        lambda z1, z2: _lightly("barlow", lambda_param=0.01)(z1, z2),
        lambda z1, z2: reference.barlow_twins(z1, z2, lambda_=0.01),
    ),
    "vicreg": (
        lambda z1, z2: fastssl.vicreg_loss(z1, z2, invariance=20.0, variance=15.0, covariance=2.0, eps=1e-3),
        lambda z1, z2: _lightly("vicreg", lambda_param=20.0, mu_param=15.0, nu_param=2.0, eps=1e-3)(z1, z2),
        lambda z1, z2: reference.vicreg(z1, z2, invariance=20.0, variance=15.0, covariance=2.0, eps=1e-3),
    ),
}


@pytest.mark.parametrize("n, d", [(2, 3), (7, 40), (40, 7), (16, 16)])
@pytest.mark.parametrize("loss", list(CASES))
def test_equals_lightly_and_reference(loss, n, d):
    ours_fn, lightly_fn, ref_fn = CASES[loss]
    z1, z2 = _views(n, d)
    ours, ours_grads = _value_and_grads(ours_fn, z1, z2)
    for name, fn in (("lightly", lightly_fn), ("reference", ref_fn)):
        theirs, their_grads = _value_and_grads(fn, z1, z2)
        assert_verbose_allclose(ours, theirs, rtol=1e-10, atol=1e-12, name=f"{loss} vs {name}")
        for a, b in zip(ours_grads, their_grads, strict=True):
            assert_verbose_allclose(a, b, rtol=1e-9, atol=1e-12, name=f"{loss} grad vs {name}")


def test_defaults_equal_lightly():
    z1, z2 = _views(9, 30)
    assert_verbose_allclose(fastssl.barlow_twins_loss(z1, z2), _lightly("barlow")(z1, z2), rtol=1e-10)
    assert_verbose_allclose(fastssl.vicreg_loss(z1, z2), _lightly("vicreg")(z1, z2), rtol=1e-10)


@pytest.mark.parametrize("n, d", [(5, 12), (12, 5)])
def test_frobenius_paths_agree(n, d):
    a, b = _views(n, d)
    assert_verbose_allclose(frobenius_sq(a, b), (a.T @ b).square().sum(), rtol=1e-12)
    assert_verbose_allclose(frobenius_sq(a, a), (a.T @ a).square().sum(), rtol=1e-12)


@pytest.mark.parametrize("loss", list(CASES))
def test_gradcheck(loss):
    z1, z2 = (z.requires_grad_() for z in _views(4, 6))
    torch.autograd.gradcheck(CASES[loss][0], (z1, z2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", list(CASES))
def test_low_precision_input(loss, dtype):
    """fp32 accumulation: the loss of rounded inputs is fp32 and equals the fp64 loss of the same
    rounded values to fp32 precision."""
    z1, z2 = _views(16, 48, dtype)
    out = CASES[loss][0](z1, z2)
    assert out.dtype == torch.float32
    assert_verbose_allclose(out, CASES[loss][2](z1.double(), z2.double()), rtol=2e-4, atol=1e-4)


# -- gather=True across processes (gloo) ------------------------------------------------------------------------




def _check_gather(rank, counts, loss):
    fn = {
        "barlow": lambda gather: lambda a, b: fastssl.barlow_twins_loss(a, b, gather=gather),
        "vicreg": lambda gather: lambda a, b: fastssl.vicreg_loss(a, b, gather=gather),
    }[loss]
    first, m = sum(counts[:rank]), counts[rank]
    mine = slice(first, first + m)
    for d in (4, 40):  # N ≥ D and N < D (Gram)
        z1, z2 = _views(sum(counts), d, seed=3)
        whole, (g1, g2) = _value_and_grads(fn(False), z1, z2)
        ours, (l1, l2) = _value_and_grads(fn(True), z1[mine], z2[mine])
        tag = f"rank {rank}/{len(counts)} {loss} D={d}"
        assert_verbose_allclose(ours, whole, rtol=1e-10, atol=1e-12, name=f"loss, {tag}")
        assert_verbose_allclose(l1, g1[mine], rtol=1e-9, atol=1e-12, name=f"grad z1, {tag}")
        assert_verbose_allclose(l2, g2[mine], rtol=1e-9, atol=1e-12, name=f"grad z2, {tag}")


def _gather_worker(rank, world, port, counts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for loss in CASES:
            _check_gather(rank, counts, loss)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_gather_matches_single_process(world):
    """Statistics over every rank's rows: on every rank the loss and gradients equal one process on
    the concatenated batch (ranks with different row counts, one of them a single row)."""
    counts = [3, 5, 1, 4][:world]
    mp.spawn(_gather_worker, args=(world, free_port(), counts), nprocs=world)
