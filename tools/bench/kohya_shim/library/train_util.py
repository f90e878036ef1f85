"""``library.train_util`` stand-in: only what ``networks/resize_lora.py`` calls."""

from __future__ import annotations

from typing import Any


def precalculate_safetensors_hashes(state_dict: Any, metadata: Any) -> tuple[str, str]:
    """Placeholder (model hash, legacy hash) for the output's metadata.

    The real helper serializes the whole state dict and hashes it; skipping that only makes
    kohya's run shorter, so timings against it stay conservative.
    """
    return "0" * 64, "0" * 8
