"""A base model's config.json whose ``architectures`` is not a list (hand-edited or damaged) reads as naming none: it
only informs names and the base architecture, so it must not end a read in a TypeError (found reading the code after
the fuzzers found the same in bank metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from adapterpack.errors import ConversionError
from adapterpack.formats.gguf import read_gguf
from adapterpack.formats.llm_names import base_modules

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("archs", [5, "LlamaForCausalLM", {"a": 1}, None])
def test_base_modules_with_odd_architectures(tmp_path: Path, archs: object) -> None:
    save_file({"model.layers.0.self_attn.q_proj.weight": np.zeros((4, 4), np.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": archs}))
    names = base_modules(tmp_path)
    assert "model.layers.0.self_attn.q_proj" in names and "lm_head" not in names


@pytest.mark.parametrize("archs", [5, {"a": 1}])
def test_read_gguf_with_a_base_whose_architectures_is_not_a_list(tmp_path: Path, archs: object) -> None:
    """The head counts come from the same config: with no architecture it names, the read is refused as unsupported."""
    gguf = sorted(DATA.rglob("*.gguf"))[0]
    (tmp_path / "config.json").write_text(json.dumps({"architectures": archs}))
    with pytest.raises(ConversionError, match=r"architectures \[\]; the gguf export supports"):
        read_gguf(gguf, base=tmp_path)
