"""audit of a llama.cpp LoRA GGUF (q/k rows in rotary order, no head counts): the error says to give --base; audit takes it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from adapterpack.cli import main


def _llamacpp_gguf(tmp_path: Path) -> Path:
    import gguf

    from adapterpack.formats.gguf import permute_rows

    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 64)).astype(np.float32), (rng.standard_normal((64, 4)) * 0.1).astype(np.float32)
    path = tmp_path / "l.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 4.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", a)
    w.add_tensor("blk.0.attn_q.weight.lora_b", permute_rows(b, 4))
    w.add_tensor("blk.0.attn_v.weight.lora_a", a)
    w.add_tensor("blk.0.attn_v.weight.lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


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
