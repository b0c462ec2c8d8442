"""`fastssl selftest`: every op on every backend of one device against the reference.

Small shapes, forward and backward, each dtype the op takes. A GPU user runs it first
(`python -m fastssl selftest --device cuda:0`): a kernel that does not compile, launches on the
wrong device or computes a wrong number shows up as a FAIL row, and the exit status is non-zero.

CASES is the registry: one `Case` per op and option that reaches a different kernel. A new op adds
its entries there; `scripts/compile_check.py` runs the same cases at large shapes to collect the
Triton launches the host code makes.

A case's `build(device, dtype, size)` makes its inputs (from a fixed seed, already rounded to
`dtype`) and returns `run(impl)`, which calls the public function with that `impl` and returns the
outputs followed by the gradients of a fixed weighted sum of them. The reference is
`run(case.reference)` on fp64 copies of the same inputs, so the error measured is the kernel's
arithmetic, not the rounding of the inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl import _ext

FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Error allowed, relative to each output's largest magnitude: fp64 and fp32 kernels are accurate to
# their precision (fp32 through tf32x3, docs/design.md "Tile kernels"); 16-bit tiles enter the dot
# products in their own dtype, and the softmax weights are cast to it in the backward.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclasses.dataclass(frozen=True)
class Size:
    """The shape knobs a case reads: `rows` (batch rows, tokens) and `dim` (features, patch size)."""

    rows: int = 24
    dim: int = 20


Run = Callable[[str], Sequence[Tensor]]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # the public function, then "/option"
    build: Callable[[torch.device, torch.dtype, Size], Run]
    dtypes: tuple[torch.dtype, ...] = FLOATS
    reference: str = "reference"
    impls: tuple[str, ...] = ("cpp", "triton", "cuda")
    tolerance: float | None = None  # instead of TOLERANCE[dtype]: for ops that compute in one dtype


# While the fp64 reference inputs are built: the dtype they are first rounded to (see run_case).
_ROUND: list[torch.dtype] = []


def _round(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in `dtype`, through the kernel's dtype when building the reference's fp64 inputs."""
    return t.to(_ROUND[-1] if _ROUND else dtype).to(dtype)


def _randn(*shape, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return _round(torch.randn(*shape, generator=gen, dtype=torch.float64), dtype).to(device)


def _with_grads(fn: Callable[[str, list[Tensor]], Tensor | Sequence[Tensor]], inputs: list[Tensor]) -> Run:
    """run(impl): fn(impl, fresh leaf copies of inputs) and the gradients of Σ w·out over the
    floating inputs (w a fixed ramp, so that every output element and its position matter)."""

    def run(impl: str) -> list[Tensor]:
        leaves = [t.detach().clone().requires_grad_(t.dtype.is_floating_point) for t in inputs]
        out = fn(impl, leaves)
        outs = [out] if isinstance(out, Tensor) else list(out)
        total = sum(
            (o.double() * torch.linspace(0.5, 1.5, o.numel(), device=o.device, dtype=torch.float64).view_as(o)).sum()
            for o in outs
            if o.requires_grad
        )
        wrt = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(total, wrt, allow_unused=True) if torch.is_tensor(total) else ()
        return [o.detach() for o in outs] + [g for g in grads if g is not None]

    return run


def _contrastive(op: str, labels: bool = False, negatives: bool = False, **kw):
    def build(device, dtype, size):
        import fastssl

        fn = getattr(fastssl, op)
        z = [_randn(size.rows, size.dim, device=device, dtype=dtype, seed=s) for s in (1, 2)]
        if labels:  # SupCon: both views in one [N, D], five classes
            y = torch.arange(2 * size.rows, device=device) % 5
            return _with_grads(lambda impl, t: fn(torch.cat(t), labels=y, impl=impl, **kw), z)
        if negatives:  # a MoCo queue of 2·rows extra negatives
            z.append(_randn(2 * size.rows, size.dim, device=device, dtype=dtype, seed=3))
            return _with_grads(lambda impl, t: fn(t[0], t[1], negatives=t[2], impl=impl, **kw), z)
        return _with_grads(lambda impl, t: fn(t[0], t[1], impl=impl, **kw), z)

    return build


def _mochi(which: str):
    """MoCHi's logits or per-query losses for a fixed draw. The public functions draw positions in
    each query's hard set, whose order differs between backends (see mochi_logits), so the draw is
    fixed here: queue indices and weights that every backend mixes alike."""

    def build(device, dtype, size):
        from fastssl.ops import mochi

        b, k, n_mix, n_query = size.rows, 2 * size.rows + 3, 6, 2
        gen = torch.Generator().manual_seed(4)
        first = torch.randint(k, (b, n_mix + n_query), generator=gen)
        first[:, n_mix:] = -1  # the query itself (docs/design.md, "MoCHi")
        second = (first.clamp(min=0) + 1 + torch.randint(k - 1, (b, n_mix + n_query), generator=gen)) % k
        weight = torch.rand(b, n_mix + n_query, generator=gen, dtype=torch.float64)
        weight[:, n_mix:] *= 0.5
        draw_ = tuple(t.to(device) for t in (first, second, weight))
        q, key = (_randn(b, size.dim, device=device, dtype=dtype, seed=s) for s in (1, 2))
        queue = _randn(k, size.dim, device=device, dtype=dtype, seed=3)
        fn = mochi._logits if which == "logits" else mochi._loss_rows

        def call(impl, t):
            return fn(t[0], t[1], queue.to(t[0].dtype), k, lambda b, n: draw_, 5.0, impl)  # n = k: positions are rows

        return _with_grads(call, [q, key])

    return build


def _random_masking(device, dtype, size):
    import fastssl

    x = _randn(3, size.rows, size.dim, device=device, dtype=dtype, seed=1)

    def call(impl, t):
        gen = torch.Generator(device=device).manual_seed(5)
        return fastssl.random_masking(t[0], 0.75, generator=gen, num_prefix_tokens=1, impl=impl)

    return _with_grads(call, [x])


def _unshuffle(device, dtype, size):
    import fastssl

    b, n, keep = 3, size.rows, size.rows // 4
    ids = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i)) for i in range(b)]).to(device)
    visible = _randn(b, 1 + keep, size.dim, device=device, dtype=dtype, seed=1)
    token = _randn(size.dim, device=device, dtype=dtype, seed=2)
    call = lambda impl, t: fastssl.unshuffle(t[0], ids, t[1], num_prefix_tokens=1, impl=impl)
    return _with_grads(call, [visible, token])


def _masked_mse(norm_pix: bool):
    def build(device, dtype, size):
        import fastssl

        pred, target = (_randn(3, size.rows, size.dim, device=device, dtype=dtype, seed=s) for s in (1, 2))
        mask = (torch.rand(3, size.rows, generator=torch.Generator().manual_seed(3)) < 0.75).to(device)
        mask[0, 0] = True
        return _with_grads(
            lambda impl, t: fastssl.masked_mse_loss(t[0], target, mask, norm_pix=norm_pix, impl=impl), [pred]
        )

    return build


def _pgd(norm: str):
    def build(device, dtype, size):
        import fastssl

        shape = (4, size.rows, size.dim)
        x0 = _round(_randn(*shape, device=device, dtype=dtype, seed=1).double().sigmoid(), dtype)
        x = _round((x0.double() + 0.02 * _randn(*shape, device=device, dtype=dtype, seed=2)).clamp(0, 1), dtype)
        g = _randn(*shape, device=device, dtype=dtype, seed=3)
        eps = torch.tensor([0.03, 0.05, 0.1, 0.0], dtype=torch.float64, device=device)

        def run(impl):
            return [fastssl.pgd_step_(x.clone(), g, x0, eps=eps, alpha=0.01, norm=norm, impl=impl)]

        return run

    return build


def _prototypes(op: str, **kw):
    """DINO (crop-major student [4·B, d], teacher [2B, d]), iBOT (masked tokens [M, d], weighted) or
    SwAV (codes from Sinkhorn over a queue and the assigned crops) with K = rows + 5 prototypes:
    several K tiles, one or several D chunks (docs/design.md, "DINO, iBOT and SwAV prototype losses")."""

    def build(device, dtype, size):
        import fastssl

        b, k, d = 3, size.rows + 5, size.dim
        gen = torch.Generator().manual_seed(6)

        def rand(*shape):  # unit rows
            x = torch.randn(*shape, generator=gen, dtype=torch.float64)
            return _round(F.normalize(x, dim=1), dtype).to(device)

        if op == "swav":
            z, prototypes, queue = rand(4 * b, d), rand(k, d), rand(2 * b, d)
            call = lambda impl, x: fastssl.swav_loss(x[0], x[1], n_crops=4, queue=queue, impl=impl, **kw)
            return _with_grads(call, [z, prototypes])
        # unit rows and prototypes, as DINO's head and its weight-normalised last layer give: |t| ≤ 1,
        # within the fp32 range of Sinkhorn's exp(t/τ − max) for every prototype
        rows = 4 * b
        student, teacher = rand(rows, d), rand(rows if op == "ibot" else 2 * b, d)
        weight, teacher_weight = rand(k, d), rand(k, d)
        center = 0.3 * torch.randn(k, generator=gen, dtype=torch.float64).to(device)
        extra = {}
        if op == "ibot":  # DINOv2's masks_weight: 1/(masked tokens of the token's image), 3 images
            extra = dict(token_weights=torch.linspace(0.2, 1.0, rows, dtype=torch.float64, device=device), n_images=3)
        fn = fastssl.ibot_loss if op == "ibot" else fastssl.dino_loss
        call = lambda impl, x: fn(x[0], teacher, x[1], teacher_weight, center, impl=impl, **kw, **extra)
        return _with_grads(call, [student, weight])

    return build


def _knn_search(device, dtype, size):
    import fastssl

    train = _randn(4 * size.rows, size.dim, device=device, dtype=dtype, seed=1)
    query = _randn(size.rows, size.dim, device=device, dtype=dtype, seed=2)
    return lambda impl: list(fastssl.knn_search(train, query, k=5, impl=impl))


CASES: list[Case] = [
    Case("nt_xent", _contrastive("nt_xent", temperature=0.5)),
    Case("nt_xent/tau=0.02", _contrastive("nt_xent", temperature=0.02)),
    Case("nt_xent/labels", _contrastive("nt_xent", temperature=0.5, labels=True)),
    Case("info_nce", _contrastive("info_nce", temperature=0.1)),
    Case("info_nce/symmetric", _contrastive("info_nce", temperature=0.1, symmetric=True)),
    Case("info_nce/negatives", _contrastive("info_nce", temperature=0.1, negatives=True)),
    Case("info_nce/tau=0.02", _contrastive("info_nce", temperature=0.02, symmetric=True)),
    Case("dcl_loss", _contrastive("dcl_loss", temperature=0.1, sigma=0.5)),
    Case("siglip_loss", _contrastive("siglip_loss", scale=10.0, bias=-10.0)),
    Case("mochi_logits", _mochi("logits")),
    Case("mochi_loss", _mochi("loss")),
    Case("random_masking", _random_masking),
    Case("unshuffle", _unshuffle),
    Case("masked_mse_loss", _masked_mse(False)),
    Case("masked_mse_loss/norm_pix", _masked_mse(True)),
    Case("pgd_step_/linf", _pgd("linf")),
    Case("pgd_step_/l2", _pgd("l2")),
    Case("dino_loss", _prototypes("dino", centering="center")),
    Case("dino_loss/sinkhorn", _prototypes("dino", centering="sinkhorn")),
    Case("dino_loss/none", _prototypes("dino", centering="none")),
    Case("ibot_loss", _prototypes("ibot", centering="center")),
    Case("ibot_loss/sinkhorn", _prototypes("ibot", centering="sinkhorn")),
    Case("swav_loss", _prototypes("swav")),
    Case(  # searched in fp32 by all
        "knn_search",
        _knn_search,
        (torch.float64, torch.float32),
        reference="torch",
        impls=("cpp", "faiss"),
        tolerance=1e-6,
    ),
]


def backends(device: torch.device) -> list[str]:
    """The kernel backends that can run on `device` here."""
    if device.type == "cuda":
        found = ["triton"] if _ext.triton_error() is None else []
        return found + (["cuda"] if _ext.CUDA_ERROR is None else [])
    found = ["cpp"] if _ext.CPP_ERROR is None else []
    return found + (["triton"] if _ext.triton_error() is None and _ext.triton_mode().startswith("interp") else [])


def _error(out: Sequence[Tensor], ref: Sequence[Tensor]) -> float:
    """The largest error over the outputs, each relative to its reference's largest magnitude;
    integer outputs must match exactly (the fraction that differ)."""
    if len(out) != len(ref):
        return float("inf")
    worst = 0.0
    for o, r in zip(out, ref, strict=True):
        if o.shape != r.shape:
            return float("inf")
        o, r = o.detach().cpu(), r.detach().cpu()
        if not r.dtype.is_floating_point:
            worst = max(worst, (o != r).double().mean().item() if r.numel() else 0.0)
            continue
        o, r = o.double(), r.double()
        if not torch.equal(o.isnan(), r.isnan()):
            return float("inf")
        scale = r.nan_to_num().abs().max().item() if r.numel() else 0.0
        diff = (o - r).nan_to_num().abs().max().item() if r.numel() else 0.0
        worst = max(worst, diff / max(scale, 1e-30))
    return worst


@dataclasses.dataclass
class Row:
    op: str
    backend: str
    dtype: str
    error: float | None
    tolerance: float
    status: str  # "ok", "FAIL" or "n/a" (the backend has no kernel for this op)
    ms: float
    detail: str = ""


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, device: torch.device, dtype: torch.dtype, impls: Sequence[str], size: Size) -> list[Row]:
    """Rows of one case and dtype, one per backend, against fp64 reference outputs."""
    name = str(dtype).removeprefix("torch.")
    tol = case.tolerance or TOLERANCE[dtype]
    try:
        _ROUND.append(dtype)
        try:
            ref = case.build(device, torch.float64, size)(case.reference)
        finally:
            _ROUND.pop()
        ref = [r.double() if r.dtype.is_floating_point else r for r in ref]
        run = case.build(device, dtype, size)
    except Exception as exc:  # a broken reference fails every row of the case
        return [Row(case.name, case.reference, name, None, tol, "FAIL", 0.0, f"reference: {exc!r}")]
    rows = []
    for impl in impls:
        start = time.perf_counter()
        try:
            out = run(impl)
            _synchronize(device)
        except NotImplementedError as exc:  # _ext.kernel: this op has no kernel on that backend
            rows.append(Row(case.name, impl, name, None, tol, "n/a", 0.0, str(exc)))
            continue
        except Exception as exc:
            rows.append(Row(case.name, impl, name, None, tol, "FAIL", 0.0, f"{type(exc).__name__}: {exc}"))
            continue
        ms = 1e3 * (time.perf_counter() - start)
        err = _error(out, ref)
        rows.append(Row(case.name, impl, name, err, tol, "ok" if err <= tol else "FAIL", ms))
    return rows


def selftest(device: torch.device, *, quick: bool = False, cases: Sequence[Case] = CASES) -> list[Row]:
    """Every case on every backend available on `device`. `quick`: fp64 only, the tightest check
    (the other dtypes run the same kernels with other dtype switches)."""
    torch.manual_seed(0)
    found = backends(device)
    rows = []
    for case in cases:
        impls = [i for i in case.impls if i in found or i in ("faiss",)]
        dtypes = [d for d in case.dtypes if not quick or d == torch.float64]
        for dtype in dtypes:
            rows.extend(run_case(case, device, dtype, impls, Size()))
    return rows


def table(rows: Sequence[Row]) -> str:
    head = f"{'op':26s} {'backend':8s} {'dtype':9s} {'max error':>10s} {'tolerance':>10s} {'status':6s} {'ms':>8s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        err = "-" if r.error is None else f"{r.error:.2e}"
        line = f"{r.op:26s} {r.backend:8s} {r.dtype:9s} {err:>10s} {r.tolerance:10.0e} {r.status:6s} {r.ms:8.1f}"
        lines.append(line + (f"  {r.detail[:200]}" if r.status == "FAIL" and r.detail else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastssl selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fp64 only")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"fastssl selftest: no CUDA device here for --device {args.device}")
    print(f"fastssl selftest on {device}: backends {', '.join(backends(device)) or 'none'}", flush=True)
    rows = selftest(device, quick=args.quick)
    text = table(rows)
    failed = sum(r.status == "FAIL" for r in rows)
    text += f"\n{len(rows)} rows, {failed} failed"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if failed else 0
