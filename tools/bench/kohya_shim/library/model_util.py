"""``library.model_util`` stand-in: only what ``networks/resize_lora.py`` calls."""

from __future__ import annotations

import os


def is_safetensors(path: str) -> bool:
    """True when ``path`` names a ``.safetensors`` file (by its extension)."""
    return os.path.splitext(path)[1].lower() == ".safetensors"
