"""Benchmark harness shared by every benchmarks/bench_<op>.py.

A bench script defines ``OP`` and ``cases(quick, device)`` returning :class:`Case` objects, each of
which knows how to build one iteration (forward, or forward+backward) for one provider. The harness

* times each case (warm-up, then repeats until a time budget; median and 20/80 % quantiles),
* measures peak memory over the timed repetitions (after one warm-up call): on CUDA
  ``torch.cuda.max_memory_allocated``; on the CPU the growth of the peak resident set (VmHWM) of a
  process forked for that case alone from a parent that has run nothing, with glibc's mmap
  threshold fixed (4 MiB) so that every large buffer the case allocates, N×N ones included, is counted;
  on the CPU the time comes from a second child, under glibc's steady state instead (_malloc_steady):
  the fixed threshold that makes the RSS honest also maps, faults and unmaps every buffer over 4 MiB
  on every call, which a training loop under glibc's defaults does not do after its first steps
  (cases measured in one call, ``min_reps = 1``, take both from that call in the memory child),
* records out-of-memory as ``OOM`` (CPU children run under an address-space limit of the physical memory, so a too-large
  case fails to allocate instead of being killed) and a case past its time limit as ``timeout``;
  once a provider fails at a size, its larger sizes are recorded as ``skipped``,
* appends one CSV row per case to ``benchmarks/results/<op>.csv`` keyed by device, dtype, shape and
  version, prints a table with each provider's time as a ratio of the reference's, and draws a
  plot from the CSV (``benchmarks/results/<op>_<device>.png``).

The parent process must run no torch op before it forks (GNU OpenMP's thread pool does not survive
a fork: the child would hang), so bench scripts build their inputs inside ``Case.build``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import multiprocessing as mp
import os
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = [
    "timestamp", "version", "commit", "device", "op", "provider", "mode", "dtype", "shape",
    "status", "median_ms", "q20_ms", "q80_ms", "reps", "peak_mem_mb", "tflops", "bound_ms", "x_bound",
    "gbps", "peak_frac", "note",
]  # fmt: skip


@dataclass
class Case:
    """One measurement: ``build()`` returns a zero-argument function running one iteration.

    The first entry of ``shape`` is the swept size: a failure at one size skips the larger ones
    of the same provider, mode, dtype and other dims. ``min_reps`` = 1 suits cases of minutes (no
    warm-up then).

    The bound (docs/design.md states each op's): the work the op cannot avoid, timed on this
    hardware in the same run and dtype. A GEMM-bound op gives ``flops``, the FLOPs its algorithm
    must do, and ``gemm`` = (m, k, n), the shape of the matrix product that work is made of: the
    bound is the time of one ``torch.mm`` of that shape scaled to ``flops``. A memory-bound op gives
    ``bytes_moved``, what it must read and write: the bound is the time of a copy moving as many
    bytes. The row then has ``bound_ms`` and ``x_bound`` (time over bound), and on a GPU the
    fraction of the device's peak (``peak_frac``, from TFLOP/s or GB/s).
    """

    provider: str
    mode: str  # "forward" or "forward+backward"
    dtype: torch.dtype
    shape: dict
    build: Callable[[], Callable[[], object]]
    flops: float | None = None
    note: str = ""
    min_reps: int = 3
    gemm: tuple[int, int, int] | None = None
    bytes_moved: float | None = None

    @property
    def size(self) -> float:
        return float(next(iter(self.shape.values())))

    @property
    def shape_str(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.shape.items())


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{os.cpu_count()}cores"


def _version() -> tuple[str, str]:
    import fastssl

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=RESULTS.parent, timeout=10)

    try:
        commit = git("rev-parse", "--short", "HEAD").stdout.strip()
        # "-dirty" when tracked files other than the results differ from HEAD: the rows then come
        # from a tree that no commit holds
        beside_results = (":(top)", ":(top,exclude)benchmarks/results")
        if commit and git("diff", "--quiet", "HEAD", "--", *beside_results).returncode == 1:
            commit += "-dirty"
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return fastssl.__version__, commit


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], device: str, budget_s: float, min_reps: int, max_reps: int) -> list[float]:
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median_ms(fn: Callable[[], object], n: int = 5) -> float:
    """One warm-up call of fn, then the median of n timed calls, in ms (CPU; the profile scripts)."""
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text or "can't allocate" in text


def _measure(case: Case, device: str, budget_s: float, memory: bool | None = None) -> dict:
    """Runs in the process that owns the case (a forked child on CPU). memory: None measures time and
    peak memory together (CUDA), True peak memory over min_reps calls, False time alone."""
    try:
        fn = case.build()
        if case.min_reps > 1:  # warm-up (compilation, autotuning), outside the memory window
            fn()
            _sync(device)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            base = _rss_kb("VmRSS") * 1024
        times = _time(fn, device, budget_s, min_reps=case.min_reps, max_reps=case.min_reps if memory else 50)
        peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else _rss_kb("VmHWM") * 1024 - base
        extra = getattr(fn, "note", "")  # what the timed function measured (e.g. an attack's accuracy)
        return {
            **({"note": ",".join(filter(None, (case.note, extra)))} if extra else {}),
            "status": "ok",
            "median_ms": statistics.median(times) * 1e3,
            "q20_ms": _quantile(times, 0.2) * 1e3,
            "q80_ms": _quantile(times, 0.8) * 1e3,
            "reps": len(times),
            "peak_mem_mb": peak / 2**20,
        }
    except Exception as exc:
        if _is_oom(exc):
            return {"status": "OOM"}
        return {"status": "error", "note": f"{type(exc).__name__}: {exc}"[:300], "trace": traceback.format_exc()}


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _child(case: Case, budget_s: float, mem_limit: int, conn, memory: bool | None) -> None:
    """One measurement of a case in a forked child. The memory child gives every allocation over
    4 MiB its own mapping, returned to the OS when freed: glibc otherwise raises its mmap threshold
    (up to 32 MiB) after the first large free and keeps later buffers in its heap, so a warm-up's
    buffers would be reused without showing in the RSS. Smaller buffers stay in the heap, trimmed
    above 128 KiB of free space (tiled kernels allocate thousands of tile-sized temporaries; a
    threshold below their size made each one an mmap, page faults and an munmap). The timing child
    runs under _malloc_steady."""
    resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    if memory is False:
        _malloc_steady()
    else:
        _malloc_thresholds(4 << 20, 128 << 10)
    conn.send(_measure(case, "cpu", budget_s, memory=memory))
    conn.close()


def _malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> None:
    """glibc's mmap and trim thresholds for this process (setting them ends its own adjustment)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, mmap_bytes)
    libc.mallopt(m_trim_threshold, trim_bytes)


def _malloc_steady() -> None:
    """The timing child: glibc's thresholds as its own adjustment leaves them once a process has freed
    a buffer of 32 MiB (its DEFAULT_MMAP_THRESHOLD_MAX; the trim threshold follows at twice the mmap
    one): buffers up to 32 MiB are reused from the heap, larger ones mapped per call. Under the
    memory child's 4 MiB threshold, an op whose [N, D] temporaries are 4 MiB each (NT-Xent at
    N = 8192, D = 128) paid a map, 1024 page faults and an unmap per temporary per call: 245 ms
    against 206 ms (docs/design.md, "Bounds")."""
    _malloc_thresholds(32 << 20, 64 << 20)


def _measure_forked(case: Case, budget_s: float, timeout_s: float) -> dict:
    """Fresh children per case: one for its peak RSS (the case's alone; an OOM cannot hurt the
    parent), then one for its time (see _malloc_steady). A case measured in one call (min_reps = 1:
    seconds to minutes per call, e.g. an AutoAttack run or k-means) takes both from that call, under
    the memory child's thresholds, rather than run twice."""
    if case.min_reps == 1:
        return _run_child(case, budget_s, timeout_s, memory=None)
    memory = _run_child(case, budget_s, timeout_s, memory=True)
    if memory["status"] != "ok":
        return memory
    timed = _run_child(case, budget_s, timeout_s, memory=False)
    if timed["status"] == "ok":
        timed["peak_mem_mb"] = memory["peak_mem_mb"]
    return timed


def _run_child(case: Case, budget_s: float, timeout_s: float, memory: bool | None) -> dict:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(case, budget_s, total, send, memory))
    proc.start()
    send.close()
    result = {"status": "timeout"} if not recv.poll(timeout_s) else None
    if result is None:
        try:
            result = recv.recv()
        except EOFError:  # the child died without answering: killed for memory, or crashed
            result = None
    if proc.is_alive():
        proc.kill()
    proc.join()
    if result is None:
        result = {"status": "OOM" if proc.exitcode in (-9, 137) else "error", "note": f"exit code {proc.exitcode}"}
    return result


# Dense peaks of the GPUs the project is measured on (vendor data sheets, SXM parts): TFLOP/s by
# dtype for tensor-core matrix work, and memory bandwidth in GB/s.
_GPU_PEAKS = {
    "H200": ({"bfloat16": 989.0, "float16": 989.0, "float32": 494.0, "float64": 67.0}, 4800.0),
    "H100": ({"bfloat16": 989.0, "float16": 989.0, "float32": 494.0, "float64": 67.0}, 3350.0),
    "A100": ({"bfloat16": 312.0, "float16": 312.0, "float32": 156.0, "float64": 19.5}, 2039.0),
}


def _gpu_peak(device: str) -> tuple[dict, float] | None:
    return next((peak for name, peak in _GPU_PEAKS.items() if name in device), None)


def _bound_case(case: Case) -> Case | None:
    """The measurement of the case's bound: one torch.mm of ``case.gemm`` into a preallocated
    output, or a copy of half of ``case.bytes_moved`` (a copy reads and writes each byte once).

    The output is allocated once: on the CPU an output above glibc's mmap threshold (32 MB) is
    mapped afresh on every call and its first write faults one page at a time, which is the
    allocator's work, not the GEMM's (it made the bound of [256, 128] × [128, 65536] 1.5 × and of
    [8192, 128] × [8192, 128]ᵀ in bf16 3.6 × slower; docs/design.md, "Bounds")."""
    if case.gemm and case.flops:
        m, k, n = case.gemm

        def build_mm():
            device = "cuda" if torch.cuda.is_available() else "cpu"
            a = torch.randn(m, k, dtype=case.dtype, device=device)
            b = torch.randn(k, n, dtype=case.dtype, device=device)
            out = torch.empty(m, n, dtype=case.dtype, device=device)
            return lambda: torch.mm(a, b, out=out)

        return Case("bound", "mm", case.dtype, {"m": m, "k": k, "n": n}, build_mm)
    if case.bytes_moved:
        count = max(1, int(case.bytes_moved // 2))

        def build_copy():
            device = "cuda" if torch.cuda.is_available() else "cpu"
            src = torch.empty(count, dtype=torch.uint8, device=device).random_()
            dst = torch.empty_like(src)
            return lambda: dst.copy_(src)

        return Case("bound", "copy", torch.uint8, {"bytes": 2 * count}, build_copy)
    return None


def _bound_ms(case: Case, device: str, budget_s: float, timeout_s: float, cache: dict) -> float | None:
    """The case's bound in ms (see Case), measured once per shape and dtype in this run."""
    probe = _bound_case(case)
    if probe is None:
        return None
    key = (probe.mode, probe.dtype, probe.shape_str)
    if key not in cache:
        result = _measure(probe, device, budget_s) if device == "cuda" else _measure_forked(probe, budget_s, timeout_s)
        cache[key] = result["median_ms"] if result["status"] == "ok" else None
    ms = cache[key]
    if ms is None or probe.mode != "mm":
        return ms
    m, k, n = case.gemm
    return ms * case.flops / (2.0 * m * k * n)


def _bound_columns(case: Case, result: dict, bound_ms: float | None, dev_name: str) -> dict:
    """bound_ms, x_bound, GB/s and, on a GPU, the fraction of the device's peak."""
    out = {}
    seconds = result["median_ms"] * 1e-3
    if bound_ms:
        out["bound_ms"] = bound_ms
        out["x_bound"] = result["median_ms"] / bound_ms
    if case.bytes_moved:
        out["gbps"] = case.bytes_moved / seconds / 1e9
    peak = _gpu_peak(dev_name)
    if peak is not None:
        flops_peak, gbps_peak = peak
        dtype = str(case.dtype).removeprefix("torch.")
        if case.flops and dtype in flops_peak:
            out["peak_frac"] = case.flops / seconds / 1e12 / flops_peak[dtype]
        elif case.bytes_moved:
            out["peak_frac"] = out["gbps"] / gbps_peak
    return out


def run(
    op: str,
    cases: list[Case],
    *,
    reference: str = "reference",
    budget_s: float = 3.0,
    timeout_s: float = 900.0,
    csv_path: Path | None = None,
    plot: bool = True,
) -> list[dict]:
    """Measures ``cases`` in order, appends them to the CSV, prints a table and draws the plot."""
    import torch._dynamo

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_name = device_name()
    version, commit = _version()
    stamp = dt.datetime.now().isoformat(timespec="seconds")
    failed: dict[tuple, float] = {}  # (provider, mode, dtype, other dims) -> smallest failing size
    bounds: dict[tuple, float | None] = {}
    rows = []
    for i, case in enumerate(cases, 1):
        key = (case.provider, case.mode, case.dtype, tuple(case.shape.items())[1:])  # all but the swept dim
        label = f"[{i}/{len(cases)}] {op} {case.provider} {case.mode} {case.dtype} {case.shape_str}"
        if key in failed and case.size > failed[key]:
            result = {"status": "skipped", "note": "a smaller size failed"}
        else:
            print(f"{label} ...", end="", flush=True, file=sys.stderr)
            t0 = time.perf_counter()
            result = (
                _measure(case, device, budget_s) if device == "cuda" else _measure_forked(case, budget_s, timeout_s)
            )
            print(f" {result['status']} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
            if result["status"] == "error":
                print(result.get("trace", result.get("note", "")), file=sys.stderr)
        if result["status"] != "ok" and result["status"] != "skipped":
            failed[key] = min(failed.get(key, math.inf), case.size)
        if result["status"] == "ok":
            if case.flops:
                result["tflops"] = case.flops / (result["median_ms"] * 1e-3) / 1e12
            bound = _bound_ms(case, device, budget_s, timeout_s, bounds)
            result.update(_bound_columns(case, result, bound, dev_name))
        row = {
            "timestamp": stamp,
            "version": version,
            "commit": commit,
            "device": dev_name,
            "op": op,
            "provider": case.provider,
            "mode": case.mode,
            "dtype": str(case.dtype).removeprefix("torch."),
            "shape": case.shape_str,
            "note": case.note,
        }
        row.update({k: v for k, v in result.items() if k in FIELDS})
        rows.append(row)
    path = csv_path or RESULTS / f"{op}.csv"
    append_csv(path, rows)
    print(format_table(rows, reference))
    print(f"\nrows appended to {path}")
    if plot:
        png = plot_csv(path, dev_name)
        if png:
            print(f"plot: {png}")
    return rows


def append_csv(path: Path, rows: list[dict]) -> None:
    """Appends rows; a file written with older columns is rewritten with today's first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with path.open() as f:
            header = next(csv.reader(f), None)
        if header != FIELDS:
            old = read_csv(path)
            path.unlink()
            append_csv(path, old)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in FIELDS})


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict], reference: str = "reference") -> str:
    """Time and memory per case, with ratios to the reference provider of the same case."""
    ref = {
        (r["mode"], r["dtype"], r["shape"]): r for r in rows if r["provider"] == reference and r.get("status") == "ok"
    }
    header = ["provider", "mode", "dtype", "shape", "status", "median ms", "x ref time", "x bound", "peak MB"]
    header.append("x ref mem")
    lines = [header]
    for r in rows:
        base = ref.get((r["mode"], r["dtype"], r["shape"]))
        ok = r.get("status") == "ok"
        t = float(r["median_ms"]) if ok else None
        m = float(r["peak_mem_mb"]) if ok else None
        lines.append([
            r["provider"], r["mode"], r["dtype"], r["shape"], r.get("status", ""),
            f"{t:.2f}" if ok else "",
            f"{t / float(base['median_ms']):.3f}" if ok and base else "",
            f"{float(r['x_bound']):.2f}" if ok and r.get("x_bound") not in (None, "") else "",
            f"{m:.1f}" if ok else "",
            f"{m / max(float(base['peak_mem_mb']), 1e-9):.4f}" if ok and base else "",
        ])  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def plot_csv(path: Path, device: str | None = None) -> Path | None:
    """Time and peak memory against the batch dimension, one line per provider and mode.

    For each (device, provider, mode, dtype, shape) the newest row counts. Returns the PNG path.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    rows = [r for r in read_csv(path) if r["status"] == "ok" and (device is None or r["device"] == device)]
    if not rows:
        return None
    device = device or rows[-1]["device"]
    latest: dict[tuple, dict] = {}
    for r in rows:
        latest[(r["provider"], r["mode"], r["dtype"], r["shape"])] = r
    series: dict[tuple, list] = {}
    for (provider, mode, dtype, shape), r in latest.items():
        dims = dict(kv.split("=") for kv in shape.split(","))
        x = float(dims.pop(next(iter(dims))))  # the first dimension is the swept one
        rest = ",".join(f"{k}={v}" for k, v in dims.items())
        series.setdefault((provider, mode, dtype, rest), []).append((x, float(r["median_ms"]), float(r["peak_mem_mb"])))
    xlabel = next(iter(latest))[3].split("=")[0]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for (provider, mode, dtype, rest), pts in sorted(series.items()):
        pts.sort()
        xs, ts, ms = zip(*pts, strict=True)
        style = "-" if mode == "forward+backward" else "--"
        label = f"{provider} {mode} {dtype} {rest}"
        axes[0].plot(xs, ts, style, marker="o", label=label)
        axes[1].plot(xs, [max(m, 1e-3) for m in ms], style, marker="o", label=label)
    for ax, ylabel in zip(axes, ["median time (ms)", "peak memory (MB)"], strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    op = path.stem
    fig.suptitle(f"{op} on {device}")
    fig.tight_layout()
    png = path.with_name(f"{op}_{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def verdict(what: str, ratio: float, want: float) -> str:
    """One target as the bench scripts print it: "time 0.229 x reference (want <= 0.3) PASS"."""
    return f"{what} {ratio:.4g} x reference (want <= {want:.4g}) {'PASS' if ratio <= want else 'MISS'}"


def check_size_targets(rows: list[dict], targets: dict, size: str, dim: int = 128) -> None:
    """Prints each target of ``targets`` ({size value: (time ratio or None, memory ratio or None)})
    for fastssl against the reference, forward+backward, at shape "<size>=<value>,D=<dim>"."""
    ok = {(r["provider"], r["mode"], r["shape"]): r for r in rows if r.get("status") == "ok"}
    for value, (t_target, m_target) in targets.items():
        key = f"{size}={value},D={dim}"
        fs, ref = ok.get(("fastssl", "forward+backward", key)), ok.get(("reference", "forward+backward", key))
        if not fs:
            continue
        if not ref:
            status = next((r["status"] for r in rows if r["provider"] == "reference" and r["shape"] == key), "not run")
            print(f"target {size}={value}: reference {status}; fastssl ran with {fs['peak_mem_mb']:.0f} MB peak")
            continue
        parts = []
        if t_target:
            parts.append(verdict("time", fs["median_ms"] / ref["median_ms"], t_target))
        if m_target:
            parts.append(verdict("peak memory", fs["peak_mem_mb"] / ref["peak_mem_mb"], m_target))
        print(f"target {size}={value}: " + "; ".join(parts))


def sweep_main(
    op: str,
    doc: str,
    sweeps: dict[str, str],
    providers: tuple[str, ...],
    cases: Callable[..., list[Case]],
    check_targets: Callable[[list[dict]], None],
    argv: list[str] | None = None,
    dtypes: bool = False,
    timeout_s: float = 900.0,
) -> list[dict]:
    """The command line of a bench script whose cases sweep integer sizes (``sweeps``: option name →
    help, passed to ``cases(quick, device, *sizes, providers, modes)`` in that order), then its run
    (``timeout_s`` per case) and, on the CPU, its targets. With ``dtypes``, ``--dtype`` picks the
    inputs' dtype (passed as ``cases(..., dtype=)``; the default is each script's: fp32 on the CPU,
    bf16 on a GPU)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small set `make bench` runs")
    for name, help_text in sweeps.items():
        parser.add_argument(f"--{name}", type=int, nargs="+", help=help_text)
    parser.add_argument("--providers", nargs="+", default=list(providers), choices=providers)
    parser.add_argument("--modes", nargs="+", choices=["forward", "forward+backward"])
    if dtypes:
        parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = [getattr(args, name) for name in sweeps]
    extra = {"dtype": getattr(torch, args.dtype)} if dtypes and args.dtype else {}
    rows = run(op, cases(args.quick, device, *sizes, args.providers, args.modes, **extra), timeout_s=timeout_s)
    if device == "cpu":
        check_targets(rows)
    return rows


if __name__ == "__main__":
    # python -m benchmarks.harness CSV DEVICE: redraws the plot of DEVICE's rows (e.g. rows measured on a GPU machine)
    print(plot_csv(Path(sys.argv[1]), sys.argv[2]))
