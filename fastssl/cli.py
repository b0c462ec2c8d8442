"""`fastssl info` (environment report), `fastssl selftest` (every op on every backend against the
reference, fastssl/selftest.py), `fastssl bench` (the benchmark suite) and `fastssl demo` (SimCLR on
scikit-learn's digits, examples/simclr_digits.py; `--method fixmatch`: FixMatch with 10 labels per
class, examples/fixmatch_digits.py)."""

from __future__ import annotations

import argparse
import importlib
import platform
import subprocess
import sys
from pathlib import Path

import torch

from fastssl import __version__, _ext

# --method -> examples/<module>.py
DEMOS = {"simclr": "simclr_digits", "fixmatch": "fixmatch_digits", "dino": "dino_digits"}


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # report, never fail: this is a diagnostic
        return f"not available ({type(exc).__name__}: {exc})"


def _compiler() -> str:
    try:
        out = subprocess.run(["c++", "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "not found"


def _bf16_dots() -> str:
    """How the C++ kernels multiply tiles of bf16 rows (csrc/tiles.h, TileProducts and Bf16Dots)."""
    if not _ext._C.bf16_dots_enabled():
        return "fp32 dot products (FASTSSL_CPU_BF16_DOTS=0 or no oneDNN)"
    if _ext._C.bf16_micro_kernels():
        return "bf16 micro-kernels, fp32 accumulation (oneDNN brgemm, AMX)"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "fp32 dot products (this CPU has no bf16 dot products for oneDNN)"
    return "bf16 dot products, fp32 accumulation (oneDNN)"


def info() -> str:
    lines = [
        f"fastssl  {__version__}",
        f"python   {platform.python_version()} ({sys.executable})",
        f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'}, {torch.get_num_threads()} CPU threads)",
        f"triton   {_version('triton')}",
        f"faiss    {_version('faiss')}",
        f"compiler {_compiler()}",
        f"cpu      {platform.processor() or platform.machine()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}   {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        lines.append("cuda     no device")
    backends = {
        "cpp": _ext.CPP_ERROR,
        "cuda": _ext.CUDA_ERROR,
        "triton": _ext.triton_error(),
    }
    lines.append("backends")
    for name, error in backends.items():
        status = "ok" if error is None else "unavailable: " + error
        if name == "triton" and error is None:
            status += f", {_ext.triton_mode()}"
        if name == "cpp" and error is None:
            status += f", bf16 tiles: {_bf16_dots()}"
        lines.append(f"  {name:7s} {status}")
    return "\n".join(lines)


def _repository(package: str):
    """The repository's benchmarks/ or examples/ (not installed): importable from a source checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / package).is_dir():
        raise SystemExit(f"fastssl: {package}/ lives in the source repository; run this from a checkout")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(package)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="fastssl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and which backends loaded")
    bench = sub.add_parser("bench", help="run the benchmark suite on the present hardware")
    bench.add_argument("--quick", action="store_true", help="the small set `make bench` runs")
    bench.add_argument("ops", nargs="*", help="benchmarks to run (default: all)")
    sub.add_parser("selftest", help="every op on every backend of a device against the reference (selftest --help)")
    sub.add_parser(
        "demo",
        help="SimCLR on scikit-learn's digits, fastssl against the reference; --method fixmatch: FixMatch "
        "with 10 labels per class against the labels alone (demo [--method M] --help)",
    )
    if argv[:1] == ["selftest"]:  # parses its own options
        from fastssl.selftest import main as selftest

        return selftest(argv[1:])
    if argv[:1] == ["demo"]:  # --method picks the example, which parses the other options
        pick = argparse.ArgumentParser(add_help=False)
        pick.add_argument("--method", choices=DEMOS, default="simclr")
        method, rest = pick.parse_known_args(argv[1:])
        _repository("examples")
        demo = importlib.import_module(f"examples.{DEMOS[method.method]}").main
        return demo(rest, prog=f"fastssl demo --method {method.method}")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    _repository("benchmarks")
    from benchmarks.suite import run_suite

    return run_suite(args.ops, quick=args.quick)
