"""NT-Xent: fused kernels against the eager reference, a peer (pytorch-metric-learning) and known values."""

from __future__ import annotations

import math

import pytest
import torch
from _assertions import assert_lowprec_close, assert_training_matches_reference, assert_verbose_allclose

import fastssl
from fastssl.ops.ntxent import ntxent_lse

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _inputs(b, d, dtype=torch.float32, device="cpu", labels=None, n_classes=None):
    z1 = torch.randn(b, d, dtype=dtype, device=device)
    z2 = (z1.float() + 0.5 * torch.randn(b, d, device=device)).to(dtype)  # correlated views
    y = None
    if labels == "z2":
        y = torch.randint(0, n_classes or max(1, b // 3), (b,), device=device)
    return z1, z2, y


def _loss_and_grads(z1, z2, **kw):
    z1 = z1.detach().clone().requires_grad_()
    z2 = None if z2 is None else z2.detach().clone().requires_grad_()
    loss = fastssl.nt_xent(z1, z2, **kw)
    inputs = [z1] if z2 is None else [z1, z2]
    weight = torch.linspace(0.5, 1.5, loss.numel()).view_as(loss) if loss.dim() else 1.0
    grads = torch.autograd.grad((loss * weight).sum(), inputs)
    return loss, grads


def _check_against_reference(impl, z1, z2, atol=1e-5, rtol=1e-5, **kw):
    """fp32/fp64: close to the reference in the same dtype; fp16/bf16: flash-attention's check."""
    loss, grads = _loss_and_grads(z1, z2, impl=impl, **kw)
    if z1.dtype in (torch.float32, torch.float64):
        ref_loss, ref_grads = _loss_and_grads(z1, z2, impl="reference", **kw)
        assert_verbose_allclose(loss, ref_loss, rtol=rtol, atol=atol, name="loss")
        for g, rg in zip(grads, ref_grads, strict=True):
            assert_verbose_allclose(g, rg, rtol=rtol, atol=atol, name="grad")
        return
    ref32 = _loss_and_grads(z1.float(), None if z2 is None else z2.float(), impl="reference", **kw)
    lowp = _loss_and_grads(z1, z2, impl="reference", **kw)
    assert loss.dtype == torch.float32
    assert_lowprec_close(loss, ref32[0], lowp[0], atol=1e-3, name="loss")
    for g, r, lp in zip(grads, ref32[1], lowp[1], strict=True):
        assert_lowprec_close(g.float(), r, lp.float(), atol=1e-3, name="grad")


# -- against the reference: C++ kernel -----------------------------------------------------------------------


@pytest.mark.parametrize("b", [1, 2, 3, 37, 256, 1000])
@pytest.mark.parametrize("d", [1, 3, 64, 128, 300])
def test_cpp_shapes(b, d):
    z1, z2, _ = _inputs(b, d)
    _check_against_reference("cpp", z1, z2, temperature=0.5)


@pytest.mark.parametrize("temperature", [0.01, 0.07, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("labels", [None, "z2", "only"])
def test_cpp_temperature_dtype_labels(temperature, dtype, labels):
    b, d = 37, 64
    z1, z2, y = _inputs(b, d, dtype, labels="z2" if labels else None)
    if labels == "only":  # z1 holds all rows; labels [N]
        z1, z2, y = torch.cat([z1, z2]), None, torch.randint(0, 20, (2 * b,))
    _check_against_reference("cpp", z1, z2, labels=y, temperature=temperature, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("labels", [None, "z2", "only"])
def test_cpp_reductions(reduction, labels):
    z1, z2, y = _inputs(300, 48, labels="z2" if labels else None)
    if labels == "only":
        z1, z2, y = torch.cat([z1, z2]), None, torch.randint(0, 150, (600,))
    _check_against_reference("cpp", z1, z2, labels=y, reduction=reduction, temperature=0.2)


def test_cpp_tiles_and_threads():
    """N not a multiple of the 256-row tile, several stripes, and the 1-thread path agree."""
    z1, z2, _ = _inputs(700, 20)
    _check_against_reference("cpp", z1, z2, temperature=0.1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _check_against_reference("cpp", z1, z2, temperature=0.1)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_non_contiguous(impl):
    base = torch.randn(40, 2, 30)
    z1, z2 = base[:, 0, ::2], base[:, 1, 1::2]  # strided in both dims
    assert not z1.is_contiguous()
    _check_against_reference(impl, z1, z2, temperature=0.3)
    _check_against_reference(impl, z1.t().contiguous().t(), z2, temperature=0.3)  # column-major


# -- against the reference: Triton kernel (interpreter on CPU) ---------------------------------------------


@pytest.mark.parametrize("b", [1, 3, 37])
@pytest.mark.parametrize("d", [3, 64])
@pytest.mark.parametrize("temperature", [0.01, 0.5])
def test_triton_shapes(b, d, temperature):
    z1, z2, _ = _inputs(b, d)
    _check_against_reference("triton", z1, z2, temperature=temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("labels", [None, "z2", "only"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_dtype_labels_reduction(dtype, labels, reduction):
    b, d = 20, 40
    z1, z2, y = _inputs(b, d, dtype, labels="z2" if labels else None)
    if labels == "only":
        z1, z2, y = torch.cat([z1, z2]), None, torch.randint(0, 10, (2 * b,))
    _check_against_reference("triton", z1, z2, labels=y, reduction=reduction, temperature=0.07, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 37, 1000, 4100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.01, 0.1])
def test_triton_gpu(b, dtype, temperature):
    z1, z2, _ = _inputs(b, 128, dtype, device="cuda")
    _check_against_reference("auto", z1, z2, temperature=temperature, atol=1e-4, rtol=1e-4)


# -- known values and a peer -------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "cpp", "triton"])
def test_known_values(impl):
    e = torch.eye(2)
    # B = 1: each row's only other row is its positive, so ℓ = LSE(s) − s = 0.
    assert fastssl.nt_xent(e[:1], e[1:], impl=impl).item() == pytest.approx(0.0, abs=1e-6)
    # identical views of two orthogonal vectors: row i meets its copy (s = 1/τ) and two orthogonal rows (s = 0)
    tau = 0.5
    expected = math.log(2 + math.exp(1 / tau)) - 1 / tau
    assert fastssl.nt_xent(e, e.clone(), temperature=tau, impl=impl).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_matches_pytorch_metric_learning(impl):
    from pytorch_metric_learning.losses import NTXentLoss, SupConLoss

    b = 24 if impl == "triton" else 64
    z1, z2, _ = _inputs(b, 32)
    z = torch.cat([z1, z2])
    ours = fastssl.nt_xent(z1, z2, temperature=0.1, impl=impl)
    theirs = NTXentLoss(temperature=0.1)(z, torch.arange(b).repeat(2))
    assert_verbose_allclose(ours, theirs, rtol=1e-5, atol=1e-5, name="NTXentLoss")
    # multi-positive: SupCon's L_out, which pytorch-metric-learning's SupConLoss implements
    y = torch.randint(0, 6, (2 * b,))
    ours = fastssl.nt_xent(z, labels=y, temperature=0.1, impl=impl)
    theirs = SupConLoss(temperature=0.1)(z, y)
    assert_verbose_allclose(ours, theirs, rtol=1e-5, atol=1e-5, name="SupConLoss")


# -- numerics ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_small_temperature_is_exact(impl):
    """τ = 0.01 with nearly opposite views: a fixed shift of 1/τ would underflow every exp(s − 1/τ)."""
    v = torch.randn(8, 16)
    z1, z2 = v, -v + 1e-3 * torch.randn(8, 16)
    z1[1:] = z1[:1] * torch.linspace(1, 2, 7)[:, None]  # rows 0-7 of z1 nearly parallel ...
    z2[1:] = -z1[1:]  # ... and every positive pair nearly opposite
    exact = fastssl.nt_xent(z1.double(), z2.double(), temperature=0.01, impl="reference")
    loss, grads = _loss_and_grads(z1, z2, temperature=0.01, impl=impl)
    _, ref_grads = _loss_and_grads(z1.double(), z2.double(), temperature=0.01, impl="reference")
    assert torch.isfinite(loss) and exact > 100  # the loss is large and finite, not inf or 0
    assert_verbose_allclose(loss, exact, rtol=1e-5, name="loss")
    for g, rg in zip(grads, ref_grads, strict=True):
        assert_verbose_allclose(g, rg, rtol=1e-4, atol=1e-4, name="grad")


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_gradcheck_fp64(impl):
    z1 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 2, 1])
    for tau in (0.5, 0.02):  # fixed shift, and the per-row shift path
        kw = {"temperature": tau, "impl": impl}
        assert torch.autograd.gradcheck(lambda a, b, kw=kw: fastssl.nt_xent(a, b, **kw), (z1, z2))
        assert torch.autograd.gradcheck(
            lambda a, b, kw=kw: fastssl.nt_xent(a, b, labels=y, reduction="none", **kw), (z1, z2)
        )


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_opcheck(impl):
    x = torch.randn(9, 5)
    r = 1 / x.norm(dim=1)
    for inv_tau in (2.0, 100.0):
        torch.library.opcheck(ntxent_lse, (x, r, inv_tau, impl))
        torch.library.opcheck(ntxent_lse, (x.clone().requires_grad_(), r.clone().requires_grad_(), inv_tau, impl))


def test_torch_compile_fullgraph():
    def step(z1, z2):
        return fastssl.nt_xent(z1, z2, temperature=0.2) * 2

    z1, z2, _ = _inputs(33, 16)
    z1.requires_grad_()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    out = compiled(z1, z2)
    (g,) = torch.autograd.grad(out, z1)
    (ref_g,) = torch.autograd.grad(step(z1, z2), z1)
    assert_verbose_allclose(out, step(z1, z2), name="compiled loss")
    assert_verbose_allclose(g, ref_g, name="compiled grad")


def test_convergence_matches_reference():
    """A small MLP encoder trained with the fused loss and with the reference ends in the same place."""

    def make_loss(impl):
        return lambda model, v1, v2: fastssl.nt_xent(model(v1), model(v2), temperature=0.2, impl=impl)

    assert_training_matches_reference(64, 30, make_loss)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_rows_without_positive_are_left_out(impl):
    z = torch.randn(5, 8)
    y = torch.tensor([0, 0, 1, 2, 2])  # row 2 has no positive
    rows = fastssl.nt_xent(z, labels=y, reduction="none", impl=impl)
    ref_rows = fastssl.nt_xent(z, labels=y, reduction="none", impl="reference")
    assert rows[2].item() == 0.0
    assert_verbose_allclose(rows, ref_rows, name="rows")
    mean = fastssl.nt_xent(z, labels=y, impl=impl)
    assert mean.item() == pytest.approx(rows[[0, 1, 3, 4]].mean().item(), rel=1e-6)
    assert fastssl.nt_xent(z, labels=y, reduction="sum", impl=impl).item() == pytest.approx(rows.sum().item())


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_give_non_finite_loss(impl, bad):
    z1, z2, _ = _inputs(6, 4)
    z1[3, 1] = bad
    assert not torch.isfinite(fastssl.nt_xent(z1, z2, impl=impl))
    rows = fastssl.nt_xent(z1, z2, impl=impl, reduction="none")
    assert not torch.isfinite(rows[3])


# -- module and dispatch ----------------------------------------------------------------------------------


def test_module_matches_function():
    z1, z2, y = _inputs(10, 6, labels="z2")
    module = fastssl.NTXentLoss(temperature=0.3, reduction="sum")
    assert "temperature=0.3" in repr(module)
    assert module(z1, z2, y).item() == pytest.approx(
        fastssl.nt_xent(z1, z2, labels=y, temperature=0.3, reduction="sum").item()
    )


def test_impl_from_environment(monkeypatch):
    z1, z2, _ = _inputs(4, 3)
    monkeypatch.setenv("FASTSSL_IMPL", "reference")
    ref = fastssl.nt_xent(z1, z2)
    monkeypatch.setenv("FASTSSL_IMPL", "nonsense")
    with pytest.raises(ValueError, match="impl"):
        fastssl.nt_xent(z1, z2)
    monkeypatch.delenv("FASTSSL_IMPL")
    assert fastssl.nt_xent(z1, z2).item() == pytest.approx(ref.item(), rel=1e-5)


# -- bad input ------------------------------------------------------------------------------------------------

Z = torch.randn(4, 3)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((Z, torch.randn(5, 3)), {}, ValueError, "z2"),
        ((Z, torch.randn(4, 2)), {}, ValueError, "z2"),
        ((Z, Z.double()), {}, TypeError, "z2"),
        ((Z.to("meta"), Z), {}, ValueError, "z2"),
        ((torch.randn(4), Z), {}, ValueError, "z1"),
        ((torch.randn(4, 3, 2), None), {"labels": torch.zeros(4)}, ValueError, "z1"),
        ((torch.ones(4, 3, dtype=torch.int64), None), {"labels": torch.zeros(4)}, TypeError, "z1"),
        (([[1.0, 2.0]], None), {}, TypeError, "z1"),
        ((Z, Z), {"temperature": 0.0}, ValueError, "temperature"),
        ((Z, Z), {"temperature": -1.0}, ValueError, "temperature"),
        ((Z, Z), {"temperature": float("nan")}, ValueError, "temperature"),
        ((Z, Z), {"temperature": float("inf")}, ValueError, "temperature"),
        ((Z, Z), {"temperature": "0.5"}, TypeError, "temperature"),
        ((Z, Z), {"labels": torch.zeros(3, dtype=torch.long)}, ValueError, "labels"),
        ((Z, Z), {"labels": torch.zeros(4)}, TypeError, "labels"),
        ((Z, None), {}, ValueError, "labels"),
        ((Z, None), {"labels": torch.arange(4)}, ValueError, "no row has a positive"),
        ((torch.randn(0, 3), torch.randn(0, 3)), {}, ValueError, "empty"),
        ((torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, "features"),
        ((Z, Z), {"reduction": "avg"}, ValueError, "reduction"),
        ((Z, Z), {"impl": "fast"}, ValueError, "impl"),
        ((Z, Z), {"impl": "cuda"}, ValueError, "cuda"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastssl.nt_xent(*args, **kwargs)


# -- a tensor temperature (issue 13, item 3) and scale-safe rows (item 2) ----------------------------------------


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("labels", [None, "z2"])
def test_tensor_temperature_gradient(impl, labels):
    """A tensor τ that requires grad gets the exact ∂L/∂τ (it was left None), with the reference's
    loss and input gradients."""
    z1, z2, y = _inputs(13, 6, torch.float64, labels=labels)
    results = []
    for which in (impl, "reference"):
        tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = fastssl.nt_xent(a, b, labels=y, temperature=tau, impl=which)
        results.append((loss, *torch.autograd.grad(loss, (a, b, tau))))
    for got, want in zip(*results, strict=True):
        assert_verbose_allclose(got, want, rtol=1e-10, atol=1e-12, name="loss and grads (z1, z2, τ)")


@pytest.mark.parametrize("impl", ["reference", "cpp", "triton"])
def test_rows_of_extreme_norm(impl):
    """Rows of norm 1e±20 in fp32 give the loss of their unit rows (‖z‖² over/underflows in fp32)."""
    z1, z2, _ = _inputs(6, 5)
    scale = torch.tensor([1e20, 1e-20, 1.0, 1e-30, 1e30, 3.0])[:, None]
    want = fastssl.nt_xent(z1, z2, impl=impl)
    got = fastssl.nt_xent(z1 * scale, z2 * scale.flip(0), impl=impl)
    assert_verbose_allclose(got, want, rtol=1e-5, atol=1e-6, name="loss")
