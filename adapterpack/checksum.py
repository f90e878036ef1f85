"""CRC-32C (Castagnoli), the spec's checksum (spec/format.md §8).

The ``crc32c`` package uses the CPU's CRC instruction (faster than a memcpy, and several times
zlib's CRC-32: ``python -m tools.bench.bench_checksum``, BENCHMARKS.md), so every blob can be
verified on every read. It is imported on the first call: its package import pulls in
``importlib.metadata`` and its CLI, which ``import adapterpack`` should not pay.
"""

from __future__ import annotations

from collections.abc import Callable

_impl: Callable[..., int] | None = None


def crc32c(data: bytes | memoryview, *, release: bool = False) -> int:
    """CRC-32C of ``data`` as an unsigned 32-bit int. ``release`` lets other threads run while it is computed,
    whatever the size (the package releases the GIL on its own only for large buffers)."""
    global _impl
    if _impl is None:
        from crc32c import crc32c as impl

        _impl = impl
    return _impl(data, gil_release_mode=1) if release else _impl(data)
