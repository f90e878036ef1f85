"""Which format a path holds: .apack, PEFT folder or kohya single file."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from ..container.preamble import MAGIC
from ..errors import UnrecognizedInputError

#: Largest safetensors header we read to sniff key names.
MAX_SAFETENSORS_HEADER = 100 << 20


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names in a safetensors file, read from its header only."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UnrecognizedInputError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_SAFETENSORS_HEADER or n > os.fstat(f.fileno()).st_size:
            raise UnrecognizedInputError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
            raise UnrecognizedInputError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise UnrecognizedInputError(f"{path}: not a safetensors file")
    return [k for k in header if k != "__metadata__"]


def detect_format(path: str | os.PathLike[str]) -> str:
    """``"apack"``, ``"peft"``, ``"kohya"`` or ``"diffusers"`` (component-prefixed keys: ``unet.….lora_A.weight``);
    UnrecognizedInputError otherwise."""
    p = Path(path)
    if p.is_dir():
        if (p / "adapter_config.json").is_file():
            return "peft"
        raise UnrecognizedInputError(f"{p}: folder has no adapter_config.json (not a PEFT adapter)")
    if not p.exists():
        raise UnrecognizedInputError(f"{p}: no such file or folder")
    with open(p, "rb") as f:
        head = f.read(8)
    if head == MAGIC or p.suffix == ".apack":
        return "apack"
    if p.suffix == ".safetensors":
        keys = safetensors_keys(p)
        if any(".lora_down" in k or ".lora_up" in k for k in keys):
            return "kohya"
        if any(".lora_A" in k or "lora_embedding_A" in k for k in keys) and (p.parent / "adapter_config.json").is_file():
            return "peft"
        from .diffusers import looks_like_diffusers

        if looks_like_diffusers(keys):
            return "diffusers"
        raise UnrecognizedInputError(f"{p}: safetensors file with no LoRA tensors (lora_down/lora_up or lora_A/lora_B)")
    if p.name == "adapter_config.json" or ((p.parent / "adapter_config.json").is_file() and p.suffix in (".bin", ".safetensors")):
        return "peft"
    raise UnrecognizedInputError(f"{p}: not an .apack file, PEFT adapter folder or kohya .safetensors file")
