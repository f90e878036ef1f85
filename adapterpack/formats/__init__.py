"""Other people's files ↔ our :class:`~adapterpack.Adapter`: PEFT folders, kohya and diffusers files, llama.cpp GGUF.

:func:`open_adapters` is the one way any input is opened: :func:`adapterpack.open`,
:func:`read_any`, ``convert`` and ``inspect`` all go through it, so they accept the same
inputs and refuse the same requests (an adapter name that is not there) the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterpack.adapter import Adapter
from adapterpack.container.reader import ApackReader
from adapterpack.errors import AdapterNotFoundError
from adapterpack.formats.detect import detect_format


@dataclass
class Opened:
    """Adapters read from one input, and the open reader behind them (``.apack`` only)."""

    path: Path
    format: str
    adapters: list[Adapter]
    reader: Any = None
    _close: Callable[[], None] | None = field(default=None, repr=False)

    def close(self) -> None:
        """Release the file (the adapters' lazy tensors can no longer be read)."""
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_adapters(
    path: str | os.PathLike[str],
    adapter: str | None = None,
    *,
    verify: bool = True,
    base: str | os.PathLike[str] | None = None,
) -> Opened:
    """Open any input: every adapter of an ``.apack`` file (or the one named ``adapter``), or the
    single adapter (``"default"``) of a PEFT folder, kohya, diffusers or GGUF file, refusing any other name.

    ``verify`` checks each ``.apack`` blob's CRC-32C when it is first read; the other formats
    carry no checksums, so it has nothing to check there. ``base`` (GGUF input only) is the base
    model's GGUF file or config.json, whose head counts put llama.cpp's q/k rows back in HF order.
    """
    p = Path(path)
    reader = ApackReader.open_if_apack(p, verify=verify)  # an .apack is opened once: detection reads its preamble
    fmt = "apack" if reader is not None else detect_format(p)
    if reader is not None:
        try:
            names = reader.adapter_names if adapter is None else [adapter]
            adapters = [reader.adapter(n) for n in names]
        except BaseException:
            reader.close()
            raise
        return Opened(p, fmt, adapters, reader, reader.close)
    if fmt == "peft":
        from adapterpack.formats.peft import read_peft  # start-up: inspect of an .apack does not import the other formats' readers

        a = read_peft(p)
    elif fmt == "diffusers":
        from adapterpack.formats.diffusers import read_diffusers  # start-up, as above (diffusers and sd_names too)

        a = read_diffusers(p)
    elif fmt == "gguf":
        from adapterpack.formats.gguf import read_gguf  # start-up, as above (and the gguf package)

        a = read_gguf(p, base=base)
    else:
        from adapterpack.formats.kohya import read_kohya  # start-up, as above

        a = read_kohya(p)
    if adapter is not None and adapter != a.name:
        a.close()
        raise AdapterNotFoundError(f"{p}: a {fmt} input holds one adapter, {a.name!r}, not {adapter!r}")
    return Opened(p, fmt, [a], None, a.close)


def read_any(
    path: str | os.PathLike[str], *, adapter: str | None = None, verify: bool = True, base: str | os.PathLike[str] | None = None
) -> Adapter:
    """One adapter from any input: the one named ``adapter``, else the only one (see :func:`open_adapters`)."""
    opened = open_adapters(path, adapter, verify=verify, base=base)
    if len(opened.adapters) != 1:
        opened.close()
        names = ", ".join(a.name for a in opened.adapters)
        raise AdapterNotFoundError(f"{opened.path}: holds {len(opened.adapters)} adapters ({names}); name one")
    return opened.adapters[0]


__all__ = ["Opened", "detect_format", "open_adapters", "read_any"]
