"""DCL and DCLW: equal in fp64 (loss and gradients) to lightly's DCLLoss and DCLWLoss and to the
reference, for every impl, a tensor temperature, and gather=True across gloo processes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _assertions import assert_verbose_allclose
from _dist import free_port
from _peers import peer
from test_info_nce import _all_reduced, _rank_blocks, _value_and_grads

import fastssl

pytestmark = pytest.mark.filterwarnings("ignore:To copy construct:UserWarning")  # lightly's DCLW weights


def _views(n, d):
    gen = torch.Generator().manual_seed(0)
    z1 = 2 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return z1, z1 + 0.8 * torch.randn(n, d, generator=gen, dtype=torch.float64)


def _check(ours_fn, theirs_fn, tensors, name, rtol=1e-10):
    outs = [_value_and_grads(fn, tensors, 1.0) for fn in (ours_fn, theirs_fn)]
    (a, ga), (b, gb) = outs
    assert_verbose_allclose(a, b, rtol=rtol, atol=1e-12, name=f"loss, {name}")
    for x, y in zip(ga, gb, strict=True):
        assert_verbose_allclose(x, y, rtol=rtol, atol=1e-12, name=f"grad, {name}")


@pytest.mark.parametrize("impl", ["cpp", "reference"])
@pytest.mark.parametrize("sigma", [None, 0.5, 2.0])
@pytest.mark.parametrize("n, d, tau", [(2, 3, 0.1), (19, 8, 0.5), (33, 5, 0.03)])
def test_equals_lightly(impl, sigma, n, d, tau):
    loss = peer("lightly.loss.dcl_loss")
    theirs = loss.DCLLoss(temperature=tau) if sigma is None else loss.DCLWLoss(temperature=tau, sigma=sigma)
    _check(
        lambda a, b: fastssl.dcl_loss(a, b, temperature=tau, sigma=sigma, impl=impl), theirs, _views(n, d),
        f"{impl} sigma={sigma} n={n}",
    )  # fmt: skip


@pytest.mark.parametrize("sigma", [None, 0.5])
def test_triton_equals_reference(sigma):
    def fn(impl):
        return lambda a, b: fastssl.dcl_loss(a, b, temperature=0.2, sigma=sigma, impl=impl)

    _check(fn("triton"), fn("reference"), _views(21, 6), f"triton sigma={sigma}")


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_tensor_temperature_gradient(impl):
    z1, z2 = _views(9, 4)
    tau = torch.tensor(0.3, dtype=torch.float64)

    def fn(impl):
        return lambda a, b, t: fastssl.dcl_loss(a, b, temperature=t, sigma=1.0, impl=impl)

    _check(fn(impl), fn("reference"), (z1, z2, tau), f"{impl} tensor temperature")


def test_fp32_close_to_fp64():
    z1, z2 = _views(40, 16)
    ours = fastssl.dcl_loss(z1.float(), z2.float(), temperature=0.05)
    assert ours.dtype == torch.float32
    assert_verbose_allclose(ours.double(), fastssl.dcl_loss(z1, z2, temperature=0.05), rtol=1e-5, name="fp32")


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_gradcheck(impl):  # DCL only: DCLW's weights are detached, so its numeric gradient differs
    z1, z2 = (x.clone().requires_grad_() for x in _views(5, 3))
    assert torch.autograd.gradcheck(lambda a, b: fastssl.dcl_loss(a, b, temperature=0.4, impl=impl), (z1, z2))


def test_non_finite_gives_non_finite():
    z1, z2 = _views(6, 4)
    z1[2, 1] = torch.nan
    assert not torch.isfinite(fastssl.dcl_loss(z1, z2))


# -- gather=True across processes (gloo) ------------------------------------------------------------------------


def _gather_worker(rank, world, port, counts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        first, m = sum(counts[:rank]), counts[rank]
        mine = slice(first, first + m)
        z1_all, z2_all = (torch.cat(_rank_blocks(counts, 5, seed)) for seed in (7, 8))
        tau = torch.tensor(0.3, dtype=torch.float64)
        impls = ["cpp", "reference"] + (["triton"] if world == 2 else [])
        for impl in impls:
            for sigma in (None, 0.5):

                def loss(gather, impl=impl, sigma=sigma):
                    return lambda a, b, t: fastssl.dcl_loss(a, b, temperature=t, sigma=sigma, gather=gather, impl=impl)

                tag = f"rank {rank}/{world} {impl} sigma={sigma}"
                whole, (g1, g2, gt) = _value_and_grads(loss(False), (z1_all, z2_all, tau), 1.0)
                ours, (l1, l2, lt) = _value_and_grads(loss(True), (z1_all[mine], z2_all[mine], tau), 1.0)
                assert_verbose_allclose(ours, whole, rtol=1e-10, atol=1e-12, name=f"loss, {tag}")
                assert_verbose_allclose(l1, g1[mine], rtol=1e-9, atol=1e-12, name=f"grad z1, {tag}")
                assert_verbose_allclose(l2, g2[mine], rtol=1e-9, atol=1e-12, name=f"grad z2, {tag}")
                assert_verbose_allclose(_all_reduced(lt), gt, rtol=1e-9, atol=1e-12, name=f"grad tau, {tag}")
        dist.barrier()  # every rank done before any tears the group down
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_gather_matches_single_process(world):
    """On every rank, loss and gradients equal those of one process on the concatenated batch."""
    counts = [3, 5, 1, 4][:world]
    mp.spawn(_gather_worker, args=(world, free_port(), counts), nprocs=world)
