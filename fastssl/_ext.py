"""Loads the compiled extension and the Triton kernels, and says which backends are available.

Nothing here fails at import: a backend that cannot load records why, `fastssl info` prints it,
and an op asked to use it raises an error that quotes the reason.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import torch

IMPLS = ("auto", "reference", "cpp", "triton", "cuda")

# Triton picks its interpreter when a function is decorated with triton.jit, its own library
# (triton.language) included, and torch may import triton on the first custom-op call. On a machine
# without CUDA the interpreter is Triton's only way to run, so it is chosen here, before that import.
if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

try:
    from fastssl import _C  # type: ignore[attr-defined]

    CPP_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    CPP_ERROR = f"{type(exc).__name__}: {exc}"

if _C is None:
    CUDA_ERROR: str | None = CPP_ERROR
elif not _C.WITH_CUDA:
    CUDA_ERROR = "the extension was built without CUDA (no CUDA torch or nvcc at build time)"
else:
    CUDA_ERROR = None


def triton_error() -> str | None:
    """Why the Triton kernels cannot run here, or None."""
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    if torch.cuda.is_available() and _interpreting():
        return "TRITON_INTERPRET=1 is set: kernels run interpreted on CPU tensors only"
    return None


def triton_mode() -> str:
    """How Triton kernels run here: compiled for the GPU, or Triton's interpreter on CPU tensors."""
    return "compiled (CUDA)" if torch.cuda.is_available() and not _interpreting() else "interpreter (CPU tensors)"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_kernels(module: str, device: torch.device) -> types.ModuleType:
    """fastssl.kernels.<module>, imported on first use (Triton's import is not free).

    On CPU tensors the kernels run through Triton's interpreter, which triton.jit picks when
    Triton and the kernels are decorated: on a machine without CUDA, importing fastssl before
    triton sets TRITON_INTERPRET=1 for that; elsewhere set it in the environment.
    """
    if device.type == "cpu" and not _interpreting():
        raise RuntimeError(_INTERPRETER_HINT)
    if device.type == "cuda" and _interpreting():
        raise RuntimeError("TRITON_INTERPRET=1 is set: the Triton kernels run on CPU tensors only")
    error = triton_error()
    if error is not None:
        raise RuntimeError(f"the Triton backend is unavailable: {error}")
    kernels = importlib.import_module(f"fastssl.kernels.{module}")
    if device.type == "cpu" and not _triton_interpreted():
        raise RuntimeError(_INTERPRETER_HINT + " (triton was imported before TRITON_INTERPRET=1 was set)")
    return kernels


_INTERPRETER_HINT = (
    "impl='triton' on CPU tensors runs Triton's interpreter, which must be chosen before triton is imported: "
    "set TRITON_INTERPRET=1 in the environment before importing torch and fastssl"
)


def _triton_interpreted() -> bool:
    """Whether triton.language's own jit functions were decorated for the interpreter."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.cdiv, InterpretedFunction)


def resolve_impl(impl: str, device: torch.device, *, has_cuda_kernel: bool = False) -> str:
    """The backend an op runs: `impl`, or for "auto" (default, or $FASTSSL_IMPL) the device's best.

    "auto" is the C++ kernel on CPU tensors and the Triton kernel on CUDA tensors; a CUDA C++
    kernel is chosen only by ops whose kernel a GPU run has shown correct and faster
    (`has_cuda_kernel`).
    """
    if impl == "auto":
        impl = env_impl()
    elif impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cpu":
            impl = "cpp"
        elif device.type == "cuda":
            impl = "cuda" if has_cuda_kernel and CUDA_ERROR is None else "triton"
        else:
            impl = "reference"
    if impl == "cpp":
        if device.type != "cpu":
            raise ValueError(f"impl='cpp' runs on CPU tensors, got a tensor on {device}")
        if _C is None:
            raise RuntimeError(f"the C++ extension fastssl._C did not load: {CPP_ERROR}")
    if impl == "cuda":
        if device.type != "cuda":
            raise ValueError(f"impl='cuda' runs on CUDA tensors, got a tensor on {device}")
        if CUDA_ERROR is not None:
            raise RuntimeError(f"no CUDA C++ kernels: {CUDA_ERROR}")
    if impl == "triton" and device.type not in ("cpu", "cuda"):
        raise ValueError(f"impl='triton' runs on CUDA tensors (or CPU ones, interpreted), got {device}")
    return impl


def env_impl() -> str:
    """$FASTSSL_IMPL, the backend that impl="auto" stands for; unset or empty: "auto"."""
    value = os.environ.get("FASTSSL_IMPL", "")
    if value == "":
        return "auto"
    if value not in IMPLS:
        raise ValueError(
            f"the environment variable FASTSSL_IMPL (what impl='auto' stands for) must be one of {IMPLS} or empty, "
            f"got {value!r}"
        )
    return value


def kernel(impl: str, device: torch.device, *, cpp: str | None = None, triton: str | None = None, cuda=None):
    """The raw kernel an op runs for a resolved impl ("cpp", "cuda" or "triton"), named in full.

    Each op names its entry points where it calls them, e.g.
    ``kernel(impl, z.device, cpp="ntxent_lse_fwd_cpu", triton="ntxent.ntxent_lse_fwd")``: `cpp` and
    `cuda` are functions of the extension fastssl._C (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu), `triton`
    is "<module>.<function>" in fastssl.kernels (the top-level kernels/ folder, installed under that
    name by pyproject.toml's package-dir).
    """
    name = {"cpp": cpp, "cuda": cuda, "triton": triton}[impl]
    if name is None:
        raise NotImplementedError(f"no {impl} kernel for this op (it has: cpp={cpp}, triton={triton}, cuda={cuda})")
    if impl == "triton":
        module, function = name.split(".")
        return getattr(triton_kernels(module, device), function)
    return getattr(_C, name)
