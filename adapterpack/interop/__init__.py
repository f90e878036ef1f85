"""Other people's files ↔ our :class:`~adapterpack.Adapter`: PEFT folders, kohya files."""

from __future__ import annotations

import os

from ..adapter import Adapter
from .detect import detect_format


def read_any(path: str | os.PathLike[str], fmt: str | None = None) -> Adapter:
    """Read a PEFT folder or kohya file (``fmt`` as :func:`detect_format` names it)."""
    fmt = fmt or detect_format(path)
    if fmt == "peft":
        from .peft import read_peft

        return read_peft(path)
    if fmt == "kohya":
        from .kohya import read_kohya

        return read_kohya(path)
    from ..api import open as open_apack

    return open_apack(path)


__all__ = ["detect_format", "read_any"]
