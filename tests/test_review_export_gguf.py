"""Review: a llama.cpp LoRA GGUF checked the way llama.cpp's loader checks it (llama-adapter.cpp): every
``<name>.lora_a/b`` pair names a tensor of the base model, of the base tensor's shape. A LoRA of a tensor the
base lacks (``lm_head`` of a model with tied embeddings: its GGUF has no ``output.weight``) is refused by
llama.cpp at load; given the base, ``check`` predicts it and the export refuses it before writing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adapterpack.adapter import Adapter, Module
from adapterpack.errors import ConversionError
from adapterpack.formats.gguf import write_gguf
from adapterpack.formats.serving import check_path
from tests.apack_builders import lora_gguf

gguf = pytest.importorskip("gguf")


def _lora(name: str, out: int, inp: int, layout: str = "linear") -> Module:
    rng = np.random.default_rng(len(name))
    base = (inp, out) if layout == "embedding" else (out, inp)
    a = rng.standard_normal((2, inp)).astype(np.float32)
    b = rng.standard_normal((out, 2)).astype(np.float32)
    return Module(name, "lora", base, {"rank": 2, "alpha": 4.0, "layout": layout}, {"A": a, "B": b})


def _adapter(*mods: Module) -> Adapter:
    return Adapter(base_model="tiny/llama", base_architecture="LlamaForCausalLM", modules={m.name: m for m in mods})


def _base(path: Path) -> Path:
    """A tiny llama GGUF with tied embeddings: token_embd (vocab 40 × 16) and no output.weight."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.attention.head_count", 2)
    w.add_uint32("llama.attention.head_count_kv", 1)
    for name, shape in (("token_embd.weight", (40, 16)), ("blk.0.attn_v.weight", (8, 16)), ("blk.0.ffn_up.weight", (24, 16))):
        w.add_tensor(name, np.zeros(shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


GOOD = ("model.layers.0.self_attn.v_proj", 8, 16), ("model.embed_tokens", 16, 40, "embedding")


def test_matching_base_writes(tmp_path: Path) -> None:
    base = _base(tmp_path / "base.gguf")
    ad = _adapter(*(_lora(*g) for g in GOOD))
    assert not [f for f in check_path_of(ad, tmp_path, base) if f.severity != "note"]
    write_gguf(ad, tmp_path / "ok.gguf", base=base)
    names = {t.name: tuple(reversed([int(x) for x in t.shape])) for t in gguf.GGUFReader(str(tmp_path / "ok.gguf")).tensors}
    assert names["token_embd.weight.lora_a"] == (40, 2) and names["blk.0.attn_v.weight.lora_b"] == (8, 2)


def check_path_of(ad: Adapter, tmp_path: Path, base: Path | None) -> list:
    import adapterpack

    src = tmp_path / "ad.apack"
    adapterpack.save(ad, src)
    return check_path(src, "llama.cpp", base=base)


@pytest.mark.parametrize(
    ("extra", "what"),
    [
        (("lm_head", 40, 16), "output.weight"),  # tied embeddings: the base has no output tensor
        (("model.layers.0.mlp.up_proj", 20, 16), "blk.0.ffn_up.weight"),  # another shape than the base's (24 × 16)
        (("model.layers.0.mlp.down_proj", 16, 24), "blk.0.ffn_down.weight"),  # not in the base at all
    ],
)
def test_tensor_the_base_lacks_is_refused_and_predicted(tmp_path: Path, extra: tuple, what: str) -> None:
    base = _base(tmp_path / "base.gguf")
    ad = _adapter(*(_lora(*g) for g in GOOD), _lora(*extra))
    found = [f for f in check_path_of(ad, tmp_path, base) if f.severity == "refuse"]
    assert len(found) == 1 and found[0].modules == [extra[0]] and what in found[0].problem
    out = tmp_path / "x.gguf"
    with pytest.raises(ConversionError, match=what.replace(".", r"\.")):
        write_gguf(ad, out, base=base)
    assert not out.exists()


def test_tied_config_refuses_lm_head(tmp_path: Path) -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ad = _adapter(_lora("model.layers.0.self_attn.v_proj", 8, 16), _lora("lm_head", 40, 16))
    found = [f for f in check_path_of(ad, tmp_path, tmp_path / "config.json") if f.severity == "refuse"]
    assert len(found) == 1 and found[0].modules == ["lm_head"]
    with pytest.raises(ConversionError, match=r"output\.weight"):
        write_gguf(ad, tmp_path / "x.gguf", base=tmp_path / "config.json")
    cfg["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_gguf(ad, tmp_path / "x.gguf", base=tmp_path / "config.json")


def _qwen2_lora_gguf(path: Path) -> Path:
    """A LoRA GGUF of llama.cpp's ``qwen2`` architecture, as llama.cpp's converter writes one."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 16)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32)
    return lora_gguf(path, {"blk.0.attn_v.weight.lora_a": a, "blk.0.attn_v.weight.lora_b": b}, arch="qwen2")


def test_non_llama_base_is_refused_without_base(tmp_path: Path) -> None:
    """A PEFT adapter of a Qwen2 model (its config's auto_mapping) written as general.architecture 'llama' is a
    file llama.cpp refuses against its model ("model arch and LoRA arch mismatch"): refused, and predicted."""
    ad = _adapter(_lora("model.layers.0.self_attn.v_proj", 8, 16))
    ad.base_architecture = "Qwen2ForCausalLM"
    found = [f for f in check_path_of(ad, tmp_path, None) if f.severity == "refuse"]
    assert len(found) == 1 and "Qwen2ForCausalLM" in found[0].problem
    with pytest.raises(ConversionError, match="Qwen2ForCausalLM"):
        write_gguf(ad, tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists()
    for cls in ("LlamaForCausalLM", "MistralForCausalLM", "LlamaModel", None):
        ad.base_architecture = cls
        assert not [f for f in check_path_of(ad, tmp_path, None) if f.severity == "refuse"]
        write_gguf(ad, tmp_path / "l.gguf")


def test_gguf_of_another_architecture_checks_and_writes_under_it(tmp_path: Path) -> None:
    import adapterpack

    src = _qwen2_lora_gguf(tmp_path / "in.gguf")
    assert not [f for f in check_path(src, "llama.cpp") if f.severity == "refuse"]
    write_gguf(adapterpack.open(src), tmp_path / "out.gguf")
    f = gguf.GGUFReader(str(tmp_path / "out.gguf")).fields["general.architecture"]
    assert bytes(f.parts[f.data[0]]).decode() == "qwen2"


def test_layout_refusal_names_the_layout(tmp_path: Path) -> None:
    """A fan_in_fan_out module without a layout param was refused as 'None / fan_in_fan_out layers'."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 6)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32)
    params = {"rank": 2, "alpha": 4.0, "fan_in_fan_out": True}
    fifo = Module("transformer.h.0.attn.c_attn", "lora", (6, 8), params, {"A": a, "B": b})
    with pytest.raises(ConversionError, match=r"is a fan_in_fan_out \(Conv1D\) layer") as e:
        write_gguf(_adapter(fifo), tmp_path / "f.gguf")
    assert "None" not in str(e.value)
    conv = Module("model.layers.0.mlp.up_proj", "lora", (8, 6, 1, 1), {"rank": 2, "alpha": 4.0, "layout": "conv"},
                  {"A": a.reshape(2, 6, 1, 1), "B": b.reshape(8, 2, 1, 1)})  # fmt: skip
    with pytest.raises(ConversionError, match="is a conv layer"):
        write_gguf(_adapter(conv), tmp_path / "c.gguf")
