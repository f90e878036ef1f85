"""audit of a llama.cpp LoRA GGUF (q/k rows in rotary order, no head counts): the error says to give --base; audit takes it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from adapterpack.cli import main
from tests.apack_builders import lora_gguf


def _llamacpp_gguf(tmp_path: Path) -> Path:

    from adapterpack.formats.gguf import permute_rows

    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 64)).astype(np.float32), (rng.standard_normal((64, 4)) * 0.1).astype(np.float32)
    path = tmp_path / "l.gguf"
    q, v = "blk.0.attn_q.weight", "blk.0.attn_v.weight"
    return lora_gguf(path, {f"{q}.lora_a": a, f"{q}.lora_b": permute_rows(b, 4), f"{v}.lora_a": a, f"{v}.lora_b": b})


def test_cli_audit_of_a_llamacpp_gguf_takes_base(tmp_path: Path) -> None:
    path = _llamacpp_gguf(tmp_path)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "num_key_value_heads": 4}))
    r = CliRunner().invoke(main, ["audit", str(path), "--json", "-j", "1"])
    assert r.exit_code == 1 and "--base" in json.loads(r.output)["inputs"][0]["error"]["message"]
    r = CliRunner().invoke(main, ["audit", str(path), "--json", "-j", "1", "--base", str(cfg)])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["inputs"][0]
    assert row["ok"] and row["format"] == "gguf" and row["module_count"] == 2
