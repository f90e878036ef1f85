"""``adapterpack convert --to gguf`` and ``--target vllm`` through the CLI, checked against ΔW."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from click.testing import CliRunner

import adapterpack
from adapterpack.cli import main
from adapterpack.examples import example_path
from adapterpack.formats.peft import read_peft

EXAMPLE = example_path()


def _config(tmp_path: Path) -> Path:
    """The base model's config.json (the head counts llama.cpp's q/k row order needs): SmolLM2-135M's."""
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30}
        )
    )
    return cfg


def test_convert_to_gguf_and_vllm(tmp_path: Path) -> None:
    run = CliRunner().invoke
    r = run(main, ["convert", str(EXAMPLE), str(tmp_path / "a.gguf"), "--base", str(_config(tmp_path))])
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_v.weight.lora_a" in names and "blk.29.attn_output.weight.lora_b" in names
    assert str(bytes(reader.fields["general.type"].parts[-1]), "utf-8") == "adapter"
    # v_proj has no rotary reordering: ΔW = lora_b · lora_a · alpha/r with the scale baked into B
    t = {x.name: np.asarray(x.data, dtype=np.float64) for x in reader.tensors if x.name.startswith("blk.3.attn_v.")}
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    a, b = t["blk.3.attn_v.weight.lora_a"], t["blk.3.attn_v.weight.lora_b"]
    want = adapterpack.open(EXAMPLE).delta("model.layers.3.self_attn.v_proj").astype(np.float64)
    np.testing.assert_allclose(b @ a * alpha / a.shape[0], want, rtol=0, atol=1e-6 * np.abs(want).max())

    r = run(main, ["convert", str(EXAMPLE), str(tmp_path / "v"), "--to", "peft", "--target", "vllm", "--max-lora-rank", "8"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    back = read_peft(tmp_path / "v")
    got = back.delta("model.layers.3.self_attn.v_proj").astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    r = run(main, ["convert", str(EXAMPLE), str(tmp_path / "k.safetensors"), "--target", "vllm"])
    assert r.exit_code == 2 and "PEFT output only" in r.output  # options that do not go together: a usage error
