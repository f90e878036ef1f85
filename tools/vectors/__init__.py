"""Golden vectors of the encodings added after 1.0, one module per encoding.

Each module ``tools/vectors/<name>.py`` defines

``build(readable, refused)``, which writes its vectors through the two callbacks of
:func:`tools.make_vectors.build` (same signatures as there). ``tools/make_vectors.py`` discovers
the modules; adding an encoding's vectors is one new module here, and its ΔW formula one function
in :mod:`tools.vectors._reference` (which computes every vector's ``delta`` from the JSON alone,
without the library, so ``tests/test_vectors.py`` checks the library against the spec rather than
against itself).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def modules() -> list[ModuleType]:
    """Every vector module in this package, sorted by name (so the output order is fixed)."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"{__name__}.{n}") for n in names]
