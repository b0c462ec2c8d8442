"""Every Triton launcher runs under its tensors' device (kernels/_launch.py, `launcher`;
docs/design.md, "Dispatch"), checked without a GPU by intercepting the device context.

The entry points are discovered (every public function of every fastssl.kernels module), so a new
kernel file is covered without touching this file."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import fastssl.kernels
import pytest
import torch
from fastssl.kernels import _launch
from triton.runtime.jit import KernelInterface

from fastssl import selftest


def _entry_points():
    found = []
    for info in pkgutil.iter_modules(fastssl.kernels.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"fastssl.kernels.{info.name}")
        for name, fn in vars(module).items():
            if inspect.isfunction(fn) and not name.startswith("_") and fn.__module__ == module.__name__:
                found.append(pytest.param(fn, id=f"{info.name}.{name}"))
    return found


ENTRY_POINTS = _entry_points()


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (what a launcher reads to pick the device)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


class _Entered(Exception):
    pass


class _RecordingCudaDevice:
    """Stands in for torch.cuda.device: entering it stops the call and says which device."""

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        raise _Entered(self.device)

    def __exit__(self, *exc):
        return False


def test_every_kernel_module_has_entry_points():
    modules = {p.id.split(".")[0] for p in ENTRY_POINTS}
    assert {"ntxent", "info_nce", "mochi", "masking", "pgd"} <= modules


@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_entry_point_is_a_launcher(fn):
    """Decorated with @launcher (functools.wraps keeps the kernel's name and signature)."""
    assert fn.__code__ is _launch.launcher(lambda: None).__code__, f"{fn.__qualname__} is not wrapped by @launcher"
    assert inspect.isfunction(fn.__wrapped__)


@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_entry_point_enters_its_tensors_device_first(fn, monkeypatch):
    """Called with tensors on cuda:1, the entry point makes cuda:1 current before anything else runs
    (in particular before any kernel launch)."""
    monkeypatch.setattr(torch.cuda, "device", _RecordingCudaDevice)
    n = len(inspect.signature(fn.__wrapped__).parameters)
    args = [torch.zeros(2, 2).as_subclass(_OnCuda1) for _ in range(n)]
    with pytest.raises(_Entered) as entered:
        fn(*args)
    assert entered.value.args[0] == torch.device("cuda", 1)


def test_on_device_makes_the_tensors_device_current(monkeypatch):
    entered = []

    class Recording(_RecordingCudaDevice):
        def __enter__(self):
            entered.append(self.device)

    monkeypatch.setattr(torch.cuda, "device", Recording)
    with _launch.on_device(torch.device("cuda", 1)):
        pass
    with _launch.on_device(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


_SMALL = selftest.Size(rows=16, dim=16)


@pytest.mark.parametrize("case", [c for c in selftest.CASES if "triton" in c.impls], ids=lambda c: c.name)
def test_every_launch_runs_inside_the_device_context(case, monkeypatch):
    """Each op's kernel launches (not run: the launch is intercepted) happen while its entry point
    holds the device context of the launch's tensors, for every case of fastssl/selftest.py."""
    held, launches = [], []

    def on_device(device):
        class Held:
            def __enter__(self):
                held.append(device)

            def __exit__(self, *exc):
                held.pop()

        return Held()

    def launch(kernel, grid):
        def record(*args, **kwargs):
            devices = {a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
            launches.append((kernel, list(held), devices))

        return record

    monkeypatch.setattr(_launch, "on_device", on_device)
    monkeypatch.setattr(KernelInterface, "__getitem__", launch)
    case.build(torch.device("cpu"), torch.float64, _SMALL)("triton")
    assert launches, f"{case.name}: no Triton launch"
    for kernel, contexts, devices in launches:
        assert contexts and set(contexts[-1:]) == devices, f"{kernel} launched under {contexts}, tensors on {devices}"
