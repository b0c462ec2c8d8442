"""DINO, iBOT, SwAV and KoLeo: the fused last layer + loss against the eager references (written from
main_dino.py, DINOv2 and main_swav.py), against lightly's losses (a peer), and known values."""

from __future__ import annotations

import os

import _peers
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _assertions import assert_lowprec_close, assert_verbose_allclose
from _dist import free_port

import fastssl
from fastssl.reference import dino as reference


def _inputs(v, g, b, k, d, dtype=torch.float64, scale=3.0):
    student = torch.randn(v * b, d, dtype=dtype)
    teacher = torch.randn(g * b, d, dtype=dtype)
    weight = scale * torch.randn(k, d, dtype=dtype) / d**0.5
    teacher_weight = weight + 0.1 * torch.randn(k, d, dtype=dtype)
    center = 0.3 * torch.randn(k, dtype=dtype)
    return student, teacher, weight, teacher_weight, center


def _loss_and_grads(fn, student, weight, *args, **kw):
    s, w = student.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(s, w, *args, **kw)
    return (loss, *torch.autograd.grad(loss, [s, w]))


def _dino(student, weight, teacher, teacher_weight, center, **kw):
    return fastssl.dino_loss(student, teacher, weight, teacher_weight, center, **kw)


def _assert_same(ours, ref, names=("loss", "grad student", "grad weight"), rtol=1e-9, atol=1e-12):
    for a, b, name in zip(ours, ref, names, strict=True):
        assert_verbose_allclose(a, b, rtol=rtol, atol=atol, name=name)


CASES = [  # (V, G, B, K, d)
    (2, 2, 5, 7, 64),
    (3, 2, 3, 1000, 1),
    (8, 2, 5, 1000, 64),
    (3, 1, 7, 7, 1),
    (8, 2, 1, 1, 64),
    (12, 2, 3, 1000, 256),
    (3, 2, 2, 65536, 16),
]


@pytest.mark.parametrize("centering", ["center", "sinkhorn", "none"])
@pytest.mark.parametrize(("v", "g", "b", "k", "d"), CASES)
def test_dino_loss_matches_reference(v, g, b, k, d, centering):
    student, teacher, weight, teacher_weight, center = _inputs(v, g, b, k, d)
    kw = dict(n_global_crops=g, centering=centering, teacher_temperature=0.07 if k == 7 else 0.04)
    args = (teacher, teacher_weight, center)
    ours = _loss_and_grads(_dino, student, weight, *args, impl="cpp", **kw)
    ref = _loss_and_grads(_dino, student, weight, *args, impl="reference", **kw)
    _assert_same(ours, ref)
    assert ours[0].dtype == torch.float64


@pytest.mark.parametrize("centering", ["center", "sinkhorn", "none"])
@pytest.mark.parametrize(("v", "g", "b", "k", "d"), [(3, 2, 5, 70, 20), (2, 1, 3, 7, 100)])
def test_dino_loss_triton_interpreted(v, g, b, k, d, centering):
    """The Triton kernels (interpreted on CPU tensors): several K blocks, D in one and in two chunks."""
    student, teacher, weight, teacher_weight, center = _inputs(v, g, b, k, d)
    kw = dict(n_global_crops=g, centering=centering)
    args = (teacher, teacher_weight, center)
    ours = _loss_and_grads(_dino, student, weight, *args, impl="triton", **kw)
    _assert_same(ours, _loss_and_grads(_dino, student, weight, *args, impl="reference", **kw))


def test_dino_loss_known_values():
    """K = 1: every softmax is 1, the loss 0; identical rows everywhere: log K."""
    student, teacher, weight, teacher_weight, center = _inputs(3, 2, 4, 1, 8)
    assert float(fastssl.dino_loss(student, teacher, weight, teacher_weight, center, impl="cpp")) == 0.0
    w = torch.zeros(50, 8, dtype=torch.float64)
    loss = fastssl.dino_loss(student, teacher, w, w, None, centering="sinkhorn", impl="cpp")
    assert abs(float(loss) - np.log(50)) < 1e-12


def test_dino_loss_fp32_and_bf16():
    student, teacher, weight, teacher_weight, center = _inputs(4, 2, 5, 300, 32, dtype=torch.float32)
    ref = fastssl.dino_loss(*(x.double() for x in (student, teacher, weight, teacher_weight, center)), impl="cpp")
    ours = fastssl.dino_loss(student, teacher, weight, teacher_weight, center, impl="cpp")
    assert ours.dtype == torch.float32 and abs(float(ours) - float(ref)) < 1e-4 * float(ref)
    bf = fastssl.dino_loss(*(x.bfloat16() for x in (student, teacher, weight, teacher_weight)), center, impl="cpp")
    assert bf.dtype == torch.float32 and abs(float(bf) - float(ref)) < 0.05 * float(ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("centering", ["center", "none"])
def test_dino_loss_low_precision(dtype, centering):
    """16-bit inputs: within twice the error of the eager reference run in that dtype (flash-attention's
    criterion), both against the reference in fp32 on the same rounded inputs; loss and gradients."""
    student, teacher, weight, teacher_weight, center = (
        x.to(dtype) for x in _inputs(4, 2, 5, 300, 32, dtype=torch.float32, scale=1.0)
    )
    kw = dict(centering=centering, teacher_temperature=0.07)
    args = (teacher, teacher_weight, center)
    ours = _loss_and_grads(_dino, student, weight, *args, impl="cpp", **kw)
    lowprec = _loss_and_grads(_dino, student, weight, *args, impl="reference", **kw)
    up = [x.float() for x in (student, weight, *args)]
    ref = _loss_and_grads(_dino, up[0], up[1], *up[2:], impl="reference", **kw)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[2].dtype == dtype
    names, atols = ("loss", "grad student", "grad weight"), (1e-3, 1e-5, 1e-5)
    for a, r, lp, name, atol in zip(ours, ref, lowprec, names, atols, strict=True):
        assert_lowprec_close(a, r, lp, atol=atol, name=name)


@pytest.mark.parametrize("centering", ["center", "sinkhorn"])
def test_dino_gradcheck(centering):
    student, teacher, weight, teacher_weight, center = _inputs(3, 2, 3, 11, 4)
    s, w = student.requires_grad_(), weight.requires_grad_()

    def fn(s, w):
        return fastssl.dino_loss(s, teacher, w, teacher_weight, center, centering=centering, impl="cpp")

    assert torch.autograd.gradcheck(fn, (s, w))


def test_dino_opcheck():
    from fastssl.ops.dino import dino_loss_stats

    student, teacher, weight, teacher_weight, _ = _inputs(3, 2, 3, 11, 4)
    a = torch.randn(2, 11, dtype=torch.float64)
    beta = torch.randn(6, dtype=torch.float64)
    args = (student.requires_grad_(), weight.requires_grad_(), teacher, teacher_weight, a, beta, 10.0, 25.0, "cpp")
    torch.library.opcheck(dino_loss_stats, args)
    no_beta = beta.new_empty(0)  # the softmax's β found in the same pass
    torch.library.opcheck(dino_loss_stats, (*args[:5], no_beta, *args[6:]))


def _reference_sinkhorn(t, tau, iterations):
    """DINOv2's loop with a NumPy matrix, the check behind "one global shift"."""
    q = np.exp(t.numpy() / tau).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(1, keepdims=True) * k
        q /= q.sum(0, keepdims=True) * b
    return torch.from_numpy((q * b).T)


@pytest.mark.parametrize("iterations", [0, 1, 3])
@pytest.mark.parametrize(("b", "k"), [(9, 40), (600, 3000)])
def test_sinkhorn_scalings_equal_dinov2(b, k, iterations):
    """One process, C++: one pass per iteration (0 iterations: the sums' path); K = 3000 with 1200 rows
    takes several tiles."""
    from fastssl.ops.dino import teacher_scalings

    _, teacher, _, teacher_weight, _ = _inputs(2, 2, b, k, 16, scale=1.0)
    t = teacher @ teacher_weight.t()
    a, beta = teacher_scalings(teacher, teacher_weight, None, 0.05, "sinkhorn", iterations, "cpp")
    q = torch.exp(t / 0.05 + a + beta[:, None])
    expected = _reference_sinkhorn(t, 0.05, iterations)
    assert_verbose_allclose(q, expected, rtol=1e-10, atol=1e-14, name="sinkhorn q")
    expected = reference.sinkhorn_knopp(t, 0.05, iterations)
    assert_verbose_allclose(q, expected, rtol=1e-10, atol=1e-14, name="vs reference")


def test_dino_module_center_update():
    """DINOLoss's center: the EMA of mean(teacher logits), which the module takes as mean(teacher)·Wᵀ."""
    student, teacher, weight, teacher_weight, _ = _inputs(4, 2, 5, 30, 8)
    module = fastssl.DINOLoss(30, center_momentum=0.8).double()
    center = torch.zeros(30, dtype=torch.float64)
    for step in range(3):
        teacher_step = teacher + step
        loss = module(student, teacher_step, weight, teacher_weight, teacher_temperature=0.05)
        ref = reference.dino_loss(student, teacher_step, weight, teacher_weight, center, teacher_temperature=0.05)
        assert_verbose_allclose(loss, ref, rtol=1e-10, atol=1e-12, name=f"loss, step {step}")
        center = 0.8 * center + 0.2 * (teacher_step @ teacher_weight.t()).mean(0)
        assert_verbose_allclose(module.center, center, rtol=1e-10, atol=1e-12, name=f"center, step {step}")


def test_teacher_temperature_schedule_is_dinos():
    ours = fastssl.teacher_temperature_schedule(0.04, 0.07, 30, 100)
    ref = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))
    assert len(ours) == 100 and np.allclose(ours, ref, rtol=0, atol=1e-15)


# -- lightly, a peer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lightly_loss():
    try:
        return _peers.lightly_loss()
    except ImportError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize(("v", "b", "k"), [(2, 5, 7), (8, 3, 1000)])
def test_dino_loss_matches_lightly(lightly_loss, v, b, k):
    student, teacher, weight, teacher_weight, center = _inputs(v, 2, b, k, 16)
    # lightly holds τ_t as an fp32 tensor: 1/16 is exact there
    peer = lightly_loss.DINOLoss(k, teacher_temp=0.0625, student_temp=0.1, center_momentum=0.9).double()
    peer.center.copy_(center.view(1, 1, k))
    module = fastssl.DINOLoss(k, teacher_temperature=0.0625).double()
    module.center.copy_(center)

    def theirs(s, w):
        return peer(list((teacher @ teacher_weight.t()).chunk(2)), list((s @ w.t()).chunk(v)))

    def ours(s, w):
        return module(s, teacher, w, teacher_weight)

    _assert_same(_loss_and_grads(ours, student, weight), _loss_and_grads(theirs, student, weight))
    assert_verbose_allclose(module.center, peer.center.view(k), rtol=1e-10, atol=1e-12, name="center")


# -- iBOT -------------------------------------------------------------------------------------------


def _masked_tokens(n_images=3, h=4, w=5, m=13, k=40, d=16):
    mask = torch.zeros(n_images, h, w, dtype=torch.bool)
    mask.view(-1)[torch.randperm(n_images * h * w)[:m]] = True
    token_weights = (1.0 / mask.sum((1, 2)).clamp(min=1)).view(n_images, 1, 1).expand_as(mask)[mask]
    student, teacher, weight, teacher_weight, center = _inputs(1, 1, m, k, d)
    return mask, token_weights.double(), student, teacher, weight, teacher_weight, center


def _ibot(student, weight, teacher, teacher_weight, center, **kw):
    return fastssl.ibot_loss(student, teacher, weight, teacher_weight, center, **kw)


@pytest.mark.parametrize("centering", ["center", "sinkhorn", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_ibot_loss_matches_reference(centering, weighted):
    _, token_weights, student, teacher, weight, teacher_weight, center = _masked_tokens()
    kw = dict(centering=centering, token_weights=token_weights if weighted else None, n_images=3 if weighted else None)
    args = (teacher, teacher_weight, center)
    ours = _loss_and_grads(_ibot, student, weight, *args, impl="cpp", **kw)
    _assert_same(ours, _loss_and_grads(_ibot, student, weight, *args, impl="reference", **kw))


@pytest.mark.parametrize("centering", ["center", "sinkhorn"])
def test_ibot_loss_triton_interpreted(centering):
    _, token_weights, student, teacher, weight, teacher_weight, center = _masked_tokens(m=9, k=70, d=20)
    kw = dict(centering=centering, token_weights=token_weights, n_images=3)
    args = (teacher, teacher_weight, center)
    ours = _loss_and_grads(_ibot, student, weight, *args, impl="triton", **kw)
    _assert_same(ours, _loss_and_grads(_ibot, student, weight, *args, impl="reference", **kw))


def test_ibot_loss_matches_lightly(lightly_loss):
    mask, token_weights, student, teacher, weight, teacher_weight, _ = _masked_tokens()
    peer = lightly_loss.IBOTPatchLoss(40, teacher_temp=0.0625, center_momentum=0.9).double()
    module = fastssl.IBOTLoss(40, teacher_temperature=0.0625).double()
    for step in range(2):  # the second step with the updated centers
        t = teacher + step

        def theirs(s, w, t=t):
            return peer(t @ teacher_weight.t(), s @ w.t(), mask)

        def ours(s, w, t=t):
            return module(s, t, w, teacher_weight, token_weights=token_weights, n_images=3)

        _assert_same(_loss_and_grads(ours, student, weight), _loss_and_grads(theirs, student, weight))


# -- SwAV -------------------------------------------------------------------------------------------


def _swav_inputs(v=6, b=4, k=30, d=16, q=9, g=2):
    z = F.normalize(torch.randn(v * b, d, dtype=torch.float64), dim=1)
    prototypes = F.normalize(torch.randn(k, d, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(g, q, d, dtype=torch.float64), dim=-1)
    return z, prototypes, queue


def _swav(z, prototypes, **kw):
    return fastssl.swav_loss(z, prototypes, **kw)


@pytest.mark.parametrize("queue_kind", [None, "shared", "per crop"])
@pytest.mark.parametrize(("v", "g"), [(6, 2), (3, 1)])
def test_swav_loss_matches_reference(v, g, queue_kind):
    z, prototypes, queue = _swav_inputs(v=v, g=g)
    queue = {None: None, "shared": queue[0], "per crop": queue}[queue_kind]
    kw = dict(n_crops=v, n_crops_for_assign=g, queue=queue)
    ours = _loss_and_grads(_swav, z, prototypes, impl="cpp", **kw)
    _assert_same(ours, _loss_and_grads(_swav, z, prototypes, impl="reference", **kw))


def test_swav_loss_triton_interpreted():
    z, prototypes, queue = _swav_inputs(v=3, b=3, k=70, d=20, q=5)
    kw = dict(n_crops=3, queue=queue)
    ours = _loss_and_grads(_swav, z, prototypes, impl="triton", **kw)
    _assert_same(ours, _loss_and_grads(_swav, z, prototypes, impl="reference", **kw))


def test_swav_loss_matches_lightly(lightly_loss):
    z, prototypes, queue = _swav_inputs()

    def theirs(z, p):
        out = (z @ p.t()).chunk(6)
        return lightly_loss.SwaVLoss()(list(out[:2]), list(out[2:]), [queue[0] @ p.t(), queue[1] @ p.t()])[0]

    ours = _loss_and_grads(_swav, z, prototypes, n_crops=6, queue=queue, impl="cpp")
    # lightly's queue logits carry gradient into the prototypes only through the Sinkhorn codes,
    # which are detached: the gradients agree
    _assert_same(ours, _loss_and_grads(theirs, z, prototypes))


# -- KoLeo ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d"), [(2, 1), (37, 8), (300, 3)])
def test_koleo_loss_matches_reference_and_lightly(lightly_loss, n, d):
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    ours, ref = fastssl.koleo_loss(x), reference.koleo_loss(x)
    assert_verbose_allclose(ours, ref, rtol=1e-12, atol=1e-12, name="loss")
    grad, grad_ref = (torch.autograd.grad(loss, x)[0] for loss in (ours, ref))
    assert_verbose_allclose(grad, grad_ref, rtol=1e-10, atol=1e-12, name="grad")
    assert_verbose_allclose(ours, lightly_loss.KoLeoLoss()(x), rtol=1e-12, atol=1e-12, name="lightly")


def test_koleo_loss_ties_and_duplicates():
    """A duplicate row is the nearest neighbour at distance eps·√D; ties go to the lowest index;
    the row itself is never its own neighbour, even when every other row is its antipode."""
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    eps = 1e-8
    expected = -(2 * np.log(eps * 2**0.5 + eps) + np.log(2**0.5 + eps)) / 3
    assert abs(float(fastssl.koleo_loss(x)) - expected) < 1e-9
    antipodes = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    # pairwise_distance adds eps to the difference: ‖(2 + eps, eps)‖ ≈ 2 + eps and ‖(−2 + eps, eps)‖ ≈ 2 − eps
    expected = -(np.log(2 + 2 * eps) + np.log(2)) / 2
    assert abs(float(fastssl.koleo_loss(antipodes)) - expected) < 1e-12


# -- torch.distributed (gloo): the Sinkhorn sums and the center are all-reduced ----------------------------


def _dino_from_q(s, q, v, g, tau_s=0.1):
    """main_dino.py's pair loop on logits s [V·B, K] against a given teacher distribution q [G·B, K]."""
    lsm = F.log_softmax(s / tau_s, dim=-1).chunk(v)
    terms = [-(qg * lsm[i]).sum(-1).mean() for j, qg in enumerate(q.chunk(g)) for i in range(v) if i != j]
    return sum(terms) / len(terms)


def _distributed_worker(rank, world, port, counts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same whole batch on every rank; rank r holds samples mine
        v, g, k, d = 3, 2, 20, 8
        total = sum(counts)
        student, teacher, weight, teacher_weight, center = _inputs(v, g, total, k, d, scale=1.0)
        start = sum(counts[:rank])
        mine = torch.arange(start, start + counts[rank])
        rows = lambda n_crops: torch.cat([c * total + mine for c in range(n_crops)])
        s_mine, t_mine = student[rows(v)], teacher[rows(g)]
        # Sinkhorn: this rank's rows of the assignment of the whole batch
        q_all = _reference_sinkhorn(teacher @ teacher_weight.t(), 0.04, 3)
        # DINOv2 counts B = local rows × world size: its reference holds for equal counts only
        for impl in ("cpp", "reference") if len(set(counts)) == 1 else ("cpp",):
            loss = fastssl.dino_loss(s_mine, t_mine, weight, teacher_weight, centering="sinkhorn", impl=impl)
            expected = _dino_from_q(s_mine @ weight.t(), q_all[rows(g)], v, g)
            assert_verbose_allclose(loss, expected, rtol=1e-10, atol=1e-12, name=f"rank {rank} sinkhorn loss {impl}")
        # the center: the EMA of the whole batch's mean teacher logit
        module = fastssl.DINOLoss(k, center_momentum=0.7).double()
        module.center.copy_(center)
        module(s_mine, t_mine, weight, teacher_weight)
        expected = 0.7 * center + 0.3 * (teacher @ teacher_weight.t()).mean(0)
        assert_verbose_allclose(module.center, expected, rtol=1e-10, atol=1e-12, name=f"rank {rank} center")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_sinkhorn_and_center_equal_one_process(world):
    """The Sinkhorn codes of each rank's rows and the updated center equal those of one process on
    the whole batch: ranks with equal numbers of samples (also the reference, DINOv2's all-reduce),
    and with different numbers."""
    counts = {2: [3, 3], 4: [3, 5, 1, 4]}[world]
    mp.spawn(_distributed_worker, args=(world, free_port(), counts), nprocs=world)
