"""Importing optional libraries whose registry wheels do not always match the installed torch.

PyPI's torchvision wheels are CUDA builds. Beside a CPU build of torch their compiled extension
(`torchvision._C`) does not load, so the detection/ROI operators it would register are missing —
and `import torchvision` then fails outright, because its fake-tensor registration for `nms`
assumes the operator exists. Nothing quantlens uses (classification backbones, ViTs, timm models)
needs those operators; only the import is in the way. `import_torchvision()` retries the import
with the two operator *schemas* declared (no kernels: calling `torchvision.ops.nms` still fails
with torch's own "no kernel" error, which is the truth). Where the extension loads — the usual case
on a user's machine — the first import succeeds and nothing is declared.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_declared: list[torch.library.Library] = []  # kept alive: a Library drops its definitions when collected


def import_torchvision() -> ModuleType:
    """`import torchvision`, tolerating a compiled extension built for another torch (see module doc).

    ImportError (torchvision not installed) and any other failure propagate unchanged."""
    try:
        import torchvision
        return torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc) or "does not exist" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported package, so that the retry runs it again
    if not _declared:
        library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            library.define(schema)
        _declared.append(library)
    import torchvision
    return torchvision


def import_timm() -> ModuleType:
    """`import timm` (which imports torchvision) with the same tolerance."""
    import_torchvision()
    import timm
    return timm


class _GuardedTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Turns the first `import torchvision` (wherever it happens: a user's file, transformers, timm)
    into `import_torchvision()`, so the tolerance costs nothing until torchvision is really wanted
    (importing it takes seconds, which a user whose model does not need it should not pay)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision" or "torchvision" in sys.modules:
            return None
        remove_torchvision_guard()
        module = import_torchvision()
        self._spec = module.__spec__
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec):
        return sys.modules["torchvision"]  # already imported by find_spec

    def exec_module(self, module):
        module.__spec__ = self._spec  # the import system stamped ours on it; torchvision's own is the truth


_guard = _GuardedTorchvision()


def guard_torchvision_import() -> None:
    """From now on, a plain `import torchvision` tolerates a mismatched compiled extension, as
    `import_torchvision()` does; nothing is imported now. Idempotent."""
    if "torchvision" not in sys.modules and _guard not in sys.meta_path:
        sys.meta_path.insert(0, _guard)


def remove_torchvision_guard() -> None:
    if _guard in sys.meta_path:
        sys.meta_path.remove(_guard)
