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


def inverse_temperature(name: str, value, device: torch.device) -> float | torch.Tensor:
    """1/τ for a temperature τ: a float for a Python number (finite and > 0; nothing goes to the
    device), or a 0-dim tensor on `device` for a one-element floating tensor τ, which keeps τ's
    gradient (a learned temperature) and is never read on the host where that would wait on a
    device or break torch.compile's graph: there a τ that is not finite and > 0 gives 1/τ = NaN
    (so a NaN loss). A CPU tensor is checked (ValueError) outside torch.compile."""
    if not isinstance(value, torch.Tensor):
        return 1.0 / positive(name, value)
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a number or a floating tensor, got dtype {value.dtype}")
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
    tau = value.reshape(())
    if tau.device.type == "cpu" and not torch.compiler.is_compiling():
        positive(name, tau.detach())
    tau = tau.to(device)
    return torch.where(torch.isfinite(tau) & (tau > 0), tau.reciprocal(), torch.full_like(tau, math.nan))


def choice(name: str, value, options: tuple) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """x has no NaN or ±inf (one pass over x; on CUDA it waits for the result)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    return x


def fraction(name: str, value) -> float:
    """A real number in [0, 1) (a ratio of something removed, never all of it)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not 0 <= value < 1:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def integer(name: str, value, *, minimum: int = 0) -> int:
    """A Python (or numpy) integer >= minimum; bools are refused."""
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
        raise ValueError(f"{name} is on {gen.device} but the random numbers are drawn on {device}")
    return gen


def batch(name: str, x) -> torch.Tensor:
    """A floating tensor [B, ...] with at least one sample, each of at least one value."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must be a batch [B, ...], got a scalar")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)})")
    if x.numel() == 0:
        raise ValueError(f"{name} has no values per sample (shape {tuple(x.shape)})")
    return x


def per_sample(name: str, value, x: torch.Tensor, *, strict: bool = False) -> torch.Tensor:
    """A number or a [B] tensor (one per sample of x), finite and ≥ 0 (> 0 when strict).

    Returned as a [B] tensor in x's accumulation dtype on x's device. A tensor's values are
    checked with one device sync, skipped while torch.compile traces.
    """
    want = "> 0" if strict else ">= 0"
    n = x.shape[0]
    if isinstance(value, torch.Tensor):
        if not (value.dtype.is_floating_point or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a number or a real tensor, got dtype {value.dtype}")
        if value.shape != (n,):
            shape = tuple(value.shape)
            raise ValueError(f"{name} must be a number or a [{n}] tensor (one per sample), got shape {shape}")
        if value.device != x.device:
            raise ValueError(f"{name} is on {value.device} but the inputs are on {x.device}")
        out = value.detach().to(accumulate_dtype(x.dtype))
        if not torch.compiler.is_compiling():
            bad = ~torch.isfinite(out) | ((out <= 0) if strict else (out < 0))
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"{name} must be finite and {want}, got {out[i].item()} for sample {i}")
        return out
    return torch.full((n,), nonnegative(name, value, strict=strict), dtype=accumulate_dtype(x.dtype), device=x.device)


def nonnegative(name: str, value, *, strict: bool = False) -> float:
    """A finite number ≥ 0 (> 0 when strict)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (strict and value == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if strict else '>= 0'}, got {value}")
    return float(value)


def interval(name: str, value) -> tuple[float, float]:
    """(lo, hi) with lo < hi (either may be infinite); None gives (−inf, inf)."""
    if value is None:
        return -math.inf, math.inf
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (lo, hi) or None, got {value!r}") from None
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a pair of numbers, got {value!r}")
    if not lo < hi:  # also catches NaN
        raise ValueError(f"{name} must be (lo, hi) with lo < hi, got {value!r}")
    return float(lo), float(hi)


def probability(name: str, value) -> float:
    """A real number in [0, 1] (a confidence threshold)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not 0 <= value <= 1:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def flag(name: str, value) -> bool:
    """A bool (not a truthy number or string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value
