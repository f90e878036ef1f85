"""Which format a path holds: .apack, PEFT folder, kohya or diffusers single file, llama.cpp LoRA GGUF."""

from __future__ import annotations

import os
from pathlib import Path

from adapterpack.container.preamble import MAGIC
from adapterpack.errors import UnrecognizedInputError
from adapterpack.formats.safetensors_header import safetensors_keys

#: A GGUF file's first four bytes.
GGUF_MAGIC = b"GGUF"
#: Every input adapterpack reads, as the unknown-format error lists them.
KNOWN = (
    ".apack files, PEFT adapter folders (adapter_config.json), kohya LoRA .safetensors files, "
    "diffusers LoRA .safetensors files and llama.cpp LoRA .gguf files"
)


def detect_format(path: str | os.PathLike[str]) -> str:
    """``"apack"``, ``"peft"``, ``"kohya"``, ``"diffusers"`` (component-prefixed keys: ``unet.….lora_A.weight``)
    or ``"gguf"`` (the GGUF magic); UnrecognizedInputError, naming every format read, otherwise."""
    p = Path(path)
    if p.is_dir():
        if (p / "adapter_config.json").is_file():
            return "peft"
        raise UnrecognizedInputError(f"{p}: folder has no adapter_config.json (not a PEFT adapter); adapterpack reads {KNOWN}")
    if not p.exists():
        raise UnrecognizedInputError(f"{p}: no such file or folder")
    with open(p, "rb") as f:
        head = f.read(8)
    if head == MAGIC or p.suffix == ".apack":
        return "apack"
    if head[:4] == GGUF_MAGIC:
        return "gguf"
    if p.suffix.lower() == ".gguf":
        raise UnrecognizedInputError(f"{p}: a .gguf file that does not start with the GGUF magic; adapterpack reads {KNOWN}")
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
    raise UnrecognizedInputError(f"{p}: not a format adapterpack reads ({KNOWN})")
