"""The top-level functions: ``open`` any adapter lazily, ``save`` one as .apack."""

from __future__ import annotations

import os
from collections.abc import Sequence

from adapterpack.adapter import Adapter
from adapterpack.codecs import DEFAULT_CODEC
from adapterpack.container.writer import WriteResult, write_apack
from adapterpack.encodings.lower import adapter_at_rank
from adapterpack.formats import read_any


def open(
    path: str | os.PathLike[str],
    *,
    adapter: str | None = None,
    verify: bool = True,
    rank: int | None = None,
    base: str | os.PathLike[str] | None = None,
) -> Adapter:
    """Open an adapter lazily: ``.apack`` (mmap; reads only the modules asked for), a PEFT
    folder, a kohya or diffusers ``.safetensors`` file or a llama.cpp LoRA ``.gguf`` (``base``: the base
    model's GGUF file or config.json, for llama.cpp's q/k row order; our own GGUF files record it).
    ``adapter`` names one adapter of a multi-adapter file (the other formats hold one, ``"default"``;
    another name is refused);
    ``verify`` checks each ``.apack`` blob's CRC-32C the first time it is read.

    ``rank`` caps every module's rank at the best approximation of that rank: ``svd`` records
    are cut to a prefix of their tensors (a raw blob is read up to its next prefix checkpoint,
    whose CRC is checked; a blob without checkpoints is read whole), other records by an exact
    SVD of their factors (which reads them)."""
    opened = read_any(path, adapter=adapter, verify=verify, base=base)
    if rank is None:
        return opened
    try:
        return adapter_at_rank(opened, rank)
    except BaseException:
        opened.close()
        raise


def save(
    adapters: Adapter | Sequence[Adapter],
    path: str | os.PathLike[str],
    *,
    codec: str = DEFAULT_CODEC,
    level: int | None = None,
) -> WriteResult:
    """Write one or more adapters to an ``.apack`` file atomically (see :func:`write_apack`)."""
    return write_apack(path, adapters, codec=codec, level=level)
