"""Masking: kernels against MAE's argsort-and-gather reference, BEiT's generator, and known properties."""

from __future__ import annotations

import sys

import pytest
import torch
from _assertions import assert_lowprec_close, assert_verbose_allclose, zero_fills_in_backward

import fastssl
from fastssl import masking
from fastssl.ops import masking as ops
from fastssl.reference import masking as reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KERNELS = ["cpp", "triton"]


def _gen(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _masked_neighbour_fraction(mask: torch.Tensor) -> float:
    """Mean fraction of a masked patch's 4-neighbours (inside the grid) that are masked."""
    m = torch.nn.functional.pad(mask.float(), (1, 1, 1, 1))
    inside = torch.nn.functional.pad(torch.ones_like(mask, dtype=torch.float), (1, 1, 1, 1))
    shifts = [(slice(None, -2), slice(1, -1)), (slice(2, None), slice(1, -1)),
              (slice(1, -1), slice(None, -2)), (slice(1, -1), slice(2, None))]  # fmt: skip
    nb = sum(m[:, r, c] for r, c in shifts)
    n_in = sum(inside[:, r, c] for r, c in shifts)
    return ((nb / n_in)[mask]).mean().item()


# -- random masking and unshuffle against MAE's code ---------------------------------------------------------

SHAPES = [  # (B, N, D, num_prefix_tokens, mask_ratio)
    (1, 5, 3, 0, 0.5),
    (3, 17, 8, 1, 0.75),
    (2, 197, 16, 1, 0.75),  # ViT-B/16 at 224: 196 patches and a class token
    (2, 37, 300, 2, 0.6),  # several row blocks and column blocks in the Triton kernels
    (2, 9, 4, 0, 0.0),  # nothing removed: the tokens are shuffled
    (3, 10, 4, 0, 0.95),  # keep = int(10·0.05) = 0: only the prefix (none) is visible
]


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_masking_matches_reference(impl, shape, dtype):
    b, n, d, p, ratio = shape
    x = torch.randn(b, n, d).to(dtype)
    ours = fastssl.random_masking(x, ratio, generator=_gen(3), num_prefix_tokens=p, impl=impl)
    ref = fastssl.random_masking(x, ratio, generator=_gen(3), num_prefix_tokens=p, impl="reference")
    keep = int((n - p) * (1 - ratio))
    assert ours[0].shape == (b, p + keep, d) and ours[1].shape == ours[2].shape == (b, n - p)
    for name, a, r in zip(("x_visible", "mask", "ids_restore"), ours, ref, strict=True):
        assert a.dtype == r.dtype, name
        assert torch.equal(a, r), f"{name} differs from MAE's reference"


def test_reference_is_maes_argsort_formulation():
    """The reference with fresh noise is MAE's random_masking line for line (here: written out again)."""
    x, noise = torch.randn(4, 12, 5), torch.rand(4, 12)
    keep = 3
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_masked = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, 5))
    visible, mask, ids = reference.random_masking(x, noise, keep)
    assert torch.equal(ids, ids_restore) and torch.equal(visible, x_masked)
    assert torch.equal(mask, (ids_restore >= keep).float())


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
def test_kept_counts_and_inverse_permutation(impl):
    b, l, d, p = 5, 23, 6, 1
    x = torch.randn(b, p + l, d)
    visible, mask, ids_restore = fastssl.random_masking(x, 0.7, generator=_gen(1), num_prefix_tokens=p, impl=impl)
    keep = int(l * 0.3)
    assert visible.shape == (b, p + keep, d)
    assert torch.equal(mask.sum(1), torch.full((b,), float(l - keep)))
    assert torch.equal(ids_restore.sort(1).values, torch.arange(l).expand(b, -1))  # a permutation
    assert torch.equal(mask, (ids_restore >= keep).float())
    ids_shuffle = torch.argsort(ids_restore, dim=1)  # ids_restore inverts the shuffle
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(l).expand(b, -1))
    assert torch.equal(visible[:, :p], x[:, :p])  # the prefix stays in front
    assert torch.equal(visible[:, p:], torch.gather(x[:, p:], 1, ids_shuffle[:, :keep, None].expand(-1, -1, d)))


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
@pytest.mark.parametrize("p", [0, 1])
def test_unshuffle_puts_visible_tokens_back(impl, p):
    b, l, d = 4, 31, 20
    x = torch.randn(b, p + l, d)
    token = torch.randn(1, 1, d)
    visible, mask, ids_restore = fastssl.random_masking(x, 0.75, generator=_gen(2), num_prefix_tokens=p, impl=impl)
    out = fastssl.unshuffle(visible, ids_restore, token, num_prefix_tokens=p, impl=impl)
    expected = torch.where(mask.bool()[..., None], token.view(1, 1, d), x[:, p:])
    assert torch.equal(out, torch.cat([x[:, :p], expected], 1))
    ref = fastssl.unshuffle(visible, ids_restore, token, num_prefix_tokens=p, impl="reference")
    assert torch.equal(out, ref)


def test_each_position_masked_with_frequency_mask_ratio():
    b, l = 2000, 16
    _, mask, _ = fastssl.random_masking(torch.zeros(b, l, 1), 0.6, generator=_gen(4))
    # keep = int(16·0.4) = 6, so each patch is masked with probability 10/16; binomial std ≈ 0.011
    freq = mask.mean(0)
    assert (freq - 10 / 16).abs().max() < 0.05, freq
    assert torch.equal(mask.sum(1), torch.full((b,), 10.0))


def test_seeds_reproduce_masks():
    x = torch.randn(6, 50, 4)
    a = fastssl.random_masking(x, generator=_gen(7))
    b = fastssl.random_masking(x, generator=_gen(7))
    c = fastssl.random_masking(x, generator=_gen(8))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[2], c[2])
    assert not torch.equal(a[2][0], a[2][1])  # per-sample masks
    torch.manual_seed(5)  # no generator: the global RNG, as MAE's torch.rand(N, L)
    d = fastssl.random_masking(x)
    torch.manual_seed(5)
    assert torch.equal(d[2], reference.random_masking(x, torch.rand(6, 50), 12)[2])


def _masking_grads(impl, x, token, weights, p, ratio=0.75):
    x = x.detach().clone().requires_grad_()
    token = token.detach().clone().requires_grad_()
    visible, _, ids = fastssl.random_masking(x, ratio, generator=_gen(9, x.device), num_prefix_tokens=p, impl=impl)
    out = fastssl.unshuffle(visible * 2, ids, token, num_prefix_tokens=p, impl=impl)
    return out, torch.autograd.grad((out.float() * weights).sum(), (x, token))


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_against_reference(impl, dtype):
    b, l, d, p = 3, 29, 24, 1
    x = torch.randn(b, p + l, d).to(dtype)
    token = torch.randn(d).to(dtype)
    weights = torch.randn(b, p + l, d)
    out, (gx, gt) = _masking_grads(impl, x, token, weights, p)
    ref_out, (ref_gx, ref_gt) = _masking_grads("reference", x, token, weights, p)
    assert torch.equal(out, ref_out)
    assert torch.equal(gx, ref_gx)  # pure data movement: exact in every dtype
    if dtype == torch.float32:
        assert_verbose_allclose(gt, ref_gt, rtol=1e-5, atol=1e-5, name="mask token grad")
    else:  # the token's gradient is a sum over masked rows: fp32 accumulation here, bf16 in the reference
        _, (_, ref32_gt) = _masking_grads("reference", x.float(), token.float(), weights, p)
        assert_lowprec_close(gt.float(), ref32_gt, ref_gt.float(), atol=1e-2, name="mask token grad")


@pytest.mark.parametrize("impl", KERNELS)
def test_gradcheck_fp64(impl):
    x = torch.randn(2, 5, 2, dtype=torch.float64, requires_grad=True)
    token = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def fn(x, token):
        visible, _, ids = fastssl.random_masking(x, 0.5, generator=_gen(1), num_prefix_tokens=1, impl=impl)
        return fastssl.unshuffle(visible.sin(), ids, token, num_prefix_tokens=1, impl=impl)

    assert torch.autograd.gradcheck(fn, (x, token))
    if impl == "cpp":  # the double backward is the same autograd code for both kernels
        assert torch.autograd.gradgradcheck(fn, (x, token))


@pytest.mark.parametrize("impl", KERNELS)
def test_non_contiguous_tokens(impl):
    base = torch.randn(3, 40, 2, 18)
    x = base[:, 1::2, 0, ::2]  # strided in every dim
    assert not x.is_contiguous()
    ours = fastssl.random_masking(x, 0.5, generator=_gen(0), num_prefix_tokens=1, impl=impl)
    ref = fastssl.random_masking(x.contiguous(), 0.5, generator=_gen(0), num_prefix_tokens=1, impl="reference")
    assert all(torch.equal(a, r) for a, r in zip(ours, ref, strict=True))
    visible = ours[0].transpose(1, 2).contiguous().transpose(1, 2)  # token dim strided
    token = torch.randn(9)
    out = fastssl.unshuffle(visible, ours[2], token, num_prefix_tokens=1, impl=impl)
    assert torch.equal(out, fastssl.unshuffle(ours[0], ours[2], token, num_prefix_tokens=1, impl="reference"))


@pytest.mark.parametrize("impl", KERNELS)
def test_corrupt_ids_restore_stays_in_bounds(impl):
    """Ranks outside [0, keep) count as masked: the kernels never read or write out of bounds."""
    visible = torch.randn(2, 3, 4)
    ids = torch.tensor([[0, -7, 10**12, 2, 1], [4, 3, 2, 1, 0]])
    token = torch.full((4,), 9.0)
    out = fastssl.unshuffle(visible, ids, token, impl=impl)
    assert torch.equal(out[0, 1], token) and torch.equal(out[0, 2], token) and torch.equal(out[0, 0], visible[0, 0])
    gathered, _ = ops.masking_gather(out, ids, 3, 0, True, impl)
    assert torch.equal(gathered[0, 0], visible[0, 0])


@pytest.mark.parametrize("impl", KERNELS)
def test_opcheck(impl):
    x = torch.randn(2, 6, 3)
    ids = torch.argsort(torch.argsort(torch.rand(2, 5), 1), 1)
    torch.library.opcheck(ops.masking_rank, (torch.rand(2, 5), impl))
    for sum_masked in (False, True):
        torch.library.opcheck(ops.masking_gather, (x.clone().requires_grad_(), ids, 2, 1, sum_masked, impl))
    visible = torch.randn(2, 3, 3, requires_grad=True)
    token = torch.randn(3, requires_grad=True)
    torch.library.opcheck(ops.masking_unshuffle, (visible, ids, token, 1, impl))
    pred, target = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4)
    weight = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.5, 1.0]])
    torch.library.opcheck(ops.masked_mse, (pred, target, weight, True, True, impl))
    torch.library.opcheck(ops.masked_mse, (pred.detach(), target, weight, False, False, impl))


def test_torch_compile_fullgraph():
    """A small MAE step (mask, encode, unshuffle, decode, loss) traces without graph breaks."""
    enc, dec = torch.nn.Linear(8, 8), torch.nn.Linear(8, 12)
    token = torch.nn.Parameter(torch.randn(1, 1, 8))

    def step(x, target):
        visible, mask, ids = fastssl.random_masking(x, 0.75, num_prefix_tokens=1)
        pred = dec(fastssl.unshuffle(enc(visible), ids, token, num_prefix_tokens=1))[:, 1:]
        return fastssl.masked_mse_loss(pred, target, mask, norm_pix=True)

    x, target = torch.randn(4, 17, 8), torch.randn(4, 16, 12)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    torch.manual_seed(1)
    with torch._inductor.config.patch(fallback_random=True):  # eager's torch.rand, so the masks agree
        loss = compiled(x, target)
    grads = torch.autograd.grad(loss, [enc.weight, token])
    torch.manual_seed(1)
    ref = step(x, target)
    ref_grads = torch.autograd.grad(ref, [enc.weight, token])
    assert_verbose_allclose(loss, ref, rtol=1e-5, name="compiled loss")
    for g, r in zip(grads, ref_grads, strict=True):
        assert_verbose_allclose(g, r, rtol=1e-4, atol=1e-6, name="compiled grad")


# -- masked MSE loss ---------------------------------------------------------------------------------------


def _loss_and_grad(pred, target, mask, impl, norm_pix):
    pred = pred.detach().clone().requires_grad_()
    loss = fastssl.masked_mse_loss(pred, target, mask, norm_pix=norm_pix, impl=impl)
    (grad,) = torch.autograd.grad(loss * 1.5, pred)
    return loss, grad


def _loss_inputs(b, l, p, dtype, mask_kind="bool"):
    pred, target = torch.randn(b, l, p).to(dtype), (3 + 2 * torch.randn(b, l, p)).to(dtype)
    mask = torch.rand(b, l) < 0.75
    mask[0, 0] = True
    if mask_kind == "float":
        mask = mask.float()
    elif mask_kind == "weights":
        mask = mask * torch.rand(b, l)
    return pred, target, mask


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 7, 3), (3, 13, 48), (2, 5, 1100)], ids=str)
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "weights"])
def test_masked_mse_matches_reference_fp32(impl, shape, norm_pix, mask_kind):
    pred, target, mask = _loss_inputs(*shape, torch.float32, mask_kind)
    loss, grad = _loss_and_grad(pred, target, mask, impl, norm_pix)
    ref_loss, ref_grad = _loss_and_grad(pred, target, mask, "reference", norm_pix)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_verbose_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6, name="loss")
    assert_verbose_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7, name="grad")


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_mse_low_precision(impl, norm_pix, dtype):
    pred, target, mask = _loss_inputs(3, 11, 40, dtype)
    loss, grad = _loss_and_grad(pred, target, mask, impl, norm_pix)
    ref32 = _loss_and_grad(pred.float(), target.float(), mask, "reference", norm_pix)
    lowp = _loss_and_grad(pred, target, mask, "reference", norm_pix)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_lowprec_close(loss, ref32[0], lowp[0].float(), atol=1e-4, name="loss")
    # the gradient is rounded to pred's dtype in forward, then scaled by the upstream 1.5: one unit in
    # the last place more than a single rounding
    ulp = ref32[1].abs().max().item() * torch.finfo(dtype).eps
    assert_lowprec_close(grad.float(), ref32[1], lowp[1].float(), atol=ulp, name="grad")


@pytest.mark.parametrize("impl", KERNELS)
def test_masked_mse_mixed_dtypes(impl):
    """Under autocast the decoder's output is bf16 while the target (the image) stays fp32."""
    pred, target, mask = _loss_inputs(2, 9, 30, torch.float32)
    loss, grad = _loss_and_grad(pred.bfloat16(), target, mask, impl, True)
    ref_loss, ref_grad = _loss_and_grad(pred.bfloat16().float(), target, mask, "reference", True)
    assert grad.dtype == torch.bfloat16
    assert_verbose_allclose(loss, ref_loss, rtol=1e-5, name="loss")
    assert_verbose_allclose(grad.float(), ref_grad, rtol=1e-2, atol=1e-4, name="grad")


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_gradcheck_fp64(impl, norm_pix):
    pred = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1], [0, 0.5, 2]], dtype=torch.float64)
    fn = lambda p: fastssl.masked_mse_loss(p, target, mask, norm_pix=norm_pix, impl=impl)
    assert torch.autograd.gradcheck(fn, (pred,))
    assert fn(pred).dtype == torch.float64


@pytest.mark.parametrize("impl", KERNELS)
def test_masked_mse_non_finite(impl):
    pred, target, mask = _loss_inputs(2, 6, 5, torch.float32)
    mask = mask.clone()
    mask[1, 2], mask[1, 3] = True, False
    bad = pred.clone()
    bad[1, 2, 0] = float("nan")
    assert torch.isnan(fastssl.masked_mse_loss(bad, target, mask, impl=impl))
    bad = pred.clone()
    bad[1, 3, 1] = float("inf")  # an unmasked patch is not read (documented)
    expected = fastssl.masked_mse_loss(pred, target, mask, impl="reference")
    assert_verbose_allclose(fastssl.masked_mse_loss(bad, target, mask, impl=impl), expected, rtol=1e-6)


@pytest.mark.parametrize("impl", KERNELS)
def test_masked_mse_without_grad_and_target_not_differentiated(impl):
    pred, target, mask = _loss_inputs(2, 6, 5, torch.float32)
    with torch.no_grad():
        no_grad = fastssl.masked_mse_loss(pred, target, mask, impl=impl)
    assert_verbose_allclose(no_grad, fastssl.masked_mse_loss(pred, target, mask, impl="reference"), rtol=1e-6)
    target = target.clone().requires_grad_()
    p = pred.clone().requires_grad_()
    fastssl.masked_mse_loss(p, target, mask, impl=impl).backward()
    assert target.grad is None and p.grad is not None


@pytest.mark.parametrize("impl", KERNELS)
def test_masked_mse_backward_accumulates(impl):
    """loss.backward() (upstream 1: the precomputed gradient is handed back as is) twice accumulates 2·grad."""
    pred, target, mask = _loss_inputs(2, 5, 6, torch.float32)
    pred.requires_grad_()
    loss = fastssl.masked_mse_loss(pred, target, mask, impl=impl)
    loss.backward(retain_graph=True)
    first = pred.grad.clone()
    loss.backward()
    (ref,) = torch.autograd.grad(fastssl.masked_mse_loss(pred, target, mask, impl="reference"), pred)
    assert_verbose_allclose(first, ref, rtol=1e-5, atol=1e-8, name="grad")
    assert_verbose_allclose(pred.grad, 2 * ref, rtol=1e-5, atol=1e-8, name="accumulated grad")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(fastssl.masked_mse_loss(pred, target, mask, impl=impl), pred, create_graph=True)


@pytest.mark.parametrize("impl", KERNELS)
def test_masked_mse_gradient_is_not_a_buffer_the_graph_holds(impl):
    """Issue 13: with retain_graph, zeroing pred.grad in place (or through .data) and calling backward
    again gives the gradient again: backward never hands autograd a buffer the graph still holds."""
    pred, target, mask = _loss_inputs(2, 5, 6, torch.float32)
    pred.requires_grad_()
    loss = fastssl.masked_mse_loss(pred, target, mask, impl=impl)
    (ref,) = torch.autograd.grad(fastssl.masked_mse_loss(pred, target, mask, impl="reference"), pred)
    for zero in (lambda g: g.zero_(), lambda g: g.data.zero_()):
        loss.backward(retain_graph=True)
        zero(pred.grad)
        loss.backward(retain_graph=True)
        assert_verbose_allclose(pred.grad, ref, rtol=1e-5, atol=1e-8, name="grad after zeroing .grad")
        pred.grad = None


@pytest.mark.parametrize("impl", KERNELS)
def test_masked_mse_backward_makes_no_pred_sized_tensor(impl):
    """The op's second output (the gradient) gets no gradient: autograd must not materialise a
    pred-sized zero tensor for it on every backward. It did: a 154 MB fill at MAE's size, half of
    the loss's forward+backward (benchmarks/bench_masking.py). The forward's gradient is handed over
    as it is."""
    pred, target, mask = _loss_inputs(2, 5, 6, torch.float32)
    pred.requires_grad_()
    loss = fastssl.masked_mse_loss(pred, target, mask, impl=impl)
    assert not zero_fills_in_backward(loss, pred.shape)


def test_masking_grads_follow_the_tensors_device(monkeypatch):
    """Issue 12: the helper the GPU test calls draws its masks on the tensors' device (a CPU generator
    with CUDA tensors raised). Checked on the meta device, with the generator creation recorded."""
    seen = []
    monkeypatch.setattr(sys.modules[__name__], "_gen", lambda seed, device="cpu": seen.append(torch.device(device)))
    x, token, weights = (torch.empty(s, device="meta") for s in ((2, 6, 3), (3,), (2, 6, 3)))
    out, _ = _masking_grads("reference", x, token, weights, 1)
    assert out.shape == (2, 6, 3) and seen == [torch.device("meta")]


def test_masked_mse_convergence_matches_reference():
    """A tiny masked autoencoder trained with the kernels and with MAE's code ends in the same place."""
    torch.manual_seed(1)  # four near-copies of one pattern per image: masked patches are predictable
    images = torch.randn(8, 2, 4, 4, dtype=torch.float64).repeat(1, 1, 2, 2)
    images += 0.05 * torch.randn(8, 2, 8, 8, dtype=torch.float64)
    finals = {}
    for impl in ("cpp", "reference"):
        torch.manual_seed(2)
        embed, head = torch.nn.Linear(32, 16).double(), torch.nn.Linear(16, 32).double()
        token = torch.nn.Parameter(torch.zeros(1, 1, 16, dtype=torch.float64))
        params = [*embed.parameters(), *head.parameters(), token]
        opt = torch.optim.SGD(params, lr=0.5)
        gen, losses = _gen(3), []
        for _ in range(20):
            target = fastssl.patchify(images, 4)  # [8, 4, 32]
            visible, mask, ids = fastssl.random_masking(embed(target), 0.5, generator=gen, impl=impl)
            decoded = fastssl.unshuffle(visible, ids, token, impl=impl)
            pred = head(decoded + decoded.mean(1, keepdim=True))  # the mean mixes visible into masked tokens
            loss = fastssl.masked_mse_loss(pred, target, mask, norm_pix=True, impl=impl)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        finals[impl] = (torch.tensor(losses), torch.cat([q.detach().flatten() for q in params]))
    assert finals["cpp"][0][-1] < 0.5 * finals["cpp"][0][0]  # it learned
    assert_verbose_allclose(finals["cpp"][0], finals["reference"][0], rtol=1e-9, atol=1e-10, name="losses")
    assert_verbose_allclose(finals["cpp"][1], finals["reference"][1], rtol=1e-8, atol=1e-10, name="params")


# -- patchify ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, p", [((2, 3, 32, 32), 16), ((1, 1, 12, 20), 4), ((3, 2, 6, 6), 1)])
def test_patchify_matches_mae_and_round_trips(shape, p):
    images = torch.randn(shape)
    patches = fastssl.patchify(images, p)
    assert torch.equal(patches, reference.patchify(images, p))
    h, w = shape[2] // p, shape[3] // p
    grid = None if h == w else (h, w)
    assert torch.equal(fastssl.unpatchify(patches, p, grid), images)
    assert torch.equal(reference.unpatchify(patches, p, h, w), images)


# -- BEiT block masks -----------------------------------------------------------------------------------------

BLOCK_CASES = [  # (grid, num_masked, min_block)
    ((14, 14), 75, 16),
    ((14, 14), 118, 16),
    ((8, 8), 40, 4),
    ((5, 7), 30, 16),  # hard to fill with blocks of 16: the top-up does most of the work
    ((14, 14), 0, 16),
    ((14, 14), 196, 16),
    ((1, 1), 1, 1),
]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=str)
def test_block_masks_have_exact_counts(case):
    grid, n, min_block = case
    mask = fastssl.block_masking(64, grid, n, min_block=min_block, generator=_gen(0))
    assert mask.dtype == torch.bool and mask.shape == (64, *grid)
    assert torch.equal(mask.sum((1, 2)), torch.full((64,), n))


@pytest.mark.parametrize("case", BLOCK_CASES[:4], ids=str)
def test_blocks_before_top_up(case):
    """Before the top-up the mask is exactly the union of the kept rectangles, each >= min_block patches,
    inside the grid; the top-up only adds patches."""
    (h, w), n, min_block = case
    b = 48
    lo, hi = 0.3, 1 / 0.3
    mask, blocks = masking._place_blocks(b, h, w, n, min_block, lo, hi, _gen(5), torch.device("cpu"))
    union = torch.zeros(b, h, w, dtype=torch.bool)
    kept = blocks[..., 2] > 0  # [rounds, B]
    assert kept.any(0).float().mean() > 0.9  # nearly every sample got blocks
    for r, s in kept.nonzero().tolist():
        top, left, bh, bw = blocks[r, s].tolist()
        assert bh * bw >= min_block and top >= 0 and left >= 0 and top + bh <= h and left + bw <= w
        assert lo * 0.5 <= bh / bw <= hi * 2  # the aspect ratio, up to rounding of small sides
        union[s, top : top + bh, left : left + bw] = True
    assert torch.equal(mask, union)
    assert (mask.sum((1, 2)) <= n).all()
    final = masking._top_up(mask, n, _gen(6))
    assert (final | mask).equal(final) and torch.equal(final.sum((1, 2)), torch.full((b,), n))


def test_block_masks_cover_like_beit():
    """Before the top-up our batched rounds place about as much of the budget as BEiT's own loop."""
    gen = reference.BeitMaskingGenerator((14, 14), 75, 16, seed=0)
    beit_masks = torch.stack([gen() for _ in range(100)])
    mask, _ = masking._place_blocks(160, 14, 14, 75, 16, 0.3, 1 / 0.3, _gen(1), torch.device("cpu"))
    ours, beit = mask.sum((1, 2)).float(), beit_masks.sum((1, 2)).float()
    assert ours.mean() > beit.mean() - 2.0, (ours.mean(), beit.mean())
    # and the masks are as blocky: a masked patch's neighbours are masked about as often
    assert abs(_masked_neighbour_fraction(mask) - _masked_neighbour_fraction(beit_masks)) < 0.05


def test_top_up_grows_blocks():
    mask, _ = masking._place_blocks(128, 14, 14, 75, 16, 0.3, 1 / 0.3, _gen(2), torch.device("cpu"))
    final = masking._top_up(mask, 75, _gen(3))
    added = final & ~mask
    assert added.sum() > 0
    m = torch.nn.functional.pad(mask.float(), (1, 1, 1, 1))
    touching = (m[:, :-2, 1:-1] + m[:, 2:, 1:-1] + m[:, 1:-1, :-2] + m[:, 1:-1, 2:]) > 0
    assert (touching[added]).float().mean() > 0.9  # added next to existing blocks, not scattered
    random = torch.rand(128, 196).argsort(1).argsort(1).view(128, 14, 14) < 75
    assert _masked_neighbour_fraction(final) > _masked_neighbour_fraction(random) + 0.15


def test_block_masks_reproducible():
    a = fastssl.block_masking(8, generator=_gen(11))
    assert torch.equal(a, fastssl.block_masking(8, generator=_gen(11)))
    assert not torch.equal(a, fastssl.block_masking(8, generator=_gen(12)))
    assert not torch.equal(a[0], a[1])


# -- ColorMAE noise masks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("color", masking.COLORS)
@pytest.mark.parametrize("grid, ratio", [((14, 14), 0.75), ((7, 9), 0.5), ((14, 14), 0.0), ((3, 3), 0.9)])
def test_noise_masks_have_exact_counts(color, grid, ratio):
    mask = fastssl.noise_masking(32, grid, ratio, color=color, generator=_gen(0))
    assert mask.dtype == torch.bool and mask.shape == (32, *grid)
    n = int(grid[0] * grid[1] * ratio)
    assert torch.equal(mask.sum((1, 2)), torch.full((32,), n))


def _band_power(field: torch.Tensor) -> torch.Tensor:
    """Mean power per frequency bin in the bands ρ < 0.1, 0.1 <= ρ < 0.25, ρ >= 0.25 (cycles per patch)."""
    _, h, w = field.shape
    power = (torch.fft.fft2(field).abs() ** 2).mean(0)
    rho = torch.sqrt(torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.fftfreq(w) ** 2)
    bands = [(rho > 0) & (rho < 0.1), (rho >= 0.1) & (rho < 0.25), rho >= 0.25]
    return torch.stack([power[band].mean() for band in bands])


def test_noise_spectrum_follows_its_colour():
    white = _band_power(torch.randn(256, 28, 28))
    fields = {c: masking.colored_noise(256, (14, 14), c, generator=_gen(1), crop=False) for c in masking.COLORS}
    p = {c: _band_power(f) / white for c, f in fields.items()}
    low, mid, high = 0, 1, 2
    assert p["red"][low] > 3 * p["red"][mid] and p["red"][mid] > 3 * p["red"][high]  # low-pass
    assert p["blue"][high] > 2 * p["blue"][mid] and p["blue"][mid] > 2 * p["blue"][low]  # high-pass
    assert p["green"][mid] > 2 * p["green"][low] and p["green"][mid] > 2 * p["green"][high]  # band-pass
    assert p["purple"][mid] < 0.7 * p["purple"][low] and p["purple"][mid] < 0.7 * p["purple"][high]  # band-stop


def test_noise_masks_spatial_structure():
    """Red masks are smooth (masked patches sit among masked ones), blue ones spread out, green between."""
    masks = {c: fastssl.noise_masking(128, color=c, generator=_gen(2)) for c in masking.COLORS}
    frac = {c: _masked_neighbour_fraction(m) for c, m in masks.items()}
    random = torch.rand(128, 196).argsort(1).argsort(1).view(128, 14, 14) < 147
    white = _masked_neighbour_fraction(random)
    assert frac["red"] > frac["green"] > frac["blue"], frac
    assert frac["red"] > white + 0.05 and frac["blue"] < white - 0.02, (frac, white)


def test_noise_masks_uniform_over_positions():
    """The random crop leaves no position favoured: each is masked with frequency ≈ mask_ratio."""
    mask = fastssl.noise_masking(2000, (6, 6), 0.5, color="red", generator=_gen(3))
    freq = mask.float().mean(0)
    assert (freq - 0.5).abs().max() < 0.06, freq


def test_noise_masks_reproducible():
    a = fastssl.noise_masking(8, color="blue", generator=_gen(11))
    assert torch.equal(a, fastssl.noise_masking(8, color="blue", generator=_gen(11)))
    assert not torch.equal(a, fastssl.noise_masking(8, color="blue", generator=_gen(12)))
    assert not torch.equal(a[0], a[1])


# -- bad input -------------------------------------------------------------------------------------------------

X = torch.randn(2, 5, 3)
IDS = torch.arange(5).expand(2, 5)


@pytest.mark.parametrize(
    "fn, args, kwargs, error, match",
    [
        (fastssl.random_masking, (X, 1.0), {}, ValueError, "mask_ratio"),
        (fastssl.random_masking, (X, -0.1), {}, ValueError, "mask_ratio"),
        (fastssl.random_masking, (X, float("nan")), {}, ValueError, "mask_ratio"),
        (fastssl.random_masking, (X, "0.5"), {}, TypeError, "mask_ratio"),
        (fastssl.random_masking, (X, True), {}, TypeError, "mask_ratio"),
        (fastssl.random_masking, (X[0],), {}, ValueError, "x"),
        (fastssl.random_masking, (X.long(),), {}, TypeError, "x"),
        (fastssl.random_masking, (X[:0],), {}, ValueError, "empty"),
        (fastssl.random_masking, (X,), {"num_prefix_tokens": 5}, ValueError, "num_prefix_tokens"),
        (fastssl.random_masking, (X,), {"num_prefix_tokens": -1}, ValueError, "num_prefix_tokens"),
        (fastssl.random_masking, (X,), {"generator": 3}, TypeError, "generator"),
        (fastssl.random_masking, (X,), {"impl": "fast"}, ValueError, "impl"),
        (fastssl.unshuffle, (X, IDS[:, :4], torch.zeros(3)), {}, ValueError, "x_visible"),
        (fastssl.unshuffle, (X, IDS.float(), torch.zeros(3)), {}, TypeError, "ids_restore"),
        (fastssl.unshuffle, (X, IDS[:1], torch.zeros(3)), {}, ValueError, "ids_restore"),
        (fastssl.unshuffle, (X, IDS, torch.zeros(4)), {}, ValueError, "mask_token"),
        (fastssl.unshuffle, (X, IDS, torch.zeros(3, dtype=torch.long)), {}, TypeError, "mask_token"),
        (fastssl.unshuffle, (X, IDS, torch.zeros(3)), {"num_prefix_tokens": 6}, ValueError, "x_visible"),
        (fastssl.masked_mse_loss, (X, X, torch.ones(2, 4)), {}, ValueError, "mask"),
        (fastssl.masked_mse_loss, (X, X[:, :4], torch.ones(2, 5)), {}, ValueError, "target"),
        (fastssl.masked_mse_loss, (X, X, torch.zeros(2, 5)), {}, ValueError, "mask"),
        (fastssl.masked_mse_loss, (X, X, -torch.ones(2, 5)), {}, ValueError, "mask"),
        (fastssl.masked_mse_loss, (X, X, torch.full((2, 5), float("inf"))), {}, ValueError, "mask"),
        (fastssl.masked_mse_loss, (X, X, torch.tensor([[float("inf")] + [1.0] * 4] * 2)), {}, ValueError, "mask"),
        (fastssl.masked_mse_loss, (X, X, torch.tensor([[float("nan")] + [1.0] * 4] * 2)), {}, ValueError, "mask"),
        (fastssl.masked_mse_loss, (X, X, torch.full((2, 5), 3e38)), {}, ValueError, "mask"),
        (fastssl.masked_mse_loss, (X, X, torch.ones(2, 5)), {"norm_pix": 1}, TypeError, "norm_pix"),
        (fastssl.masked_mse_loss, (X[..., :1], X[..., :1], torch.ones(2, 5)), {"norm_pix": True}, ValueError, "P"),
        (fastssl.masked_mse_loss, (X[0], X[0], torch.ones(5)), {}, ValueError, "pred"),
        (fastssl.masked_mse_loss, (X, X, [[1.0] * 5] * 2), {}, TypeError, "mask"),
        (fastssl.patchify, (torch.zeros(1, 3, 30, 32), 16), {}, ValueError, "patch_size"),
        (fastssl.patchify, (torch.zeros(3, 32, 32), 16), {}, ValueError, "images"),
        (fastssl.patchify, (torch.zeros(1, 3, 32, 32), 0), {}, ValueError, "patch_size"),
        (fastssl.unpatchify, (torch.zeros(1, 6, 48), 4), {}, ValueError, "grid"),
        (fastssl.unpatchify, (torch.zeros(1, 4, 50), 4), {}, ValueError, "patch_size"),
        (fastssl.unpatchify, (torch.zeros(1, 6, 48), 4, (2, 2)), {}, ValueError, "grid"),
        (fastssl.block_masking, (4, (14, 14), 197), {}, ValueError, "num_masked"),
        (fastssl.block_masking, (0,), {}, ValueError, "batch_size"),
        (fastssl.block_masking, (4, (0, 14)), {}, ValueError, "grid"),
        (fastssl.block_masking, (4, 14), {}, ValueError, "grid"),
        (fastssl.block_masking, (4,), {"min_block": 0}, ValueError, "min_block"),
        (fastssl.block_masking, (4,), {"aspect_ratio": (2.0, 1.0)}, ValueError, "aspect_ratio"),
        (fastssl.block_masking, (4,), {"aspect_ratio": (0.0, 1.0)}, ValueError, "aspect_ratio"),
        (fastssl.block_masking, (4,), {"generator": torch.Generator(), "device": "meta"}, ValueError, "generator"),
        (fastssl.noise_masking, (4,), {"color": "pink"}, ValueError, "color"),
        (fastssl.noise_masking, (4, (14, 14), 1.0), {}, ValueError, "mask_ratio"),
        (fastssl.noise_masking, (4.0,), {}, TypeError, "batch_size"),
    ],
)
def test_bad_input(fn, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


# -- GPU -------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_gpu_against_reference(dtype, norm_pix):
    b, l, d, p = 256, 196, 768, 1
    x = torch.randn(b, p + l, d, device="cuda", dtype=dtype)
    token = torch.randn(d, device="cuda", dtype=dtype)
    weights = torch.randn(b, p + l, d, device="cuda")
    gen = lambda: _gen(1, "cuda")
    ours = fastssl.random_masking(x, generator=gen(), num_prefix_tokens=p)
    ref = fastssl.random_masking(x, generator=gen(), num_prefix_tokens=p, impl="reference")
    assert all(torch.equal(a, r) for a, r in zip(ours, ref, strict=True))
    out, (gx, gt) = _masking_grads("auto", x, token, weights, p)
    ref_out, (ref_gx, ref_gt) = _masking_grads("reference", x, token, weights, p)
    assert torch.equal(out, ref_out) and torch.equal(gx, ref_gx)
    assert_verbose_allclose(gt.float(), ref_gt.float(), rtol=2e-2, atol=1e-1, name="mask token grad")
    pred, target, mask = (t.cuda() for t in _loss_inputs(b, l, 768, dtype))
    loss, grad = _loss_and_grad(pred, target, mask, "auto", norm_pix)
    ref32 = _loss_and_grad(pred.float(), target.float(), mask, "reference", norm_pix)
    lowp = _loss_and_grad(pred, target, mask, "reference", norm_pix)
    assert_lowprec_close(loss, ref32[0], lowp[0].float(), atol=1e-5, name="loss")
    assert_lowprec_close(grad.float(), ref32[1], lowp[1].float(), atol=1e-7, name="grad")


@pytest.mark.gpu
def test_gpu_masks_exact_counts():
    gen = _gen(0, "cuda")
    blocks = fastssl.block_masking(256, generator=gen, device="cuda")
    assert blocks.is_cuda and torch.equal(blocks.sum((1, 2)).cpu(), torch.full((256,), 75))
    for color in masking.COLORS:
        noise = fastssl.noise_masking(256, color=color, generator=gen)
        assert noise.is_cuda and torch.equal(noise.sum((1, 2)).cpu(), torch.full((256,), 147))
