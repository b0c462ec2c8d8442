"""Host-side launch helpers shared by every Triton kernel file; they belong to no op.

Block sizes, the number of programs aimed at, the accumulation dtype and the device a launch runs
under (docs/design.md, "Dispatch"): a kernel launched on a tensor of cuda:1 while cuda:0 is current
would run on the wrong GPU and stream, so every launcher enters its tensors' device.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

# tl.dot's smallest tile edge; also the smallest block of the element-wise kernels.
MIN_BLOCK = 16
# Programs per SM aimed at when a kernel cuts its tiles into runs: enough to fill the GPU.
PROGRAMS_PER_SM = 4
# Programs aimed at on CPU tensors (Triton's interpreter): a few, so that runs are exercised.
INTERPRETER_PROGRAMS = 4


@functools.cache
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def program_target(device: torch.device) -> int:
    """How many programs a launch on `device` aims at (PROGRAMS_PER_SM per SM on a GPU)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return PROGRAMS_PER_SM * sm_count(index)
    return INTERPRETER_PROGRAMS


def block_size(n: int, cap: int) -> int:
    """The power of two ≥ n, capped at `cap` and at least MIN_BLOCK."""
    return max(MIN_BLOCK, min(cap, triton.next_power_of_2(n)))


def acc_dtype(*tensors: Tensor) -> tuple[torch.dtype, tl.dtype]:
    """The accumulation dtype as (torch, Triton): fp64 when any input is fp64 (gradcheck), else fp32."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def on_device(device: torch.device):
    """The context a launch runs in: `device` made current for a CUDA tensor, nothing on the CPU."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launcher(fn):
    """Decorates a kernel file's public entry point: it runs under the device of its first tensor
    argument (see on_device)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next(a.device for a in (*args, *kwargs.values()) if isinstance(a, Tensor))
        with on_device(device):
            return fn(*args, **kwargs)

    return run
