"""Bit-exact comparisons of safetensors files and PEFT folders, shared by the interop tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open


def load_st(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str] | None]:
    """Every tensor of a safetensors file and its metadata."""
    with safe_open(path, framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def bits(arr: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    """dtype, shape and raw bytes: equal exactly when two arrays are bit-identical."""
    arr = np.asarray(arr)
    return str(arr.dtype), tuple(arr.shape), np.ascontiguousarray(arr).view(np.uint8).tobytes()


def assert_same_file(a: Path, b: Path) -> None:
    """Same key set, bit-identical tensors and the same metadata."""
    ta, ma = load_st(a)
    tb, mb = load_st(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert bits(ta[k]) == bits(tb[k]), k
    assert ma == mb


def assert_same_folder(a: Path, b: Path) -> None:
    """Two PEFT folders: :func:`assert_same_file` on the weights, equal config dicts."""
    assert_same_file(a / "adapter_model.safetensors", b / "adapter_model.safetensors")
    assert json.loads((a / "adapter_config.json").read_text()) == json.loads((b / "adapter_config.json").read_text())
