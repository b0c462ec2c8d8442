"""The input catalogue: for every public function, bad and edge inputs and the outcome each must give.

A row is ``row(id, call, expect)``: ``id`` starts with the public name it exercises
(``"nt_xent/empty z1"``), ``call`` is a function of no arguments, and ``expect`` is one of

* ``raises(ValueError, "temperature")``: that exception, whose message matches the regex (the
  argument's name, at least);
* ``gives(check)``: it returns, and ``check(result)`` holds (``finite``, ``nonfinite``, ``close_to(...)``
  or any predicate);

Rows whose input could abort the process (a C++ or FAISS exception inside an OpenMP region, say)
go in ``SUBPROCESS_ROWS`` as source code, run in a fresh interpreter: an abort there is a failing
test, not a dead suite. Every public name of ``fastssl.__all__`` has at least one row
(``test_every_public_name_has_rows``). Each domain keeps its rows in its own section below.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import fastssl

ROWS: list = []
SUBPROCESS_ROWS: list = []


def row(id: str, call, expect) -> None:
    ROWS.append(pytest.param(call, expect, id=id))


def subprocess_row(id: str, code: str, expect_stdout: str) -> None:
    """`code` runs in a fresh interpreter and must exit 0 printing a line that matches `expect_stdout`."""
    SUBPROCESS_ROWS.append(pytest.param(textwrap.dedent(code), expect_stdout, id=id))


def raises(exc: type[BaseException], match: str):
    return ("raises", exc, match)


def gives(check):
    return ("gives", check)


def _tensors(result):
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _tensors(r)]
    if isinstance(result, dict):
        return [t for r in result.values() for t in _tensors(r)]
    return []


def finite(result) -> bool:
    """Every floating tensor in the result is finite."""
    return all(bool(torch.isfinite(t).all()) for t in _tensors(result) if t.is_floating_point())


def nonfinite(result) -> bool:
    """The (first) floating tensor of the result holds a NaN or an inf: a non-finite input was not
    turned into a finite number."""
    t = next(t for t in _tensors(result) if t.is_floating_point())
    return not bool(torch.isfinite(t).all())


def close_to(expected, rtol: float = 1e-5, atol: float = 1e-6):
    """The (first) tensor of the result equals `expected` (a tensor, or a function of no arguments
    computing it) within tolerance."""

    def check(result) -> bool:
        want = expected() if callable(expected) else expected
        got = _tensors(result)[0]
        return torch.allclose(got.double(), torch.as_tensor(want).double(), rtol=rtol, atol=atol)

    check.__name__ = "close_to"
    return check


# ---------------------------------------------------------------------------------------------
# contrastive: nt_xent, NTXentLoss, info_nce, InfoNCELoss


# ---------------------------------------------------------------------------------------------
# mixing: mochi_logits, mochi_loss, MemoryQueue


# ---------------------------------------------------------------------------------------------
# masking: random_masking, block_masking, noise_masking, unshuffle, masked_mse_loss, patchify, unpatchify

_MX = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
_MIDS = torch.arange(5).expand(2, 5)
_MTOKEN = torch.zeros(3)
_MONES = torch.ones(2, 5)
_META = torch.device("meta")


def _mgen():
    return torch.Generator().manual_seed(0)


def _mask_rm(x, ratio=0.5, **kw):
    """random_masking with a fixed seed."""
    return lambda: fastssl.random_masking(x, ratio, generator=_mgen(), **kw)


def _same_as_reference_rm(x, ratio=0.5, p=0):
    """random_masking equals the reference on the same input, output by output (pure data movement)."""

    def check(result) -> bool:
        ref = fastssl.random_masking(x.contiguous(), ratio, generator=_mgen(), num_prefix_tokens=p, impl="reference")
        return all(torch.equal(a, r) for a, r in zip(result, ref, strict=True))

    check.__name__ = "same_as_reference"
    return check


def _ones_mask(pred):
    return torch.ones(pred.shape[:2], dtype=pred.dtype if pred.is_floating_point() else torch.float32)


def _mse(pred, target=None, mask=None, **kw):
    target = pred + 1 if target is None else target
    mask = _ones_mask(pred) if mask is None else mask
    return lambda: fastssl.masked_mse_loss(pred, target, mask, **kw)


def _mse_ref(pred, target=None, mask=None, **kw):
    """The reference loss in fp64 (a function of no arguments, for close_to)."""
    target = pred + 1 if target is None else target
    mask = _ones_mask(pred) if mask is None else mask
    return lambda: fastssl.masked_mse_loss(pred.double(), target.double(), mask.double(), impl="reference", **kw)


def _counts(n):
    """Every mask of the batch has exactly n patches."""

    def check(mask) -> bool:
        return mask.dtype == torch.bool and bool((mask.sum((1, 2)) == n).all())

    check.__name__ = f"counts_{n}"
    return check


def _shape(*shape):
    def check(result) -> bool:
        return tuple(_tensors(result)[0].shape) == shape

    check.__name__ = f"shape_{shape}"
    return check


_NAN, _INF = float("nan"), float("inf")

# random_masking
row("random_masking/2-d x", _mask_rm(_MX[0]), raises(ValueError, "x"))
row("random_masking/4-d x", _mask_rm(_MX[None]), raises(ValueError, "x"))
row("random_masking/empty batch", _mask_rm(_MX[:0]), raises(ValueError, "x.*empty"))
row("random_masking/no tokens", _mask_rm(_MX[:, :0]), raises(ValueError, "num_prefix_tokens"))
row("random_masking/no features", _mask_rm(_MX[..., :0]), raises(ValueError, "x.*features"))
row("random_masking/one sample", _mask_rm(_MX[:1]), gives(_same_as_reference_rm(_MX[:1])))
row("random_masking/one token", _mask_rm(_MX[:, :1]), gives(_same_as_reference_rm(_MX[:, :1])))
for _dt in (torch.int64, torch.bool, torch.complex64):
    row(f"random_masking/{_dt} x", _mask_rm(_MX.to(_dt)), raises(TypeError, "x"))
for _dt in (torch.float16, torch.bfloat16, torch.float64):
    row(f"random_masking/{_dt} x", _mask_rm(_MX.to(_dt)), gives(_same_as_reference_rm(_MX.to(_dt))))
_xt = torch.randn(3, 5, 2).transpose(0, 1)  # [5, 3, 2], strided in every dim
row("random_masking/transposed x", _mask_rm(_xt), gives(_same_as_reference_rm(_xt)))
row("random_masking/strided x", _mask_rm(_MX[:, :, ::2]), gives(_same_as_reference_rm(_MX[:, :, ::2])))
_xe = torch.randn(2, 5, 1).expand(2, 5, 3)
row("random_masking/expanded x", _mask_rm(_xe), gives(_same_as_reference_rm(_xe)))
row("random_masking/NaN and inf in x", _mask_rm(torch.full((2, 5, 3), _NAN)), gives(nonfinite))
row("random_masking/1e30 x", _mask_rm(_MX * 1e30), gives(_same_as_reference_rm(_MX * 1e30)))
row("random_masking/1e-30 x", _mask_rm(_MX * 1e-30), gives(_same_as_reference_rm(_MX * 1e-30)))
row("random_masking/mask_ratio 0", _mask_rm(_MX, 0.0), gives(_shape(2, 5, 3)))
row("random_masking/mask_ratio tiny", _mask_rm(_MX, 1e-30), gives(_shape(2, 5, 3)))
row("random_masking/mask_ratio near 1", _mask_rm(_MX, 0.99), gives(_shape(2, 0, 3)))
for _v in (1.0, -0.1, _NAN, _INF, -_INF, 1e30):
    row(f"random_masking/mask_ratio {_v}", _mask_rm(_MX, _v), raises(ValueError, "mask_ratio"))
row("random_masking/mask_ratio tensor", _mask_rm(_MX, torch.tensor(0.5)), gives(_same_as_reference_rm(_MX)))
row("random_masking/mask_ratio tensor with grad", _mask_rm(_MX, torch.tensor(0.5, requires_grad=True)),
    gives(_same_as_reference_rm(_MX)))  # fmt: skip
row("random_masking/mask_ratio tensor NaN", _mask_rm(_MX, torch.tensor(_NAN)), raises(ValueError, "mask_ratio"))
row("random_masking/mask_ratio [2] tensor", _mask_rm(_MX, torch.tensor([0.5, 0.5])), raises(TypeError, "mask_ratio"))
row("random_masking/mask_ratio string", _mask_rm(_MX, "0.5"), raises(TypeError, "mask_ratio"))
row("random_masking/mask_ratio None", _mask_rm(_MX, None), raises(TypeError, "mask_ratio"))
row("random_masking/num_prefix_tokens 1", _mask_rm(_MX, num_prefix_tokens=1), gives(_same_as_reference_rm(_MX, p=1)))
row("random_masking/num_prefix_tokens all", _mask_rm(_MX, num_prefix_tokens=5), raises(ValueError, "num_prefix_tokens"))
row("random_masking/num_prefix_tokens -1", _mask_rm(_MX, num_prefix_tokens=-1), raises(ValueError, "num_prefix_tokens"))
row("random_masking/num_prefix_tokens huge", _mask_rm(_MX, num_prefix_tokens=2**63),
    raises(ValueError, "num_prefix_tokens"))  # fmt: skip
row("random_masking/num_prefix_tokens 1.0", _mask_rm(_MX, num_prefix_tokens=1.0),
    raises(TypeError, "num_prefix_tokens"))  # fmt: skip
row("random_masking/num_prefix_tokens tensor", _mask_rm(_MX, num_prefix_tokens=torch.tensor(1)),
    raises(TypeError, "num_prefix_tokens"))  # fmt: skip
row("random_masking/generator int", lambda: fastssl.random_masking(_MX, generator=0), raises(TypeError, "generator"))
row("random_masking/generator string", lambda: fastssl.random_masking(_MX, generator="cpu"),
    raises(TypeError, "generator"))  # fmt: skip
row("random_masking/cpu generator, meta x", lambda: fastssl.random_masking(_MX.to(_META), generator=_mgen()),
    raises(ValueError, "generator"))  # fmt: skip
row("random_masking/impl", lambda: fastssl.random_masking(_MX, impl="fast"), raises(ValueError, "impl"))

# unshuffle
def _un(v=_MX, ids=_MIDS, token=_MTOKEN, **kw):
    return lambda: fastssl.unshuffle(v, ids, token, **kw)


def _same_as_reference_un(v=_MX, ids=_MIDS, token=_MTOKEN, p=0):
    def check(result) -> bool:
        return torch.equal(result, fastssl.unshuffle(v.contiguous(), ids, token, num_prefix_tokens=p, impl="reference"))

    check.__name__ = "same_as_reference"
    return check


_ids_keep3 = torch.tensor([[0, 3, 1, 4, 2], [4, 3, 2, 1, 0]])  # keep 3 of 5
row("unshuffle/2-d x_visible", _un(_MX[0]), raises(ValueError, "x_visible"))
row("unshuffle/empty batch", _un(_MX[:0], _MIDS[:0]), raises(ValueError, "x_visible.*empty"))
row("unshuffle/no features", _un(_MX[..., :0], token=_MTOKEN[:0]), raises(ValueError, "x_visible.*features"))
row("unshuffle/one sample", _un(_MX[:1], _MIDS[:1]), gives(_same_as_reference_un(_MX[:1], _MIDS[:1])))
row("unshuffle/nothing visible", _un(_MX[:, :0], _ids_keep3), gives(_same_as_reference_un(_MX[:, :0], _ids_keep3)))
row("unshuffle/3 of 5 visible", _un(_MX[:, :3], _ids_keep3), gives(_same_as_reference_un(_MX[:, :3], _ids_keep3)))
row("unshuffle/more visible than L", _un(_MX, _MIDS[:, :4]), raises(ValueError, "x_visible"))
row("unshuffle/ids_restore batch", _un(ids=_MIDS[:1]), raises(ValueError, "ids_restore"))
row("unshuffle/1-d ids_restore", _un(ids=_MIDS[0]), raises(ValueError, "ids_restore"))
row("unshuffle/ids_restore on meta", _un(ids=_MIDS.to(_META)), raises(ValueError, "ids_restore"))
row("unshuffle/ids_restore list", _un(ids=_MIDS.tolist()), raises(TypeError, "ids_restore"))
for _dt in (torch.float32, torch.bool, torch.complex64):
    row(f"unshuffle/{_dt} ids_restore", _un(ids=_MIDS.to(_dt)), raises(TypeError, "ids_restore"))
row("unshuffle/int32 ids_restore", _un(ids=_MIDS.int()), gives(_same_as_reference_un()))
row("unshuffle/transposed ids_restore", _un(ids=_MIDS.T.contiguous().T), gives(_same_as_reference_un()))
row("unshuffle/out-of-range ids_restore", _un(_MX[:, :3], torch.tensor([[0, -7, 10**12, 2, 1]] * 2)),
    gives(lambda out: torch.equal(out[:, 1], torch.zeros(2, 3)) and torch.equal(out[:, 0], _MX[:, 0])))  # fmt: skip
for _dt in (torch.int64, torch.bool, torch.complex64):
    row(f"unshuffle/{_dt} x_visible", _un(_MX.to(_dt)), raises(TypeError, "x_visible"))
for _dt in (torch.float16, torch.bfloat16, torch.float64):
    row(f"unshuffle/{_dt} x_visible", _un(_MX.to(_dt)), gives(_same_as_reference_un(_MX.to(_dt))))
row("unshuffle/transposed x_visible", _un(_xt, torch.arange(3).expand(5, 3), token=torch.zeros(2)),
    gives(_same_as_reference_un(_xt, torch.arange(3).expand(5, 3), torch.zeros(2))))  # fmt: skip
row("unshuffle/expanded x_visible", _un(_xe), gives(_same_as_reference_un(_xe)))
row("unshuffle/NaN x_visible", _un(torch.full((2, 5, 3), _NAN)), gives(nonfinite))
row("unshuffle/inf mask_token", _un(_MX[:, :3], _ids_keep3, torch.full((3,), _INF)), gives(nonfinite))
row("unshuffle/1e30 x_visible", _un(_MX * 1e30), gives(_same_as_reference_un(_MX * 1e30)))
row("unshuffle/mask_token [1, 1, D]", _un(token=_MTOKEN.view(1, 1, 3)), gives(_same_as_reference_un()))
row("unshuffle/mask_token expanded", _un(token=torch.zeros(1).expand(3)), gives(_same_as_reference_un()))
row("unshuffle/mask_token fp64", _un(_MX[:, :3], _ids_keep3, torch.ones(3, dtype=torch.float64)),
    gives(lambda out: out.dtype == torch.float32 and torch.equal(out[0, 1], torch.ones(3))))  # fmt: skip
row("unshuffle/mask_token wrong D", _un(token=torch.zeros(4)), raises(ValueError, "mask_token"))
row("unshuffle/mask_token [D, 1]", _un(token=torch.zeros(3, 1)), raises(ValueError, "mask_token"))
row("unshuffle/mask_token int", _un(token=torch.zeros(3, dtype=torch.long)), raises(TypeError, "mask_token"))
row("unshuffle/mask_token complex", _un(token=torch.zeros(3, dtype=torch.complex64)), raises(TypeError, "mask_token"))
row("unshuffle/mask_token list", _un(token=[0.0] * 3), raises(TypeError, "mask_token"))
row("unshuffle/mask_token on meta", _un(token=_MTOKEN.to(_META)), raises(ValueError, "mask_token"))
row("unshuffle/num_prefix_tokens -1", _un(num_prefix_tokens=-1), raises(ValueError, "num_prefix_tokens"))
row("unshuffle/num_prefix_tokens too many", _un(num_prefix_tokens=6), raises(ValueError, "x_visible"))
row("unshuffle/num_prefix_tokens 1.0", _un(num_prefix_tokens=1.0), raises(TypeError, "num_prefix_tokens"))
row("unshuffle/impl", _un(impl="fast"), raises(ValueError, "impl"))

# masked_mse_loss
row("masked_mse_loss/2-d pred", _mse(_MX[0], mask=torch.ones(5)), raises(ValueError, "pred"))
row("masked_mse_loss/empty batch", _mse(_MX[:0], mask=_MONES[:0]), raises(ValueError, "pred.*empty"))
row("masked_mse_loss/no values", _mse(_MX[..., :0]), raises(ValueError, "pred.*features"))
row("masked_mse_loss/one sample, one patch", _mse(_MX[:1, :1], mask=_MONES[:1, :1]),
    gives(close_to(_mse_ref(_MX[:1, :1], mask=_MONES[:1, :1]))))  # fmt: skip
row("masked_mse_loss/target shape", _mse(_MX, _MX[:, :4]), raises(ValueError, "target"))
row("masked_mse_loss/target on meta", _mse(_MX, _MX.to(_META)), raises(ValueError, "target"))
row("masked_mse_loss/target fp64", _mse(_MX, _MX.double() + 1), gives(close_to(_mse_ref(_MX))))
row("masked_mse_loss/target int", _mse(_MX, _MX.long()), raises(TypeError, "target"))
row("masked_mse_loss/mask shape", _mse(_MX, mask=torch.ones(2, 4)), raises(ValueError, "mask"))
row("masked_mse_loss/mask 1-d", _mse(_MX, mask=torch.ones(10)), raises(ValueError, "mask"))
row("masked_mse_loss/mask on meta", _mse(_MX, mask=_MONES.to(_META)), raises(ValueError, "mask"))
row("masked_mse_loss/mask list", _mse(_MX, mask=_MONES.tolist()), raises(TypeError, "mask"))
row("masked_mse_loss/mask complex", _mse(_MX, mask=_MONES.to(torch.complex64)), raises(TypeError, "mask"))
for _dt in (torch.bool, torch.int32, torch.float16, torch.float64):
    row(f"masked_mse_loss/{_dt} mask", _mse(_MX, mask=_MONES.to(_dt)), gives(close_to(_mse_ref(_MX))))
for _dt in (torch.int64, torch.bool, torch.complex64):
    row(f"masked_mse_loss/{_dt} pred", _mse(_MX.to(_dt), _MX), raises(TypeError, "pred"))
for _dt in (torch.float16, torch.bfloat16):
    row(f"masked_mse_loss/{_dt} pred", _mse(_MX.to(_dt)), gives(close_to(_mse_ref(_MX.to(_dt)), rtol=1e-2)))
row("masked_mse_loss/fp64 pred", _mse(_MX.double()),
    gives(lambda r: r.dtype == torch.float64 and close_to(_mse_ref(_MX), 1e-12)(r)))  # fmt: skip
row("masked_mse_loss/transposed pred", _mse(_xt), gives(close_to(_mse_ref(_xt))))
row("masked_mse_loss/strided pred", _mse(_MX[:, :, ::2]), gives(close_to(_mse_ref(_MX[:, :, ::2]))))
row("masked_mse_loss/expanded pred and target", _mse(_xe, _xe.transpose(0, 1).transpose(0, 1) * 2),
    gives(close_to(_mse_ref(_xe, _xe * 2))))  # fmt: skip
row("masked_mse_loss/expanded mask", _mse(_MX, mask=torch.ones(1, 5).expand(2, 5)), gives(close_to(_mse_ref(_MX))))
_mbad = _MX.clone()
_mbad[1, 2, 0] = _NAN
row("masked_mse_loss/NaN in a masked patch", _mse(_mbad), gives(nonfinite))
row("masked_mse_loss/inf target in a masked patch", _mse(_MX, _mbad.nan_to_num(_INF)), gives(nonfinite))
_mhalf = torch.tensor([[1.0, 1, 0, 0, 0], [0, 1, 0, 1, 1]])
row("masked_mse_loss/NaN in an unmasked patch is not read", _mse(_mbad, _MX, _mhalf),
    gives(close_to(_mse_ref(_MX, _MX, _mhalf))))  # fmt: skip
row("masked_mse_loss/NaN target with norm_pix", _mse(_MX, _mbad, norm_pix=True), gives(nonfinite))
row("masked_mse_loss/1e20 fp32 pred overflows as MAE's code", _mse(_MX * 1e20, _MX), gives(lambda r: bool(r.isinf())))
for _scale in (1e30, 1e-30):
    row(f"masked_mse_loss/{_scale:g} fp64", _mse(_MX.double() * _scale, _MX.double() * _scale * 2),
        gives(close_to(_mse_ref(_MX.double() * _scale, _MX.double() * _scale * 2), rtol=1e-10, atol=0)))  # fmt: skip
row("masked_mse_loss/1e-15 fp32", _mse(_MX * 1e-15, _MX * 2e-15),
    gives(close_to(_mse_ref(_MX * 1e-15, _MX * 2e-15), atol=0)))  # fmt: skip
row("masked_mse_loss/1e15 target with norm_pix", _mse(_MX, _MX * 1e15, norm_pix=True),
    gives(close_to(_mse_ref(_MX, _MX * 1e15, norm_pix=True), rtol=1e-4)))  # fmt: skip
row("masked_mse_loss/constant target with norm_pix", _mse(_MX, torch.ones(2, 5, 3), norm_pix=True),
    gives(close_to(_mse_ref(_MX, torch.ones(2, 5, 3), norm_pix=True))))  # fmt: skip
row("masked_mse_loss/all-zero mask", _mse(_MX, mask=torch.zeros(2, 5)), raises(ValueError, "mask"))
row("masked_mse_loss/all-False mask", _mse(_MX, mask=torch.zeros(2, 5, dtype=torch.bool)), raises(ValueError, "mask"))
for _v in (-1.0, _NAN, _INF, 3e38):
    row(f"masked_mse_loss/mask weight {_v}", _mse(_MX, mask=torch.full((2, 5), _v)), raises(ValueError, "mask"))
_mw = _MONES.clone()
_mw[0, 0] = _INF
row("masked_mse_loss/one infinite weight", _mse(_MX, mask=_mw), raises(ValueError, "mask"))
_mw[0, 0] = -1e-30
row("masked_mse_loss/one tiny negative weight", _mse(_MX, mask=_mw), raises(ValueError, "mask"))
for _v in (1e-30, 1e30):  # the loss is a weighted mean: the scale of the weights drops out
    row(f"masked_mse_loss/mask weights {_v:g}", _mse(_MX, mask=torch.full((2, 5), _v)), gives(close_to(_mse_ref(_MX))))
row("masked_mse_loss/mask with grad is not differentiated", _mse(_MX, mask=torch.ones(2, 5, requires_grad=True)),
    gives(close_to(_mse_ref(_MX))))  # fmt: skip
row("masked_mse_loss/norm_pix 1", _mse(_MX, norm_pix=1), raises(TypeError, "norm_pix"))
row("masked_mse_loss/norm_pix None", _mse(_MX, norm_pix=None), raises(TypeError, "norm_pix"))
row("masked_mse_loss/norm_pix with P = 1", _mse(_MX[..., :1], norm_pix=True), raises(ValueError, "P"))
row("masked_mse_loss/impl", _mse(_MX, impl="fast"), raises(ValueError, "impl"))

# patchify, unpatchify
_IMG = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(1))


def _patchify_ref(images, p):
    return lambda result: torch.equal(result, fastssl.reference.masking.patchify(images, p))


row("patchify/3-d images", lambda: fastssl.patchify(_IMG[0], 4), raises(ValueError, "images"))
row("patchify/list images", lambda: fastssl.patchify(_IMG.tolist(), 4), raises(TypeError, "images"))
row("patchify/empty batch", lambda: fastssl.patchify(_IMG[:0], 4), gives(_shape(0, 6, 48)))
row("patchify/one image, one patch", lambda: fastssl.patchify(_IMG[:1, :, :4, :4], 4), gives(_shape(1, 1, 48)))
for _dt in (torch.int64, torch.bool, torch.complex64, torch.float16, torch.bfloat16, torch.float64):
    row(f"patchify/{_dt} images (a reshape)", lambda _dt=_dt: fastssl.patchify(_IMG.to(_dt), 4),
        gives(_patchify_ref(_IMG.to(_dt), 4)))  # fmt: skip
row("patchify/transposed images", lambda: fastssl.patchify(_IMG.transpose(2, 3), 4),
    gives(_patchify_ref(_IMG.transpose(2, 3), 4)))  # fmt: skip
row("patchify/NaN images", lambda: fastssl.patchify(_IMG * _NAN, 4), gives(nonfinite))
for _v in (0, -4):
    row(f"patchify/patch_size {_v}", lambda _v=_v: fastssl.patchify(_IMG, _v), raises(ValueError, "patch_size"))
for _v in (4.0, _NAN, True, torch.tensor(4)):
    row(f"patchify/patch_size {_v!r}", lambda _v=_v: fastssl.patchify(_IMG, _v), raises(TypeError, "patch_size"))
row("patchify/patch_size 3 does not divide", lambda: fastssl.patchify(_IMG, 3), raises(ValueError, "patch_size"))
row("patchify/patch_size huge", lambda: fastssl.patchify(_IMG, 2**62), raises(ValueError, "patch_size"))
_PATCHES = fastssl.reference.masking.patchify(_IMG, 4)  # [2, 6, 48], grid (2, 3)
row("unpatchify/round trip", lambda: fastssl.unpatchify(_PATCHES, 4, (2, 3)), gives(lambda r: torch.equal(r, _IMG)))
row("unpatchify/2-d patches", lambda: fastssl.unpatchify(_PATCHES[0], 4, (2, 3)), raises(ValueError, "patches"))
row("unpatchify/list patches", lambda: fastssl.unpatchify(_PATCHES.tolist(), 4), raises(TypeError, "patches"))
row("unpatchify/empty batch", lambda: fastssl.unpatchify(_PATCHES[:0], 4, (2, 3)), gives(_shape(0, 3, 8, 12)))
row("unpatchify/int patches", lambda: fastssl.unpatchify(_PATCHES.long(), 4, (2, 3)),
    gives(lambda r: torch.equal(r, _IMG.long())))  # fmt: skip
row("unpatchify/non-square without grid", lambda: fastssl.unpatchify(_PATCHES, 4), raises(ValueError, "grid"))
row("unpatchify/grid count", lambda: fastssl.unpatchify(_PATCHES, 4, (2, 2)), raises(ValueError, "grid"))
row("unpatchify/grid 0", lambda: fastssl.unpatchify(_PATCHES, 4, (0, 6)), raises(ValueError, "grid"))
row("unpatchify/grid -2", lambda: fastssl.unpatchify(_PATCHES, 4, (-2, -3)), raises(ValueError, "grid"))
row("unpatchify/grid float", lambda: fastssl.unpatchify(_PATCHES, 4, (2.0, 3.0)), raises(TypeError, "grid"))
row("unpatchify/grid triple", lambda: fastssl.unpatchify(_PATCHES, 4, (1, 2, 3)), raises(ValueError, "grid"))
row("unpatchify/patch_size 5", lambda: fastssl.unpatchify(_PATCHES, 5, (2, 3)), raises(ValueError, "patch_size"))
row("unpatchify/patch_size 0", lambda: fastssl.unpatchify(_PATCHES, 0, (2, 3)), raises(ValueError, "patch_size"))
row("unpatchify/patch_size 4.0", lambda: fastssl.unpatchify(_PATCHES, 4.0, (2, 3)), raises(TypeError, "patch_size"))

# block_masking, noise_masking
def _bm(*args, **kw):
    return lambda: fastssl.block_masking(*args, generator=kw.pop("generator", _mgen()), **kw)


def _nm(*args, **kw):
    return lambda: fastssl.noise_masking(*args, generator=kw.pop("generator", _mgen()), **kw)


row("block_masking/defaults", _bm(4), gives(_counts(75)))
row("block_masking/one sample", _bm(1), gives(_counts(75)))
for _name, _fn in (("block_masking", _bm), ("noise_masking", _nm)):
    for _v in (0, -1):
        row(f"{_name}/batch_size {_v}", _fn(_v), raises(ValueError, "batch_size"))
    for _v in (4.0, True, torch.tensor(4), None):
        row(f"{_name}/batch_size {_v!r}", _fn(_v), raises(TypeError, "batch_size"))
    for _g in ((0, 14), (-1, 14)):
        row(f"{_name}/grid {_g}", _fn(4, _g), raises(ValueError, "grid"))
    for _g in (14, (14,), (14, 14, 1), None):
        row(f"{_name}/grid {_g!r}", _fn(4, _g), raises(ValueError, "grid"))
    row(f"{_name}/grid floats", _fn(4, (14.0, 14.0)), raises(TypeError, "grid"))
    row(f"{_name}/generator int", lambda _name=_name: getattr(fastssl, _name)(4, generator=0),
        raises(TypeError, "generator"))  # fmt: skip
    row(f"{_name}/cpu generator, meta device", _fn(4, device="meta"), raises(ValueError, "generator"))
    row(f"{_name}/device list", _fn(4, device=["cpu"]), raises(TypeError, "device"))
    row(f"{_name}/device unknown", _fn(4, device="gpu"), raises(ValueError, "device"))
row("block_masking/1x1 grid", _bm(4, (1, 1), 1, min_block=1), gives(_counts(1)))
row("block_masking/num_masked 0", _bm(4, (14, 14), 0), gives(_counts(0)))
row("block_masking/num_masked all", _bm(4, (14, 14), 196), gives(_counts(196)))
row("block_masking/num_masked over the grid", _bm(4, (14, 14), 197), raises(ValueError, "num_masked"))
row("block_masking/num_masked -1", _bm(4, (14, 14), -1), raises(ValueError, "num_masked"))
row("block_masking/num_masked huge", _bm(4, (14, 14), 2**70), raises(ValueError, "num_masked"))
row("block_masking/num_masked 75.0", _bm(4, (14, 14), 75.0), raises(TypeError, "num_masked"))
row("block_masking/min_block 0", _bm(4, min_block=0), raises(ValueError, "min_block"))
row("block_masking/min_block -16", _bm(4, min_block=-16), raises(ValueError, "min_block"))
row("block_masking/min_block 16.0", _bm(4, min_block=16.0), raises(TypeError, "min_block"))
row("block_masking/min_block 1", _bm(4, min_block=1), gives(_counts(75)))
row("block_masking/min_block over the grid (top-up only)", _bm(4, min_block=10**6), gives(_counts(75)))
row("block_masking/min_block past int64", _bm(4, min_block=10**30), gives(_counts(75)))
row("block_masking/grid past int64", _bm(1, (10**30, 10**30), 1), raises(ValueError, "grid"))
if not torch.cuda.is_available():
    row("block_masking/cuda without CUDA", _bm(4, device="cuda", generator=None), raises(ValueError, "device"))
    row("noise_masking/cuda without CUDA", _nm(4, device="cuda", generator=None), raises(ValueError, "device"))
for _ar in ((0.0, 1.0), (-1.0, 2.0), (_NAN, 2.0), (0.3, _INF), (2.0, 1.0)):
    row(f"block_masking/aspect_ratio {_ar}", _bm(4, aspect_ratio=_ar), raises(ValueError, "aspect_ratio"))
for _ar in (0.3, None, (0.3,)):
    row(f"block_masking/aspect_ratio {_ar!r}", _bm(4, aspect_ratio=_ar), raises(ValueError, "aspect_ratio"))
row("block_masking/aspect_ratio strings", _bm(4, aspect_ratio=("a", "b")), raises(TypeError, "aspect_ratio"))
for _ar in ((1e-30, 1e-30), (1e30, 1e30), (1e-300, 1e300), (1.0, 1.0)):
    row(f"block_masking/aspect_ratio {_ar}", _bm(4, aspect_ratio=_ar), gives(_counts(75)))
row("block_masking/aspect_ratio tensors", _bm(4, aspect_ratio=(torch.tensor(0.3), torch.tensor(3.0))),
    gives(_counts(75)))  # fmt: skip
row("noise_masking/defaults", _nm(4), gives(_counts(147)))
row("noise_masking/one sample", _nm(1), gives(_counts(147)))
row("noise_masking/1x1 grid", _nm(4, (1, 1), 0.5), gives(_counts(0)))
row("noise_masking/mask_ratio 0", _nm(4, (14, 14), 0.0), gives(_counts(0)))
row("noise_masking/mask_ratio tiny", _nm(4, (14, 14), 1e-30), gives(_counts(0)))
row("noise_masking/mask_ratio 0.999", _nm(4, (14, 14), 0.999), gives(_counts(195)))
row("noise_masking/mask_ratio tensor", _nm(4, (14, 14), torch.tensor(0.5)), gives(_counts(98)))
for _v in (1.0, -0.5, _NAN, _INF, 1e30):
    row(f"noise_masking/mask_ratio {_v}", _nm(4, (14, 14), _v), raises(ValueError, "mask_ratio"))
row("noise_masking/mask_ratio string", _nm(4, (14, 14), "0.5"), raises(TypeError, "mask_ratio"))
for _c in ("pink", None, "RED"):
    row(f"noise_masking/color {_c!r}", _nm(4, color=_c), raises(ValueError, "color"))
for _c in ("red", "blue", "green", "purple"):
    row(f"noise_masking/color {_c}", _nm(4, color=_c), gives(_counts(147)))


# ---------------------------------------------------------------------------------------------
# adversarial: pgd_step_, random_start, pgd_attack, instance_attack, feature_attack, robust_accuracy


# ---------------------------------------------------------------------------------------------
# neighbors: knn_search, knn_classify, knn_pseudo_labels, KNNClassifier, kmeans, cluster_pseudo_labels,
# cluster_metrics


# ---------------------------------------------------------------------------------------------
# environment: FASTSSL_IMPL


# ---------------------------------------------------------------------------------------------
# the runner


@pytest.mark.parametrize(("call", "expect"), ROWS)
def test_row(call, expect):
    if expect[0] == "raises":
        _, exc, match = expect
        with pytest.raises(exc, match=match):
            call()
    else:
        result = call()
        assert expect[1](result), f"{getattr(expect[1], '__name__', expect[1])} failed for {result!r}"


@pytest.mark.parametrize(("code", "expect_stdout"), SUBPROCESS_ROWS)
def test_subprocess_row(code, expect_stdout):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"exit {done.returncode} (a negative code is a signal):\n{done.stderr[-3000:]}"
    assert re.search(expect_stdout, done.stdout), done.stdout[-2000:]


def test_every_public_name_has_rows():
    ids = [p.id for p in ROWS + SUBPROCESS_ROWS]
    missing = [name for name in fastssl.__all__ if not name.startswith("_") and not any(
        re.match(rf"{re.escape(name)}\b", i) for i in ids
    )]  # fmt: skip
    assert not missing, f"public names without a row in the input catalogue: {missing}"
