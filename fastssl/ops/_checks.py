"""Input checks shared by the ops. Each raises ValueError/TypeError naming the argument."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp16/bf16/fp32 inputs, fp64 for fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def features(name: str, x, *, ndim: int = 2) -> torch.Tensor:
    """A floating tensor of `ndim` dims with at least one row."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)})")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)})")
    return x


def like(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dims=None) -> None:
    """x matches ref in device, dtype and the listed dims (all dims when None)."""
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}")
    dims = range(ref.dim()) if dims is None else dims
    if any(x.shape[d] != ref.shape[d] for d in dims):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, which does not match {ref_name}'s {tuple(ref.shape)}")


def labels(name: str, y, n: int, device: torch.device) -> torch.Tensor:
    """An integer tensor of shape [n] on `device`."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"{name} is on {y.device} but the features are on {device}")
    return y


def positive(name: str, value) -> float:
    """A finite number > 0 (a Python number or a one-element tensor without grad)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def choice(name: str, value, options: tuple) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def count(name: str, value, *, minimum: int = 0) -> int:
    """A Python integer (not a bool) ≥ `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def generator(name: str, gen, device: torch.device) -> torch.Generator | None:
    """None, or a torch.Generator on the device the random numbers are drawn on."""
    if gen is None:
        return None
    if not isinstance(gen, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(gen).__name__}")
    if gen.device.type != device.type:
        raise ValueError(f"{name} is on {gen.device} but the tensors are on {device}: draws are made on their device")
    return gen
