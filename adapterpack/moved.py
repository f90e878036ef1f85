"""Import paths that moved in 0.2, kept working (with a DeprecationWarning) for one minor version.

``import adapterpack.convert`` keeps working after ``convert`` moved to :mod:`adapterpack.ops.convert`:
a finder on ``sys.meta_path`` answers the old dotted names (and everything under a moved package) with
the module at its new path. The old name and the new one are the same module object, so
``isinstance`` checks, monkeypatching and ``from … import`` all see one module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

#: old dotted path → new dotted path; a package entry covers its submodules too.
MOVED: dict[str, str] = {
    "adapterpack.interop.targets": "adapterpack.formats.serving",
    "adapterpack.interop": "adapterpack.formats",
    "adapterpack.convert": "adapterpack.ops.convert",
    "adapterpack.rerank": "adapterpack.ops.rerank",
    "adapterpack.audit": "adapterpack.ops.audit",
    "adapterpack.report": "adapterpack.ops.report",
    "adapterpack.spectrum": "adapterpack.ops.spectrum",
    "adapterpack.importance": "adapterpack.ops.importance",
    "adapterpack.api": "adapterpack.ops.files",
    "adapterpack.linalg.nola_fit": "adapterpack.encodings.nola_fit",
    "adapterpack.encodings.factors": "adapterpack.factors",
    "adapterpack.torch.nola": "adapterpack.torch.fit.nola",
    "adapterpack.torch.importance": "adapterpack.torch.fit.fisher",
    "adapterpack.torch.nola_rng": "adapterpack.torch.rng",
}


def new_name(old: str) -> str | None:
    """The current dotted path of a module that was at ``old``, or None if it did not move."""
    for prefix, target in MOVED.items():
        if old == prefix or old.startswith(prefix + "."):
            return target + old[len(prefix) :]
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target
        self.spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self.spec  # the import system set the old name's spec on the shared module: undo


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        new = new_name(fullname) if fullname.startswith("adapterpack.") else None
        if new is None:
            return None
        message = f"{fullname} moved to {new}; the old path goes away in the next minor version"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        found = importlib.util.find_spec(new)
        if found is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(new), is_package=found.submodule_search_locations is not None)


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
