"""AutoAttack: fastssl.autoattack (standard) against torchattacks' AutoAttack (standard), and APGD-T
alone; time, robust accuracy and the model's forward/backward passes.

    python benchmarks/bench_autoattack.py [--quick] [--B 64] [--providers fastssl torchattacks]

Models: "digits", a small CNN trained 4 epochs on sklearn's digits (8×8, ε = 0.1: robust accuracy
neither 0 nor 1), and "cifar", a CIFAR-shaped CNN (3×32×32, untrained, labels = its own clean
predictions, ε = 1/255). Providers: fastssl; torchattacks (its AutoAttack as users call it, whose
APGD, APGD-T and FAB default to 10 iterations); torchattacks-100 (its APGD, APGDT, FAB and Square
chained by its MultiAttack at auto-attack's settings: 100 iterations, 9 targets, 5000 queries).
APGD-T alone: fastssl.apgd_attack(targeted=True) against torchattacks' APGDT, both at 100 steps
and 9 targets. Each row's note holds the robust accuracy and the passes counted by a wrapper
(forward calls, backward calls, rows through the model). CPU targets, one run: fastssl ≥ 2× faster
than torchattacks' AutoAttack at a robust accuracy ≤ theirs + 0.5 points; APGD-T ≥ 3× faster.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import Case, sweep_main, verdict

OP = "autoattack"
PROVIDERS = ("fastssl", "torchattacks", "torchattacks-100")
MODES = ("digits-standard", "digits-apgd-t", "cifar-standard", "cifar-apgd-t")
EPS = {"digits": 0.1, "cifar": 1 / 255}
TARGETS = {"standard": 0.5, "apgd-t": 1 / 3}  # fastssl time / torchattacks time
ACCURACY_SLACK = 0.005  # robust accuracy may exceed torchattacks' by at most 0.5 points


class Counted(torch.nn.Module):
    """The model, counting forward calls, backward calls (a hook on the output) and rows."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.forwards, self.backwards, self.rows = model, 0, 0, 0

    def forward(self, x):
        out = self.model(x)
        self.forwards, self.rows = self.forwards + 1, self.rows + len(x)
        if out.requires_grad:
            out.register_hook(self._backward)
        return out

    def _backward(self, grad):
        self.backwards += 1


def digits_classifier(b: int):
    """(model, x, y): a CNN trained 4 epochs on 1500 of sklearn's digits (8×8, in [0, 1]), in eval mode,
    and b held-out points (tests/test_autoattack.py uses it too)."""
    from sklearn.datasets import load_digits
    from torch import nn

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 32), nn.ReLU(),
        nn.Linear(32, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(4):
        perm = torch.randperm(1500)
        for i in range(0, 1500, 100):
            idx = perm[i : i + 100]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), x[1500 : 1500 + b], y[1500 : 1500 + b]


def _cifar(b: int):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    ).eval()  # fmt: skip
    x = torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def _attack(provider: str, kind: str, model, x, y, eps: float):
    import fastssl

    if provider == "fastssl":
        if kind == "standard":
            return lambda: fastssl.autoattack(model, x, y, eps=eps, progress=False,
                                              generator=torch.Generator().manual_seed(0))[0]  # fmt: skip
        return lambda: fastssl.apgd_attack(model, x, y, eps=eps, targeted=True,
                                           generator=torch.Generator().manual_seed(0))[0]  # fmt: skip
    import torchattacks

    if kind == "apgd-t":
        return torchattacks.APGDT(model, eps=eps, steps=100, n_classes=10, seed=0)
    if provider == "torchattacks":
        return torchattacks.AutoAttack(model, eps=eps, version="standard", n_classes=10, seed=0)
    return torchattacks.MultiAttack([
        torchattacks.APGD(model, eps=eps, steps=100, loss="ce", seed=0),
        torchattacks.APGDT(model, eps=eps, steps=100, n_classes=10, seed=0),
        torchattacks.FAB(model, eps=eps, steps=100, multi_targeted=True, n_classes=10, seed=0),
        torchattacks.Square(model, eps=eps, n_queries=5000, resc_schedule=False, seed=0),
    ])  # fmt: skip


def make_case(provider: str, mode: str, b: int) -> Case:
    data, kind = mode.split("-", 1)

    def build():
        model, x, y = (digits_classifier if data == "digits" else _cifar)(b)
        counted = Counted(model).eval()
        attack = _attack(provider, kind, counted, x, y, EPS[data])

        def run():
            counted.forwards = counted.backwards = counted.rows = 0
            x_adv = attack() if provider == "fastssl" else attack(x, y)
            calls = (counted.forwards, counted.backwards, counted.rows)
            with torch.no_grad():
                robust = (model(x_adv).argmax(1) == y).double().mean().item()
            run.note = f"robust={robust:.4f},forwards={calls[0]},backwards={calls[1]},rows={calls[2]}"

        run.note = ""
        return run

    return Case(provider, mode, torch.float32, {"B": b}, build, note=f"eps={EPS[data]:.4g}", min_reps=1)


def cases(quick: bool, device: str, batch=None, providers=PROVIDERS, modes=None) -> list[Case]:
    """Every mode of MODES (the harness's --modes, forward/backward, does not apply here)."""
    sizes = batch or ([32] if quick else [64])
    out = []
    for mode in MODES:
        names = [p for p in providers if not (mode.endswith("apgd-t") and p == "torchattacks-100")]
        out += [make_case(p, mode, b if mode.startswith("digits") else max(b // 4, 1)) for p in names for b in sizes]
    return out


def _fields(row: dict) -> dict:
    return dict(kv.split("=") for kv in row["note"].split(",") if "=" in kv)


def check_targets(rows: list[dict]) -> None:
    """fastssl against torchattacks per (mode, shape): time ratio and robust accuracy."""
    ok = {(r["provider"], r["mode"], r["shape"]): r for r in rows if r.get("status") == "ok"}
    for (provider, mode, shape), fs in ok.items():
        if provider != "fastssl":
            continue
        for peer in ("torchattacks", "torchattacks-100"):
            th = ok.get((peer, mode, shape))
            if not th:
                continue
            a_fs, a_th = float(_fields(fs)["robust"]), float(_fields(th)["robust"])
            target = TARGETS[mode.split("-", 1)[1]]
            acc = "PASS" if a_fs <= a_th + ACCURACY_SLACK else "MISS"
            print(f"target {mode} {shape} vs {peer}: {verdict('time', fs['median_ms'] / th['median_ms'], target)}; "
                  f"robust accuracy {a_fs:.4f} vs {a_th:.4f} (want <= +{ACCURACY_SLACK}) {acc}")  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    return sweep_main(OP, __doc__, {"B": "points attacked (digits; cifar runs B/4)"}, PROVIDERS, cases, check_targets,
                      argv)  # fmt: skip


if __name__ == "__main__":
    main()
