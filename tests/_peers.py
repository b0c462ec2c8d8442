"""Peers imported for comparison. lightly's loss modules import torchvision for names the losses
never call, so without torchvision a stub package stands in for it during that import."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


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


def lightly_loss() -> types.ModuleType:
    """lightly.loss (ImportError when lightly is not installed)."""
    if importlib.util.find_spec("lightly") is None:
        raise ImportError("lightly is not installed (pip install --no-deps lightly)")
    finder = None if importlib.util.find_spec("torchvision") is not None else _StubTorchvision()
    if finder is not None:
        sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("lightly.loss")
    finally:
        if finder is not None:
            sys.meta_path.remove(finder)
