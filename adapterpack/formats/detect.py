"""Which format a path holds: .apack, PEFT folder or kohya single file."""

from __future__ import annotations

import os
from pathlib import Path

from adapterpack.container.preamble import MAGIC
from adapterpack.errors import UnrecognizedInputError
from adapterpack.formats.safetensors_header import safetensors_keys


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
        from adapterpack.formats.diffusers import looks_like_diffusers  # start-up: only a safetensors file that is not kohya/PEFT

        if looks_like_diffusers(keys):
            return "diffusers"
        raise UnrecognizedInputError(f"{p}: safetensors file with no LoRA tensors (lora_down/lora_up or lora_A/lora_B)")
    if p.name == "adapter_config.json" or ((p.parent / "adapter_config.json").is_file() and p.suffix in (".bin", ".safetensors")):
        return "peft"
    raise UnrecognizedInputError(f"{p}: not an .apack file, PEFT adapter folder or kohya .safetensors file")
