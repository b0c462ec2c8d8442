"""Peer implementations, loaded for comparison without their packages' heavy imports.

open_clip's and lightly's loss modules need only torch, but their packages' ``__init__`` pull in
torchvision and more (a torchvision from PyPI beside the CPU torch breaks, or drags in a CUDA torch).
So the parent packages are entered as bare namespaces (their ``__path__`` only, ``__init__`` never
run), and while the loss modules import, a stub torchvision stands in for the names they import but
the losses never call.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import pytest


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


class _StubTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] == "torchvision":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__, module.__version__ = [], "0.0"
        return module

    def exec_module(self, module):
        pass


@contextlib.contextmanager
def _torchvision_stub():
    """A stub torchvision on the import path, unless a real one is installed."""
    finder = None if importlib.util.find_spec("torchvision") is not None else _StubTorchvision()
    if finder is not None:
        sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        if finder is not None:
            sys.meta_path.remove(finder)


def _bare_package(name: str) -> None:
    """`name` (and its parents) in sys.modules as packages whose __init__ never ran."""
    if name in sys.modules:
        return
    parent, _, last = name.rpartition(".")
    if parent:
        _bare_package(parent)
        path = [p + "/" + last for p in sys.modules[parent].__path__]
    else:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None:
            pytest.skip(f"{name} is not installed (pip install --no-deps {name})")
        path = list(spec.submodule_search_locations)
    module = types.ModuleType(name)
    module.__path__ = path
    sys.modules[name] = module


def peer(module: str) -> types.ModuleType:
    """The module `module` (e.g. "open_clip.loss", "lightly.loss") of a peer package; the test is
    skipped when the package is not installed."""
    _bare_package(module.split(".")[0])
    with _torchvision_stub():
        return importlib.import_module(module)


def lightly_loss() -> types.ModuleType:
    """lightly.loss (every loss class of lightly)."""
    return peer("lightly.loss")
