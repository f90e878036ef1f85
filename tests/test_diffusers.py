"""diffusers LoRA files: keys, exact per-module rank/alpha metadata, old key forms, kohya ↔ diffusers
names, bit-exact round trips and refusals (numpy only; test_diffusers_load.py loads with diffusers itself)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from peft.utils.other import get_pattern_key, match_target_against_key
from safetensors.numpy import save_file

import adapterpack
from adapterpack import Adapter, Module
from adapterpack.errors import ConversionError, InputError
from adapterpack.formats.detect import detect_format
from adapterpack.formats.diffusers import META_KEY, exact_alpha, read_diffusers, write_diffusers
from adapterpack.formats.kohya import read_kohya, write_kohya
from adapterpack.formats.peft import read_peft
from adapterpack.formats.sd_names import NameResolver, grammar_paths, kohya_name_of
from tests.helpers_safetensors import assert_same_file, bits, load_st

UNET_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
UNET_OUT = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
UNET_FF = "unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj"
UNET_CONV = "unet.down_blocks.1.resnets.0.conv1"
UNET_PROJ = "unet.mid_block.attentions.0.proj_in"
UNET_TEMB = "unet.time_embedding.linear_1"
TE_Q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
TE_FC = "text_encoder.text_model.encoder.layers.11.mlp.fc1"
TE2_V = "text_encoder_2.text_model.encoder.layers.31.self_attn.v_proj"
#: kohya's names for the modules above, as sd-scripts' networks/lora.py writes them for SDXL
KOHYA = {
    UNET_Q: "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    UNET_OUT: "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
    UNET_FF: "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj",
    UNET_CONV: "lora_unet_down_blocks_1_resnets_0_conv1",
    UNET_PROJ: "lora_unet_mid_block_attentions_0_proj_in",
    UNET_TEMB: "lora_unet_time_embedding_linear_1",
    TE_Q: "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    TE_FC: "lora_te1_text_model_encoder_layers_11_mlp_fc1",
    TE2_V: "lora_te2_text_model_encoder_layers_31_self_attn_v_proj",
}


def rnd(rng: np.random.Generator, *shape: int, dtype: Any = np.float32, s: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * s).astype(dtype)


def lora(
    name: str, rng: np.random.Generator, out: int, inp: int, r: int, alpha: float, dtype: Any = np.float32, **p: Any
) -> Module:
    kernel = p.pop("kernel", None)
    if kernel:
        a, b = rnd(rng, r, inp, kernel, kernel, dtype=dtype), rnd(rng, out, r, 1, 1, dtype=dtype, s=0.1)
        base: tuple[int, ...] = (out, inp, kernel, kernel)
        p["layout"] = "conv"
    else:
        a, b, base = rnd(rng, r, inp, dtype=dtype), rnd(rng, out, r, dtype=dtype, s=0.1), (out, inp)
    return Module(name, "lora", base, {"rank": r, "alpha": alpha} | p, {"A": a, "B": b})


def sdxl_adapter(dtype: Any = np.float32) -> Adapter:
    """Per-module ranks and alphas over the UNet and both SDXL text encoders (linear, 1x1 and 3x3 conv)."""
    rng = np.random.default_rng(0)
    mods = [
        lora(UNET_Q, rng, 32, 32, 4, 8.0, dtype),
        lora(UNET_OUT, rng, 32, 32, 4, 4.0, dtype),
        lora(UNET_FF, rng, 64, 32, 8, 8.0, dtype),
        lora(UNET_CONV, rng, 16, 8, 2, 1.0, dtype, kernel=3),
        lora(UNET_PROJ, rng, 16, 16, 4, 3.0, dtype, kernel=1),
        lora(UNET_TEMB, rng, 64, 16, 3, 0.75, dtype),
        lora(TE_Q, rng, 16, 16, 2, 2.0, dtype),
        lora(TE_FC, rng, 48, 16, 6, 12.0, dtype),
        lora(TE2_V, rng, 24, 24, 5, 1.5, dtype),
    ]
    return Adapter(modules={m.name: m for m in mods})


def peft_values(cfg: dict[str, Any], path: str) -> tuple[int, float]:
    """PEFT's own rule (get_pattern_key) for a module's rank and alpha under LoraConfig kwargs."""
    r = cfg["rank_pattern"].get(get_pattern_key(cfg["rank_pattern"].keys(), path), cfg["r"])
    alpha = cfg["alpha_pattern"].get(get_pattern_key(cfg["alpha_pattern"].keys(), path), cfg["lora_alpha"])
    return r, alpha


def component_configs(meta: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The file's lora_adapter_metadata split per component, as diffusers' loaders split it."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in json.loads(meta[META_KEY]).items():
        comp, _, field = k.partition(".")
        out.setdefault(comp, {})[field] = v
    return out


def dense(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """scale · B @ A in float64, reshaped to the base weight (the reference ΔW)."""
    r = a.shape[0]
    return (scale * (b.astype(np.float64).reshape(b.shape[0], r) @ a.astype(np.float64).reshape(r, -1))).reshape(
        b.shape[0], *a.shape[1:]
    )


def test_export_keys_and_exact_scales(tmp_path: Path) -> None:
    ad = sdxl_adapter()
    assert write_diffusers(ad, tmp_path / "pytorch_lora_weights.safetensors") == []
    t, meta = load_st(tmp_path / "pytorch_lora_weights.safetensors")
    assert meta is not None and meta["format"] == "pt"
    assert sorted(t) == sorted(f"{n}.lora_{s}.weight" for n in ad.modules for s in "AB")
    cfgs = component_configs(meta)
    assert sorted(cfgs) == ["text_encoder", "text_encoder_2", "unet"]
    for name, m in ad.modules.items():
        comp, _, path = name.partition(".")
        cfg = cfgs[comp]
        assert match_target_against_key(cfg["target_modules"], path), name
        if path.startswith("text_model."):  # a CLIP text model built without the text_model wrapper
            assert match_target_against_key(cfg["target_modules"], path[len("text_model.") :]), name
        r, alpha = peft_values(cfg, path)
        assert r == m.params["rank"] and alpha / r == m.summary()["scale"], name
        a, b = t[f"{name}.lora_A.weight"], t[f"{name}.lora_B.weight"]
        assert bits(a) == bits(m.array("A")) and bits(b) == bits(m.array("B"))
        np.testing.assert_array_equal(dense(a, b, alpha / r), dense(m.array("A"), m.array("B"), m.summary()["scale"]))
    # a module path never selects another: time_embedding.linear_1 is not matched by an up_blocks module's pattern
    unet = cfgs["unet"]
    assert not match_target_against_key(unet["target_modules"], "time_embedding.linear_2")
    assert not match_target_against_key(unet["target_modules"], "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k")


def test_read_back_and_roundtrip_bit_exact(tmp_path: Path) -> None:
    ad = sdxl_adapter(ml_dtypes.bfloat16)
    first = tmp_path / "a.safetensors"
    write_diffusers(ad, first)
    assert detect_format(first) == "diffusers"
    back = read_diffusers(first)
    assert sorted(back.modules) == sorted(ad.modules)
    for name, m in ad.modules.items():
        got = back.modules[name]
        assert got.params["rank"] == m.params["rank"] and got.summary()["scale"] == m.summary()["scale"]
        assert got.base_shape == m.base_shape and got.params["layout"] == m.params.get("layout", "linear")
        assert bits(got.delta()) == bits(m.delta())
    write_diffusers(back, tmp_path / "b.safetensors")
    assert_same_file(first, tmp_path / "b.safetensors")


@pytest.mark.parametrize("codec", ["raw", "byteplanes"])
def test_diffusers_file_through_apack_bit_exact(tmp_path: Path, codec: str) -> None:
    """A file as diffusers writes it (its own metadata, with unescaped patterns) survives .apack unchanged."""
    rng = np.random.default_rng(3)
    t = {
        f"{UNET_Q}.lora_A.weight": rnd(rng, 4, 32, dtype=np.float16),
        f"{UNET_Q}.lora_B.weight": rnd(rng, 32, 4, dtype=np.float16),
        f"{UNET_CONV}.lora_A.weight": rnd(rng, 8, 8, 3, 3, dtype=np.float16),
        f"{UNET_CONV}.lora_B.weight": rnd(rng, 16, 8, 1, 1, dtype=np.float16),
    }
    md = {
        "unet.r": 4,
        "unet.lora_alpha": 4,
        "unet.rank_pattern": {"down_blocks.1.resnets.0.conv1": 8},
        "unet.alpha_pattern": {"conv1": 2},
        "unet.target_modules": ["to_q", "conv1"],
        "unet.use_dora": False,
    }
    meta = {"format": "pt", META_KEY: json.dumps(md, indent=2, sort_keys=True)}
    src = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(t, src, metadata=meta)
    ad = adapterpack.formats.diffusers.read_diffusers(src)
    assert ad.modules[UNET_Q].summary()["scale"] == 1.0 and ad.modules[UNET_CONV].summary()["scale"] == 2 / 8
    adapterpack.save(ad, tmp_path / "d.apack", codec=codec)
    with adapterpack.open(tmp_path / "d.apack") as back:
        write_diffusers(back, tmp_path / "out.safetensors")
    assert_same_file(src, tmp_path / "out.safetensors")
    # an edit the recorded metadata no longer describes gets new metadata, exact again
    ad.modules[UNET_CONV].params["alpha"] = 3.0
    write_diffusers(ad, tmp_path / "edited.safetensors")
    _, meta2 = load_st(tmp_path / "edited.safetensors")
    assert meta2 is not None and meta2[META_KEY] != meta[META_KEY]
    assert peft_values(component_configs(meta2)["unet"], "down_blocks.1.resnets.0.conv1") == (8, 3.0)
    assert read_diffusers(tmp_path / "edited.safetensors").modules[UNET_CONV].summary()["scale"] == 3 / 8


def test_old_key_forms_and_alpha_tensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    attn = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    te = "text_encoder.text_model.encoder.layers.0"
    t = {
        f"{UNET_FF}.lora.down.weight": rnd(rng, 4, 32),
        f"{UNET_FF}.lora.up.weight": rnd(rng, 64, 4),
        f"{UNET_FF}.alpha": np.array(2.0, np.float32),
        f"{attn}.processor.to_out_lora.down.weight": rnd(rng, 2, 32),
        f"{attn}.processor.to_out_lora.up.weight": rnd(rng, 32, 2),
        f"{te}.self_attn.to_q_lora.down.weight": rnd(rng, 2, 16),
        f"{te}.self_attn.to_q_lora.up.weight": rnd(rng, 16, 2),
        f"{te}.mlp.fc1.lora_linear_layer.down.weight": rnd(rng, 3, 16),
        f"{te}.mlp.fc1.lora_linear_layer.up.weight": rnd(rng, 48, 3),
        f"{te}.mlp.fc1.alpha": np.array([6.0], np.float16),
    }
    src = tmp_path / "old.safetensors"
    save_file(t, src)
    assert detect_format(src) == "diffusers"
    ad = read_diffusers(src)
    scales = {UNET_FF: 0.5, f"{attn}.to_out.0": 1.0, f"{te}.self_attn.q_proj": 1.0, f"{te}.mlp.fc1": 2.0}
    assert {n: m.summary()["scale"] for n, m in ad.modules.items()} == scales
    ff = ad.modules[UNET_FF]
    f = ff.factors()
    np.testing.assert_array_equal(
        dense(f.A, f.B, f.scale), dense(t[f"{UNET_FF}.lora.down.weight"], t[f"{UNET_FF}.lora.up.weight"], 0.5)
    )
    assert "diffusers reads .alpha only from kohya-named files" in "\n".join(ad.source["notes"])
    out = tmp_path / "again.safetensors"
    write_diffusers(ad, out)
    assert_same_file(src, out)
    # converted elsewhere (kohya), the same modules come back under current keys with exact metadata
    write_kohya(ad, tmp_path / "k.safetensors")
    fresh = tmp_path / "fresh.safetensors"
    write_diffusers(read_kohya(tmp_path / "k.safetensors"), fresh)
    tf, mf = load_st(fresh)
    assert f"{attn}.to_out.0.lora_A.weight" in tf and f"{te}.mlp.fc1.lora_B.weight" in tf
    for name, m in ad.modules.items():
        comp, _, path = name.partition(".")
        r, alpha = peft_values(component_configs(mf or {})[comp], path)
        assert alpha / r == m.summary()["scale"]


def test_current_keys_with_alpha_tensors_roundtrip(tmp_path: Path) -> None:
    """PEFT-style keys with kohya-style .alpha tensors and no metadata: alpha/r read, the file rebuilt bit for bit;
    once the alpha changes, the stale tensor is dropped and metadata carries the new scale."""
    rng = np.random.default_rng(11)
    t = {
        f"{UNET_Q}.lora_A.weight": rnd(rng, 4, 16, dtype=np.float16),
        f"{UNET_Q}.lora_B.weight": rnd(rng, 16, 4, dtype=np.float16),
        f"{UNET_Q}.alpha": np.array(1.0, np.float16),
        f"{UNET_OUT}.lora_A.weight": rnd(rng, 2, 16, dtype=np.float16),
        f"{UNET_OUT}.lora_B.weight": rnd(rng, 16, 2, dtype=np.float16),
    }
    src = tmp_path / "a.safetensors"
    save_file(t, src)
    ad = read_diffusers(src)
    assert ad.modules[UNET_Q].summary()["scale"] == 0.25 and ad.modules[UNET_OUT].summary()["scale"] == 1.0
    write_diffusers(ad, tmp_path / "b.safetensors")
    assert_same_file(src, tmp_path / "b.safetensors")
    ad.modules[UNET_Q].params["alpha"] = 3.0
    write_diffusers(ad, tmp_path / "c.safetensors")
    tc, mc = load_st(tmp_path / "c.safetensors")
    assert f"{UNET_Q}.alpha" not in tc
    assert peft_values(component_configs(mc or {})["unet"], UNET_Q.partition(".")[2]) == (4, 3.0)
    assert read_diffusers(tmp_path / "c.safetensors").modules[UNET_Q].summary()["scale"] == 0.75


def test_kohya_to_diffusers_to_kohya(tmp_path: Path) -> None:
    """An SDXL kohya file: names resolve to diffusers paths, scales stay exact, names and alphas come back."""
    rng = np.random.default_rng(5)
    h = np.float16
    t: dict[str, np.ndarray] = {}
    alphas = {UNET_Q: np.array(2.0, h), UNET_CONV: np.array(1.0, np.float32), TE_FC: np.array(0.0, h), TE2_V: np.array(3.0, h)}
    ranks = {UNET_Q: 4, UNET_OUT: 4, UNET_FF: 8, UNET_CONV: 2, UNET_PROJ: 4, UNET_TEMB: 3, TE_Q: 2, TE_FC: 6, TE2_V: 5}
    for name, k in KOHYA.items():
        r = ranks[name]
        conv = name in (UNET_CONV, UNET_PROJ)
        kernel = 3 if name == UNET_CONV else 1
        t[f"{k}.lora_down.weight"] = rnd(rng, r, 16, kernel, kernel, dtype=h) if conv else rnd(rng, r, 16, dtype=h)
        t[f"{k}.lora_up.weight"] = rnd(rng, 24, r, 1, 1, dtype=h) if conv else rnd(rng, 24, r, dtype=h)
        if name in alphas:
            t[f"{k}.alpha"] = alphas[name]
    src = tmp_path / "sdxl_kohya.safetensors"
    save_file(t, src)
    dst = tmp_path / "pytorch_lora_weights.safetensors"
    notes = write_diffusers(read_kohya(src), dst)
    assert any("9 kohya module names were split" in n for n in notes)
    td, md = load_st(dst)
    assert sorted(td) == sorted(f"{n}.lora_{s}.weight" for n in KOHYA for s in "AB")
    cfgs = component_configs(md or {})
    for name, k in KOHYA.items():
        r = ranks[name]
        a = float(alphas[name]) if name in alphas else 0.0
        kohya_scale = (a or r) / r  # kohya: no alpha or alpha 0 means alpha = rank
        comp, _, path = name.partition(".")
        pr, palpha = peft_values(cfgs[comp], path)
        assert pr == r and palpha / pr == kohya_scale, name
        ref = dense(t[f"{k}.lora_down.weight"], t[f"{k}.lora_up.weight"], kohya_scale)
        np.testing.assert_array_equal(dense(td[f"{name}.lora_A.weight"], td[f"{name}.lora_B.weight"], palpha / pr), ref)
    # back to kohya: the same names, factors bit for bit, alphas with kohya's values
    back = write_kohya(read_diffusers(dst), tmp_path / "k2.safetensors")
    tk, _ = load_st(back)
    assert sorted(k for k in tk if not k.endswith(".alpha")) == sorted(k for k in t if not k.endswith(".alpha"))
    for k in KOHYA.values():
        for kind in ("lora_down.weight", "lora_up.weight"):
            assert bits(tk[f"{k}.{kind}"]) == bits(t[f"{k}.{kind}"])
        r = t[f"{k}.lora_down.weight"].shape[0]
        orig = float(t[f"{k}.alpha"]) if f"{k}.alpha" in t else 0.0
        assert float(tk[f"{k}.alpha"]) / r == (orig or r) / r


def test_sd15_text_encoder_and_kohya_names() -> None:
    assert kohya_name_of(TE_Q, False) == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_name_of(TE_Q, True) == KOHYA[TE_Q]
    # a CLIP text model built without the text_model wrapper gets kohya's text_model_ all the same
    assert kohya_name_of("text_encoder.encoder.layers.0.self_attn.q_proj", False) == kohya_name_of(TE_Q, False)
    assert kohya_name_of("transformer.transformer_blocks.0.attn.to_q", False) == "lora_transformer_transformer_blocks_0_attn_to_q"
    assert kohya_name_of("transformer.h.0.attn.c_attn", False) is None  # GPT-2, not a diffusers DiT
    assert kohya_name_of("model.layers.0.self_attn.q_proj", False) is None
    r = NameResolver()
    assert r.resolve("lora_te_text_model_encoder_layers_0_self_attn_q_proj") == TE_Q
    assert r.resolve("lora_transformer_single_transformer_blocks_3_proj_mlp") == "transformer.single_transformer_blocks.3.proj_mlp"
    assert (
        r.resolve("lora_transformer_transformer_blocks_0_ff_context_net_2") == "transformer.transformer_blocks.0.ff_context.net.2"
    )
    for path, k in KOHYA.items():
        assert r.resolve(k) == path


@pytest.mark.parametrize(
    ("kohya", "message"),
    [
        ("lora_unet_double_blocks_0_img_attn_qkv", "not a diffusers unet module path nor an SDXL UNet one"),
        ("lora_unet_output_blocks_8_1_proj_in", "nor an SDXL UNet one"),  # SDXL's last up level has no attention
        ("lora_unet_input_blocks_1_1_proj_in", "nor an SDXL UNet one"),  # nor its first down level
        ("lora_unet_input_blocks_12_0_op", "nor an SDXL UNet one"),
        ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "T5"),
        ("lycoris_down_blocks_0_attentions_0_proj_in", "not a kohya Stable Diffusion name"),
    ],
)
def test_unresolvable_names_are_refused(tmp_path: Path, kohya: str, message: str) -> None:
    rng = np.random.default_rng(6)
    ad = Adapter(modules={kohya: lora(kohya, rng, 8, 8, 2, 2.0)})
    with pytest.raises(ConversionError, match=message):
        write_diffusers(ad, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_module_list_resolves_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    odd = "lora_unet_some_custom_block_linear"  # no grammar split: only a module list names it
    ad = Adapter(modules={odd: lora(odd, rng, 8, 8, 2, 2.0), KOHYA[UNET_Q]: lora(KOHYA[UNET_Q], rng, 8, 8, 2, 2.0)})
    modules = ["unet.some_custom.block_linear", UNET_Q, "unet.conv_in"]
    write_diffusers(ad, tmp_path / "x.safetensors", modules=modules)
    t, _ = load_st(tmp_path / "x.safetensors")
    assert sorted(t) == sorted(f"{n}.lora_{s}.weight" for n in ("unet.some_custom.block_linear", UNET_Q) for s in "AB")
    with pytest.raises(ConversionError, match="the base model has no module with this kohya name"):
        write_diffusers(ad, tmp_path / "y.safetensors", modules=[UNET_Q])
    with pytest.raises(ConversionError, match="several base model modules"):
        write_diffusers(ad, tmp_path / "y.safetensors", modules=[*modules, "unet.some.custom_block.linear"])
    # a pipeline folder's component weights give the same list
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    save_file({f"{m[len('unet.') :]}.weight": np.zeros(1, np.float32) for m in modules}, pipe / "unet" / "w.safetensors")
    write_diffusers(ad, tmp_path / "z.safetensors", base=pipe)
    assert sorted(load_st(tmp_path / "z.safetensors")[0]) == sorted(t)
    with pytest.raises(InputError, match="not a diffusers pipeline folder"):
        write_diffusers(ad, tmp_path / "z2.safetensors", base=tmp_path)


#: kohya SDXL (SGM) module names and their diffusers paths, as sd-scripts' library/sdxl_model_util.py pairs them
SDXL_PAIRS = {
    "input_blocks_0_0": "conv_in",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_2_0_emb_layers_1": "down_blocks.0.resnets.1.time_emb_proj",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_8_1_transformer_blocks_9_ff_net_0_proj": "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj",
    "middle_block_0_out_layers_3": "mid_block.resnets.0.conv2",
    "middle_block_1_proj_out": "mid_block.attentions.0.proj_out",
    "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
    "output_blocks_0_1_transformer_blocks_3_attn2_to_out_0": "up_blocks.0.attentions.0.transformer_blocks.3.attn2.to_out.0",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_0_skip_connection": "up_blocks.1.resnets.2.conv_shortcut",
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks_8_0_in_layers_2": "up_blocks.2.resnets.2.conv1",
    "time_embed_0": "time_embedding.linear_1",
    "label_emb_0_2": "add_embedding.linear_2",
    "out_2": "conv_out",
}


def test_kohya_sdxl_unet_names() -> None:
    r = NameResolver()
    for sgm, path in SDXL_PAIRS.items():
        assert r.resolve(f"lora_unet_{sgm}") == f"unet.{path}", sgm
    # with the base model's modules the same names resolve through its module list
    rb = NameResolver([f"unet.{p}" for p in SDXL_PAIRS.values()])
    assert all(rb.resolve(f"lora_unet_{sgm}") == f"unet.{p}" for sgm, p in SDXL_PAIRS.items())


def test_kohya_export_sdxl_sgm_names(tmp_path: Path) -> None:
    """SDXL kohya file (SGM names) → diffusers → kohya with sdxl_sgm: kohya's original names again."""
    rng = np.random.default_rng(12)
    t: dict[str, np.ndarray] = {}
    for sgm in SDXL_PAIRS:
        t[f"lora_unet_{sgm}.lora_down.weight"] = rnd(rng, 2, 8, dtype=np.float16)
        t[f"lora_unet_{sgm}.lora_up.weight"] = rnd(rng, 8, 2, dtype=np.float16)
        t[f"lora_unet_{sgm}.alpha"] = np.array(1.0, np.float16)
    t[f"{KOHYA[TE2_V]}.lora_down.weight"] = rnd(rng, 2, 8, dtype=np.float16)
    t[f"{KOHYA[TE2_V]}.lora_up.weight"] = rnd(rng, 8, 2, dtype=np.float16)
    t[f"{KOHYA[TE2_V]}.alpha"] = np.array(0.5, np.float16)
    src = tmp_path / "sdxl.safetensors"
    save_file(t, src)
    write_diffusers(read_kohya(src), tmp_path / "d.safetensors")
    ad = read_diffusers(tmp_path / "d.safetensors")
    assert sorted(ad.modules) == sorted([*(f"unet.{p}" for p in SDXL_PAIRS.values()), TE2_V])
    write_kohya(ad, tmp_path / "k.safetensors", sdxl_sgm=True)
    tk, _ = load_st(tmp_path / "k.safetensors")
    assert sorted(tk) == sorted(t)
    assert all(bits(tk[k]) == bits(t[k]) for k in t)
    write_kohya(ad, tmp_path / "plain.safetensors")
    assert (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in load_st(tmp_path / "plain.safetensors")[0]
    )
    sd15 = Adapter(modules={UNET_Q: lora(UNET_Q, rng, 8, 8, 2, 2.0)})  # SD 1.x: attention in down level 0
    with pytest.raises(ConversionError, match="has no SDXL UNet"):
        write_kohya(sd15, tmp_path / "x.safetensors", sdxl_sgm=True)


def test_grammar_refuses_ambiguity() -> None:
    assert grammar_paths("a_b_0_c", frozenset({"a", "b", "a_b", "c"})) == ["a.b.0.c", "a_b.0.c"]
    assert grammar_paths("to_out_0", frozenset({"to_out"})) == ["to_out.0"]
    assert grammar_paths("to_out_x", frozenset({"to_out"})) == []


def test_rslora(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    whole = Adapter(modules={n: lora(n, rng, 16, 16, r, 8.0, rslora=True) for n, r in ((UNET_Q, 4), (UNET_OUT, 9))})
    write_diffusers(whole, tmp_path / "a.safetensors")
    cfg = component_configs(load_st(tmp_path / "a.safetensors")[1] or {})["unet"]
    assert cfg["use_rslora"] is True
    for name, m in whole.modules.items():
        r, alpha = peft_values(cfg, name.partition(".")[2])
        assert alpha / math.sqrt(r) == m.summary()["scale"]
    mixed = Adapter(modules={UNET_Q: lora(UNET_Q, rng, 16, 16, 3, 5.0, rslora=True), UNET_OUT: lora(UNET_OUT, rng, 16, 16, 4, 4.0)})
    write_diffusers(mixed, tmp_path / "b.safetensors")
    cfg = component_configs(load_st(tmp_path / "b.safetensors")[1] or {})["unet"]
    assert cfg["use_rslora"] is False
    for name, m in mixed.modules.items():
        r, alpha = peft_values(cfg, name.partition(".")[2])
        assert alpha / r == m.summary()["scale"], name
    assert exact_alpha(5.0 / math.sqrt(3), 3) / 3 == 5.0 / math.sqrt(3)


def test_export_refusals(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    peft_names = Adapter(modules={"model.layers.0.self_attn.q_proj": lora("model.layers.0.self_attn.q_proj", rng, 8, 8, 2, 4.0)})
    with pytest.raises(ConversionError, match="names no diffusers component"):
        write_diffusers(peft_names, tmp_path / "x.safetensors")
    with pytest.raises(ConversionError, match="component must be one of"):
        write_diffusers(peft_names, tmp_path / "x.safetensors", component="vae")
    write_diffusers(peft_names, tmp_path / "x.safetensors", component="transformer")
    assert list(read_diffusers(tmp_path / "x.safetensors").modules) == ["transformer.model.layers.0.self_attn.q_proj"]
    emb = Adapter(modules={"unet.x": lora("unet.x", rng, 8, 8, 2, 4.0)})
    emb.modules["unet.x"].params["layout"] = "embedding"
    with pytest.raises(ConversionError, match="embedding or fan_in_fan_out"):
        write_diffusers(emb, tmp_path / "e.safetensors")
    dora = Adapter(modules={UNET_Q: lora(UNET_Q, rng, 8, 8, 2, 4.0, dora=True)})
    dora.modules[UNET_Q].tensors["magnitude"] = np.ones(8, np.float32)
    with pytest.raises(ConversionError, match="DoRA"):
        write_diffusers(dora, tmp_path / "d.safetensors")
    both = Adapter(modules={UNET_Q: lora(UNET_Q, rng, 8, 8, 2, 4.0), KOHYA[UNET_Q]: lora(KOHYA[UNET_Q], rng, 8, 8, 2, 4.0)})
    with pytest.raises(ConversionError, match="both map to the diffusers module"):
        write_diffusers(both, tmp_path / "c.safetensors")
    assert not any(p.name.startswith(("e.", "d.", "c.")) for p in tmp_path.iterdir())


def _save(tmp_path: Path, t: dict[str, np.ndarray], md: dict[str, Any] | str | None = None) -> Path:
    path = tmp_path / "bad.safetensors"
    meta = None if md is None else {META_KEY: md if isinstance(md, str) else json.dumps(md)}
    save_file(t, path, metadata=meta)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("only_a", "needs both lora_A"),
        ("rank", "disagree on the rank"),
        ("meta_rank", "gives rank 8, the tensors have rank 2"),
        ("meta_json", "is not valid JSON"),
        ("meta_regex", "not a valid regular expression"),
        ("meta_type", "r must be an integer"),
        ("meta_pattern", "rank_pattern must map patterns to integers"),
        ("alpha_shape", "alpha must be a single number"),
        ("two_forms", "stored under two key forms"),
        ("nothing", "no diffusers LoRA modules"),
    ],
)
def test_read_errors(tmp_path: Path, case: str, message: str) -> None:
    rng = np.random.default_rng(10)
    a, b = rnd(rng, 2, 8), rnd(rng, 8, 2)
    good = {f"{UNET_Q}.lora_A.weight": a, f"{UNET_Q}.lora_B.weight": b}
    t: dict[str, np.ndarray] = dict(good)
    md: dict[str, Any] | str | None = None
    if case == "only_a":
        del t[f"{UNET_Q}.lora_B.weight"]
    elif case == "rank":
        t[f"{UNET_Q}.lora_B.weight"] = rnd(rng, 8, 3)
    elif case == "meta_rank":
        md = {"unet.r": 8, "unet.lora_alpha": 8}
    elif case == "meta_json":
        md = "{not json"
    elif case == "meta_regex":
        md = {"unet.r": 2, "unet.lora_alpha": 2, "unet.alpha_pattern": {"(": 1}}
    elif case == "meta_type":
        md = {"unet.r": "2", "unet.lora_alpha": 2}
    elif case == "meta_pattern":
        md = {"unet.r": 2, "unet.lora_alpha": 2, "unet.rank_pattern": {"to_q": 2.5}}
    elif case == "alpha_shape":
        t[f"{UNET_Q}.alpha"] = np.ones(2, np.float32)
    elif case == "two_forms":
        attn = UNET_Q.rpartition(".")[0]
        t = {f"{attn}.processor.to_q_lora.down.weight": a, f"{UNET_Q}.lora.up.weight": b}
    else:
        t = {"unet.something.weight": a}
    with pytest.raises(InputError, match=message) as e:
        read_diffusers(_save(tmp_path, t, md))
    assert "\n" not in str(e.value)


def test_real_peft_example_through_diffusers(tmp_path: Path) -> None:
    """The bundled SmolLM2 adapter under a diffusers component: trained factors bit for bit, scales exact
    by PEFT's own pattern rule, and back to PEFT module names through kohya."""
    from adapterpack.examples import example_path

    peft = read_peft(example_path())
    dst = tmp_path / "pytorch_lora_weights.safetensors"
    write_diffusers(peft, dst, component="transformer")
    _, meta = load_st(dst)
    cfg = component_configs(meta or {})["transformer"]
    back = read_diffusers(dst)
    assert len(back) == len(peft) > 0
    for name, m in peft.modules.items():
        r, alpha = peft_values(cfg, name)
        assert r == m.params["rank"] and alpha / r == m.summary()["scale"]
        got = back.modules[f"transformer.{name}"]
        assert bits(got.array("A")) == bits(m.array("A")) and bits(got.array("B")) == bits(m.array("B"))
        assert got.summary()["scale"] == m.summary()["scale"]
    write_diffusers(back, tmp_path / "again.safetensors")
    assert_same_file(dst, tmp_path / "again.safetensors")


def test_review_hostile_target_modules_numpy_alpha_and_long_kohya_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    t = {f"{UNET_Q}.lora_A.weight": rnd(rng, 4, 32), f"{UNET_Q}.lora_B.weight": rnd(rng, 32, 4)}
    src = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(t, src, metadata={META_KEY: json.dumps({"unet.r": 4, "unet.lora_alpha": 4, "unet.target_modules": [1, 2]})})
    with pytest.raises(InputError, match="target_modules must be a string or a list of strings"):
        read_diffusers(src)
    a, b = rnd(rng, 4, 32), rnd(rng, 32, 4)
    ad = Adapter(modules={UNET_Q: Module(UNET_Q, "lora", (32, 32), {"rank": 4, "alpha": np.float32(2.0)}, {"A": a, "B": b})})
    write_diffusers(ad, tmp_path / "np.safetensors")
    assert read_diffusers(tmp_path / "np.safetensors").modules[UNET_Q].summary()["scale"] == 0.5
    # a hostile kohya name of thousands of tokens is refused after a linear-time split, not a cubic one
    with pytest.raises(ConversionError):
        NameResolver().resolve("lora_unet_" + "_".join(["x"] * 3000))


@pytest.mark.parametrize(
    ("target", "selected"),
    [(r"([a-z_.0-9]+)+X", False), (r"(.*)(to_q)", True), (r"(?:down|up)_blocks\..*\.to_(q|k)", True), ("to_k", False)],
)
def test_string_target_modules_match_without_backtracking(tmp_path: Path, target: str, selected: bool) -> None:
    """A string target_modules is PEFT's re.fullmatch: the same answers, and a backtracking bomb (hours in re on
    this module's path) ends at once; the reading runs in a child process so a hang fails instead of blocking."""
    import subprocess
    import sys

    rng = np.random.default_rng(5)
    t = {f"{UNET_Q}.lora_A.weight": rnd(rng, 4, 32), f"{UNET_Q}.lora_B.weight": rnd(rng, 32, 4)}
    src = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(t, src, metadata={META_KEY: json.dumps({"unet.r": 4, "unet.lora_alpha": 4, "unet.target_modules": target})})
    code = (
        "import sys, json; from adapterpack.formats.diffusers import read_diffusers; "
        "print(json.dumps(read_diffusers(sys.argv[1]).source.get('notes', [])))"
    )
    repo = Path(__file__).parents[1]
    res = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, timeout=60, cwd=repo)
    assert res.returncode == 0, res.stderr[-2000:]
    notes = json.loads(res.stdout)
    assert any("not selected by target_modules" in n for n in notes) != selected, notes


def test_string_target_modules_refused_in_one_line_when_too_costly(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    t = {f"{UNET_Q}.lora_A.weight": rnd(rng, 4, 32), f"{UNET_Q}.lora_B.weight": rnd(rng, 32, 4)}
    src = tmp_path / "pytorch_lora_weights.safetensors"
    deep = "(" * 200 + "to_q" + ")" * 200
    save_file(t, src, metadata={META_KEY: json.dumps({"unet.r": 4, "unet.lora_alpha": 4, "unet.target_modules": deep})})
    with pytest.raises(InputError, match=r"target_modules '\(\(\(.* nests groups 200 deep"):
        read_diffusers(src)


def test_fullmatch_agrees_with_re_and_writer_patterns_are_one_look_up() -> None:
    """The non-backtracking full match gives re.fullmatch's answers; the alternation our writer emits for every
    adapted module (longer than a pattern key may be) is matched by set look-up, whatever the module count."""
    import random
    import re

    from adapterpack.formats.regex_match import Budget, compile_fullmatch, fullmatches
    from adapterpack.formats.sd_names import pattern

    paths = [f"down_blocks.{i}.attentions.{j}.to_{p}" for i in range(40) for j in range(5) for p in "qkv"]
    written = "(?:" + "|".join(pattern(p) for p in paths) + ")"
    compiled = compile_fullmatch(written)
    assert compiled.choices is not None and len(written) > 4096
    budget = Budget()
    for p in [*paths, "down_blocks.0.attentions.0.to_out", "x" + paths[0]]:
        assert fullmatches(compiled, p, budget) == (re.fullmatch(written, p) is not None), p
    rng = random.Random(7)
    atoms = ["a", "b", ".", r"\.", "[ab]", "a*", "(?:a|b)", "(a|ab)", "^a", "a$", r"\b", "b+?", "(?:ab|a)c"]
    texts = ["", "a", "b", "ab", "a.b", "abc", "aab", "ba.", "a\n"]
    for _ in range(2000):
        pat = "".join(rng.choice(atoms) for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.3:
            pat = f"(?:{pat}|{''.join(rng.choice(atoms) for _ in range(2))})"
        for t in texts:
            assert fullmatches(compile_fullmatch(pat), t, Budget()) == (re.fullmatch(pat, t) is not None), (pat, t)
