"""Golden vectors of the encodings added after 1.0, one module per encoding.

Each module ``tools/vectors/<name>.py`` defines

- ``build(readable, refused)``: writes its vectors through the two callbacks of
  :func:`tools.make_vectors.build` (same signatures as there), and
- ``reference_delta(module_json, array)``: ΔW of one module of its encoding computed from the
  vector's JSON alone, straight from the spec (``array(tensor_json)`` decodes a tensor entry), so
  ``tests/test_vectors.py`` checks the library against the spec rather than against itself.

``tools/make_vectors.py`` and the tests discover the modules; adding an encoding's vectors is one
new module here.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def modules() -> list[ModuleType]:
    """Every vector module in this package, sorted by name (so the output order is fixed)."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"{__name__}.{n}") for n in names]


def reference_deltas() -> dict[str, object]:
    """encoding id → its ``reference_delta`` (modules name their encoding in ``ENCODING``)."""
    return {m.ENCODING: m.reference_delta for m in modules() if hasattr(m, "reference_delta")}
