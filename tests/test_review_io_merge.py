"""merge of a llama.cpp LoRA GGUF into a base model folder (review round)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tests.apack_builders import lora_gguf


def test_merge_of_a_llamacpp_gguf_takes_head_counts_from_the_base_folder(tmp_path: Path) -> None:
    """merge has the base model folder at hand: its config.json gives the head counts that put llama.cpp's q/k rows
    back in order (was: refused, telling the user to give --base, which merge has no use for)."""

    from adapterpack.formats.gguf import permute_rows
    from adapterpack.ops.merge import merge

    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 64)).astype(np.float32), (rng.standard_normal((64, 4)) * 0.1).astype(np.float32)
    lora_gguf(tmp_path / "l.gguf", {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": permute_rows(b, 4)}, alpha=8.0)
    base = tmp_path / "base"
    base.mkdir()
    w0 = rng.standard_normal((64, 64)).astype(np.float32)
    save_file({"model.layers.0.self_attn.q_proj.weight": w0}, base / "model.safetensors")
    cfg = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "num_key_value_heads": 2}
    (base / "config.json").write_text(json.dumps(cfg))
    merge(tmp_path / "l.gguf", base, tmp_path / "out")
    from safetensors.numpy import load_file

    got = load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
    ref = w0.astype(np.float64) + 2.0 * (b.astype(np.float64) @ a.astype(np.float64))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_importance_of_a_llamacpp_gguf_takes_head_counts_from_the_model_folder(tmp_path: Path, monkeypatch) -> None:
    """As merge: MODEL's config.json gives the head counts of a llama.cpp LoRA GGUF (was refused, advising --base,
    which importance has no option for). The measurement itself is stubbed: what is checked is the adapter it gets."""
    from click.testing import CliRunner

    import adapterpack.torch.fit.fisher as fisher
    from adapterpack.cli import main
    from adapterpack.formats.gguf import permute_rows
    from adapterpack.ops.importance import Importance

    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((4, 64)).astype(np.float32), (rng.standard_normal((64, 4)) * 0.1).astype(np.float32)
    lora_gguf(tmp_path / "l.gguf", {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": permute_rows(b, 4)})
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4}))
    (tmp_path / "t.txt").write_text("some text " * 50)
    seen = {}

    def fake(ad, *args, **kwargs):
        seen["delta"] = ad.module("model.layers.0.self_attn.q_proj").delta().astype(np.float64)
        return Importance({"model.layers.0.self_attn.q_proj": np.ones(4)}, {"model.layers.0.self_attn.q_proj": np.ones(4)})

    monkeypatch.setattr(fisher, "causal_lm_importance", fake)
    args = ["importance", str(tmp_path / "l.gguf"), str(model), str(tmp_path / "o.st"), "--text", str(tmp_path / "t.txt"), "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(seen["delta"], b.astype(np.float64) @ a.astype(np.float64), rtol=1e-6, atol=1e-7)
