"""The .apack container: preamble, JSON index, aligned blobs. Knows bytes and JSON, not LoRA."""

from __future__ import annotations

from adapterpack.container.preamble import MAGIC, MAJOR, MINOR, PREAMBLE_SIZE
from adapterpack.container.reader import ApackReader
from adapterpack.container.writer import write_apack

__all__ = ["MAGIC", "MAJOR", "MINOR", "PREAMBLE_SIZE", "ApackReader", "write_apack"]
