"""`make compile-check`: every Triton kernel variant the host code launches, compiled for sm_90 and
sm_80 without a GPU, under the oldest supported Triton and the newest, each in its own environment.

The variants are not listed by hand: the op cases of fastssl/selftest.py (every op, option and
dtype) run at a sweep of shapes with impl="triton" on CPU tensors while JITFunction.run is replaced
by a recorder, so the launchers pick their block sizes, switches, num_warps and num_stages from
their own tables exactly as on a GPU, and Triton's own binder turns each recorded launch into the
signature, constexprs and specialisations it would compile. A new kernel is covered once its op
has a case in fastssl/selftest.py.

Each distinct variant is compiled with triton.compile for each target; ptxas's report
(TRITON_DUMP_PTXAS_LOG) gives registers, spills and stack frame, the compiled metadata the shared
memory. The check fails on a compile error, on any spilled byte, and on shared memory above the
target's limit (A100: 163 KB, H100: 227 KB); it prints one table row per variant and target.

    python scripts/compile_check.py                    # Triton 3.6.0 and the newest on PyPI
    python scripts/compile_check.py --triton installed # only the Triton of this environment

Each Triton version lives in build/compile-check/triton-<version> (pip install --target, found
first on PYTHONPATH; torch and fastssl come from this environment), kept between runs with a cache
of the results keyed by the kernels' source hashes, so that an unchanged kernel is not recompiled.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "compile-check"
OLDEST = "3.6.0"  # what a CUDA torch 2.11 ships; pyproject's floor for the GPU
# Shared memory a block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), in bytes.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def sizes():
    """The shapes the cases run at: rows enough for every launcher's largest row tiles (caps of
    at most 128 rows; PGD's 4096-value blocks), and every feature width at which a launcher picks
    another of its largest configurations (one-chunk caps of 32, 64 and 128, chunked D, masking's
    256-wide and masked MSE's 1024-wide blocks). Smaller inputs get smaller tiles of the same code,
    which use fewer registers and less shared memory."""
    from fastssl.selftest import Size

    return [Size(512, d) for d in (32, 64, 128, 256, 1024)]


# ---------------------------------------------------------------------------------------------
# in the child process: one Triton version, on PYTHONPATH ahead of this environment's


def _record_launches():
    """{variant key: (kernel, target, (signature, constexprs, attrs, options), origin)}."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from fastssl import _ext, selftest

    # impl="triton" on CPU tensors, but with the compiled kernels (JITFunction), not the interpreter's
    _ext._interpreting = lambda: True
    _ext._triton_interpreted = lambda: True
    targets = [(arch, GPUTarget("cuda", arch, 32)) for arch in ARCHS]
    backends = {arch: make_backend(target) for arch, target in targets}
    binders = {}
    variants, failures = {}, []
    origin = ["?"]

    def record(self, *args, grid, warmup, **kwargs):
        for arch, _ in targets:
            backend = backends[arch]
            if (self, arch) not in binders:
                binders[self, arch] = create_function_from_signature(self.signature, self.params, backend)
            bound, specialization, options = binders[self, arch](*args, **kwargs)
            packed = self._pack_args(backend, kwargs, bound, specialization, options)
            key = (self.fn.__qualname__, arch, repr(packed[1:]), repr(sorted(packed[0].__dict__.items())))
            variants.setdefault(key, (self, arch, packed, origin[0]))

    JITFunction.run = record
    for case in selftest.CASES:
        if "triton" not in case.impls:
            continue
        for dtype in case.dtypes:
            for size in sizes():
                origin[0] = f"{case.name} {str(dtype).removeprefix('torch.')} {size.rows}x{size.dim}"
                try:
                    case.build(torch.device("cpu"), dtype, size)("triton")
                except Exception as exc:  # the host code itself fails: a check failure too
                    failures.append(f"{origin[0]}: {type(exc).__name__}: {exc}")
    assert triton.__version__
    return variants, failures


_VARIANTS: list = []


def _compile(index: int) -> dict:
    """Compiles one recorded variant; ptxas's -v report comes through TRITON_DUMP_PTXAS_LOG."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, arch, (options, signature, constexprs, attrs), _ = _VARIANTS[index]
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            source = ASTSource(fn, signature, constexprs, attrs)
            kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    except Exception as exc:
        return dict(error=f"{type(exc).__name__}: {str(exc)[-2000:]}")
    text = log.getvalue()
    number = lambda pattern: max((int(m) for m in re.findall(pattern, text)), default=0)
    return dict(
        registers=number(r"Used (\d+) registers"),
        spills=number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
        stack=number(r"(\d+) bytes stack frame"),
        shared=int(kernel.metadata.shared),
        error=None if "Used" in text else "no ptxas report (TRITON_DUMP_PTXAS_LOG)",
    )


def _compile_one(item: tuple[int, str]) -> tuple[str, dict]:
    index, digest = item
    return digest, _compile(index)


def _name(fn) -> str:
    """module.kernel, e.g. fastssl.kernels.dino._loss_fwd_kernel: what --only matches."""
    return f"{fn.fn.__module__}.{fn.fn.__qualname__}"


def _describe(fn, packed) -> str:
    """Dtypes of the pointer arguments, then the constexpr switches, num_warps and num_stages."""
    options, signature, constexprs, attrs = packed
    names = fn.arg_names
    pointers = sorted({v.lstrip("*") for v in signature.values() if v.startswith("*")})
    switches = []
    for (i, *_), value in sorted(constexprs.items()):
        if signature.get(names[i]) != "constexpr":
            continue
        if getattr(fn.params[i], "is_constexpr", False):
            value = getattr(value, "name", value)
            value = int(value) if isinstance(value, bool) else value
            switches.append(f"{names[i]}={value}")
        else:  # a runtime int specialised to 1 (a unit stride)
            switches.append(f"{names[i]}=1")
    aligned = [names[i] for (i, *_) in attrs if signature.get(names[i]) in ("i32", "i64")]
    if aligned:  # runtime ints Triton specialised as multiples of 16
        switches.append(f"16|{','.join(aligned)}")
    return f"*{'/'.join(pointers)} " + " ".join(switches) + f" w{options.num_warps} s{options.num_stages}"


def child(jobs: int) -> int:
    import multiprocessing

    import triton

    assert isinstance(triton.language.cdiv, triton.runtime.JITFunction), "TRITON_INTERPRET must be unset"
    start = time.perf_counter()
    variants, failures = _record_launches()
    cache_file = Path(os.environ["COMPILE_CHECK_CACHE"])
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    keys = {}
    for key, (fn, arch, packed, origin) in variants.items():
        digest = hashlib.sha256(repr((triton.__version__, fn.cache_key, key)).encode()).hexdigest()
        keys[digest] = (fn, arch, packed, origin)
    todo = [d for d in keys if d not in cache and (not ONLY or any(o in _name(keys[d][0]) for o in ONLY))]
    _VARIANTS[:] = [keys[d] for d in todo]
    recorded = time.perf_counter() - start
    print(f"Triton {triton.__version__}: {len(keys)} variants in {recorded:.0f} s, {len(todo)} to compile", flush=True)
    if LIST_ONLY:
        counts = {}
        for fn, arch, *_ in keys.values():
            counts[fn.fn.__qualname__, arch] = counts.get((fn.fn.__qualname__, arch), 0) + 1
        for (name, arch), count in sorted(counts.items()):
            print(f"{name:32s} sm_{arch}: {count}")
        return 0
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        results = pool.imap_unordered(_compile_one, enumerate(todo))
        for done, (digest, result) in enumerate(results, 1):
            if result["error"] is None:  # errors are not cached: they are shown again next time
                fn, arch, packed, origin = keys[digest]
                cache[digest] = dict(result, kernel=fn.fn.__qualname__, arch=arch, variant=_describe(fn, packed))
            keys[digest] = (*keys[digest], result)
            if done % 20 == 0 or done == len(todo):  # an interrupted run keeps what it compiled
                cache_file.write_text(json.dumps(cache, indent=0, sort_keys=True))
                print(f"  {done}/{len(todo)} compiled ({time.perf_counter() - start:.0f} s)", flush=True)
    rows = []
    for digest, (fn, arch, packed, origin, *fresh) in keys.items():
        if not fresh and digest not in cache:  # left out by --only
            continue
        result = fresh[0] if fresh else cache[digest]
        problems = []
        if result["error"]:
            problems.append(result["error"])
        else:
            if result["spills"]:
                problems.append(f"{result['spills']} B spilled")
            if result["shared"] > SHARED_LIMIT[arch]:
                problems.append(f"shared {result['shared']} B > {SHARED_LIMIT[arch]} B")
        rows.append((fn.fn.__qualname__, _describe(fn, packed), arch, result, problems, origin))
    rows.sort(key=lambda r: (r[0], r[1], -r[2]))
    print(f"Triton {triton.__version__} ({triton.__file__})")
    head = f"{'kernel':32s} {'sm':>3s} {'regs':>4s} {'spill':>5s} {'stack':>5s} {'shared':>7s}  status  variant"
    print(head)
    print("-" * len(head))
    for name, variant, arch, result, problems, origin in rows:
        regs = result.get("registers", "-")
        spill = result.get("spills", "-")
        stack = result.get("stack", "-")
        shared = f"{result['shared'] / 1024:.0f}K" if "shared" in result else "-"
        status = "ok" if not problems else "FAIL"
        cells = f"{name:32s} {arch:3d} {regs!s:>4s} {spill!s:>5s} {stack!s:>5s} {shared:>7s}  {status:6s}"
        print(f"{cells}  {variant}  [{origin}]")
        for problem in problems:
            print(f"    {problem.splitlines()[0][:300]}")
    for failure in failures:
        print(f"host code failed: {failure}")
    bad = sum(bool(r[4]) for r in rows) + len(failures)
    elapsed = time.perf_counter() - start
    print(
        f"{len(rows)} variants ({len(todo)} compiled, {len(rows) - len(todo)} cached; launches recorded in "
        f"{recorded:.0f} s, {elapsed:.0f} s in all), {bad} failed"
    )
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------
# in the parent: one environment per Triton version


def _pip(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def _newest() -> str | None:
    """The newest Triton on the package index (pip's resolver, nothing installed)."""
    done = _pip("install", "--dry-run", "--quiet", "--no-deps", "--ignore-installed", "--report", "-", "triton")
    try:
        return json.loads(done.stdout)["install"][0]["metadata"]["version"]
    except (ValueError, KeyError, IndexError):
        return None


def environment(spec: str) -> tuple[str, dict]:
    """(version, environment variables) for a Triton spec: a version, "newest" or "installed"."""
    import importlib.metadata

    installed = importlib.metadata.version("triton")
    version = installed if spec == "installed" else spec
    if spec == "newest":
        version = _newest()
        if version is None:
            cached = sorted(WORK.glob("triton-*"))
            version = cached[-1].name.removeprefix("triton-") if cached else installed
            print(f"compile-check: no package index; the newest Triton at hand is {version}", file=sys.stderr)
    WORK.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.update(
        TRITON_INTERPRET="0",  # fastssl would pick the interpreter on a machine without CUDA
        TRITON_ALWAYS_COMPILE="1",  # so that ptxas runs and reports (results are cached here instead)
        TRITON_DUMP_PTXAS_LOG="1",
        TRITON_DEFAULT_FP_FUSION="1",  # Triton's default, said explicitly (3.9 warns otherwise)
        TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="triton-cache-", dir=WORK),  # removed after the run
        COMPILE_CHECK_CACHE=str(WORK / f"results-{version}.json"),
        OMP_WAIT_POLICY="PASSIVE",
    )
    if version != installed:
        target = WORK / f"triton-{version}"
        if not (target / "triton").is_dir():
            print(f"compile-check: installing triton=={version} into {target}", flush=True)
            done = _pip("install", "--quiet", "--no-deps", "--target", str(target), f"triton=={version}")
            if done.returncode:
                raise SystemExit(f"compile-check: pip could not install triton=={version}:\n{done.stderr[-2000:]}")
        env["PYTHONPATH"] = str(target)
    return version, env


ARCHS = [90, 80]
LIST_ONLY = False
ONLY: list[str] = []  # --only: compile just the kernels whose module.name contains one of these


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--triton", action="append", help=f"a version, 'newest' or 'installed' (default: {OLDEST} and newest)"
    )
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT), help="default: 90 and 80")
    parser.add_argument("--list", action="store_true", help="count the variants, compile nothing")
    parser.add_argument("--only", action="append", default=[], help="kernels whose module.name has this (repeatable)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arch:
        ARCHS[:] = args.arch
    if args.child:
        global LIST_ONLY
        LIST_ONLY = args.list
        ONLY[:] = args.only
        return child(args.jobs)
    failed = []
    seen = set()
    for spec in args.triton or [OLDEST, "newest"]:
        version, env = environment(spec)
        if version in seen:
            os.rmdir(env["TRITON_CACHE_DIR"])
            continue
        seen.add(version)
        cmd = [sys.executable, __file__, "--child", "--jobs", str(args.jobs)]
        cmd += [f"--arch={a}" for a in ARCHS] + (["--list"] if args.list else [])
        cmd += [f"--only={o}" for o in args.only]
        print(f"== Triton {version}", flush=True)
        if subprocess.run(cmd, env=env, cwd=ROOT).returncode:
            failed.append(version)
        shutil.rmtree(env["TRITON_CACHE_DIR"], ignore_errors=True)
    if failed:
        print(f"compile-check FAILED under Triton {', '.join(failed)}")
        return 1
    print("compile-check passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
