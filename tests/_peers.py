"""Peer implementations loaded module by module: open_clip's and lightly's loss files import only
torch, but their packages' __init__ pull in torchvision and more, so the packages are entered as
bare namespaces (their __path__ only) and just the loss modules run."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def _bare_package(name: str) -> None:
    """`name` (and its parents) in sys.modules as packages whose __init__ never ran."""
    if name in sys.modules:
        return
    parent, _, _ = name.rpartition(".")
    if parent:
        _bare_package(parent)
        path = [p + "/" + name.rpartition(".")[2] for p in sys.modules[parent].__path__]
    else:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None:
            pytest.skip(f"{name} is not installed (pip install --no-deps {name})")
        path = list(spec.submodule_search_locations)
    module = types.ModuleType(name)
    module.__path__ = path
    sys.modules[name] = module


def peer(module: str):
    """The module `module` (e.g. "open_clip.loss", "lightly.loss.vicreg_loss") of a peer package."""
    _bare_package(module.rpartition(".")[0])
    return importlib.import_module(module)
