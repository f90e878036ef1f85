"""kohya single-file LoRA import/export: bit-exact round trips, alpha rules, names, layouts, refusals."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import adapterpack
from adapterpack import Adapter, Module
from adapterpack.errors import ConversionError, InputError, RecordError
from adapterpack.formats.detect import detect_format
from adapterpack.formats.kohya import META_NAMES, META_PARAMS, read_kohya, write_kohya
from adapterpack.formats.peft import read_peft, write_peft
from tests.helpers_safetensors import assert_same_file, bits, load_st

BF16 = ml_dtypes.bfloat16
CODECS = ("raw", "zstd", "byteplanes")
LIN = "lora_unet_down_blocks_0_attentions_0_proj_in"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
ZERO = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
ODD = "lora_te_text_model_encoder_layers_0_mlp_fc1"
DORA = "lora_unet_mid_block_attentions_0_proj_out"
LOHA = "lora_unet_up_blocks_0_attentions_0_proj_in"


def rnd(rng: np.random.Generator, *shape: int, dtype: Any = np.float32, s: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * s).astype(dtype)


@pytest.fixture()
def kohya_file(tmp_path: Path) -> Path:
    """A kohya file with every case: linear, conv, no alpha, alpha 0, odd alpha dtype/shape, DoRA, LoHa."""
    rng = np.random.default_rng(0)
    h = np.float16
    t = {
        f"{LIN}.lora_down.weight": rnd(rng, 4, 32, dtype=h),
        f"{LIN}.lora_up.weight": rnd(rng, 48, 4, dtype=h, s=0.1),
        f"{LIN}.alpha": np.array(2.0, h),
        f"{CONV}.lora_down.weight": rnd(rng, 4, 8, 3, 3, dtype=h),
        f"{CONV}.lora_up.weight": rnd(rng, 16, 4, 1, 1, dtype=h, s=0.1),
        f"{CONV}.alpha": np.array(1.0, np.float32),
        f"{TE}.lora_down.weight": rnd(rng, 2, 32, dtype=h),
        f"{TE}.lora_up.weight": rnd(rng, 32, 2, dtype=h),
        f"{ZERO}.lora_down.weight": rnd(rng, 2, 32, dtype=h),
        f"{ZERO}.lora_up.weight": rnd(rng, 32, 2, dtype=h),
        f"{ZERO}.alpha": np.array(0.0, h),
        f"{ODD}.lora_down.weight": rnd(rng, 3, 32, dtype=BF16),
        f"{ODD}.lora_up.weight": rnd(rng, 64, 3, dtype=BF16),
        f"{ODD}.alpha": np.array([1.5], np.float64),
        f"{DORA}.lora_down.weight": rnd(rng, 4, 32, dtype=h),
        f"{DORA}.lora_up.weight": rnd(rng, 32, 4, dtype=h),
        f"{DORA}.alpha": np.array(4.0, h),
        f"{DORA}.dora_scale": rnd(rng, 1, 32, dtype=h),
        f"{LOHA}.hada_w1_a": rnd(rng, 32, 4, dtype=h),
        f"{LOHA}.hada_w1_b": rnd(rng, 4, 32, dtype=h),
        f"{LOHA}.alpha": np.array(4.0, h),
    }
    path = tmp_path / "kohya.safetensors"
    save_file(t, path, metadata={"ss_network_dim": "4", "ss_network_alpha": "2.0"})
    return path


def reference_delta(down: np.ndarray, up: np.ndarray, scale: float) -> np.ndarray:
    """kohya's ΔW: scale · up @ down, reshaped to the base weight (float64)."""
    r = down.shape[0]
    prod = up.astype(np.float64).reshape(up.shape[0], r) @ down.astype(np.float64).reshape(r, -1)
    return (prod * scale).reshape(up.shape[0], *down.shape[1:])


def test_read(kohya_file: Path) -> None:
    t, _ = load_st(kohya_file)
    ad = read_kohya(kohya_file)
    assert sorted(ad.modules) == sorted([LIN, CONV, TE, ZERO, ODD])
    assert ad.source["format"] == "kohya"
    assert ad.source["safetensors_metadata"] == {"ss_network_dim": "4", "ss_network_alpha": "2.0"}
    conv = ad.modules[CONV]
    assert conv.params["layout"] == "conv" and conv.base_shape == (16, 8, 3, 3)
    assert ad.modules[LIN].params["layout"] == "linear" and ad.modules[LIN].base_shape == (48, 32)
    scales = {LIN: 2.0 / 4, CONV: 1.0 / 4, TE: 1.0, ZERO: 1.0, ODD: 1.5 / 3}
    for name, scale in scales.items():
        m = ad.modules[name]
        assert m.summary()["scale"] == scale
        ref = reference_delta(t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"], scale)
        np.testing.assert_allclose(ad.delta(name), ref, rtol=1e-5, atol=1e-6)
        assert bits(m.array("A")) == bits(t[f"{name}.lora_down.weight"])
    # missing alpha and alpha 0 both mean alpha = rank in kohya: visible in source and notes
    assert ad.source["no_alpha"] == [TE]
    assert ad.modules[TE].params["alpha"] == 2 and ad.modules[ZERO].params["alpha"] == 2
    notes = "\n".join(ad.source["notes"])
    assert f"1 modules have no alpha tensor; kohya then uses alpha = rank (scale 1): {TE}" in notes
    assert "alpha 0" in notes and ZERO in notes
    assert "dora_scale" in notes and DORA in notes
    # DoRA and LoHa modules are carried as raw tensors, untouched
    raw = sorted(k for k in t if k.startswith((DORA, LOHA)))
    assert sorted(ad.tensors) == raw
    assert all(bits(ad.tensors[k]) == bits(t[k]) for k in raw)


def test_roundtrip_bit_exact(kohya_file: Path, tmp_path: Path) -> None:
    ad = read_kohya(kohya_file)
    out = write_kohya(ad, tmp_path / "out.safetensors")
    assert_same_file(kohya_file, out)
    assert detect_format(out) == "kohya"


@pytest.mark.parametrize("codec", CODECS)
def test_apack_roundtrip_bit_exact(kohya_file: Path, tmp_path: Path, codec: str) -> None:
    ad = adapterpack.open(kohya_file)
    adapterpack.save(ad, tmp_path / "k.apack", codec=codec)
    with adapterpack.open(tmp_path / "k.apack") as back:
        for name in ad.modules:
            assert bits(back.delta(name)) == bits(ad.delta(name))
        out = write_kohya(back, tmp_path / "out.safetensors")
    assert_same_file(kohya_file, out)


# --- export from non-kohya adapters ------------------------------------------------------------


def lora(
    name: str, rng: np.random.Generator, out: int, inp: int, r: int, alpha: float, dtype: Any = np.float32, **p: Any
) -> Module:
    layout = p.get("layout", "linear")
    fifo = p.get("fan_in_fan_out", False)
    base = (inp, out) if layout == "embedding" or fifo else (out, inp)
    params = {"rank": r, "alpha": alpha, "rslora": False, "layout": "linear", "fan_in_fan_out": False, "dora": False} | p
    return Module(name, "lora", base, params, {"A": rnd(rng, r, inp, dtype=dtype), "B": rnd(rng, out, r, dtype=dtype, s=0.1)})


def peft_like(dtype: Any = np.float32, **extra: Any) -> Adapter:
    rng = np.random.default_rng(1)
    mods = [
        lora("model.layers.0.self_attn.q_proj", rng, 64, 64, 8, 16, dtype),
        lora("model.layers.0.self_attn.v_proj", rng, 32, 64, 4, 8, dtype),
        lora("model.layers.1.self_attn.q_proj", rng, 64, 64, 8, 16, dtype, rslora=True),
        lora("model.embed_tokens", rng, 64, 100, 4, 8, dtype, layout="embedding"),
        lora("transformer.h.0.attn.c_attn", rng, 192, 64, 4, 8, dtype, fan_in_fan_out=True),
    ]
    return Adapter(modules={m.name: m for m in mods}, source={"format": "peft", "config": {}}, **extra)


def test_export_names_alpha_layouts(tmp_path: Path) -> None:
    ad = peft_like()
    path = write_kohya(ad, tmp_path / "k.safetensors")
    t, meta = load_st(path)
    k = "lora_unet_model_layers_0_self_attn_q_proj"
    assert {f"{k}.lora_down.weight", f"{k}.lora_up.weight", f"{k}.alpha"} <= set(t)
    assert len(t) == 3 * len(ad)
    names = json.loads(meta[META_NAMES])
    assert names[k] == "model.layers.0.self_attn.q_proj" and len(names) == len(ad)
    # plain LoRA: kohya alpha is our alpha, 0-d, in the factors' dtype
    assert bits(t[f"{k}.alpha"]) == bits(np.array(16.0, np.float32))
    # rsLoRA: kohya alpha = alpha·sqrt(r), so that kohya's alpha/rank is our scale
    kr = "lora_unet_model_layers_1_self_attn_q_proj"
    assert float(t[f"{kr}.alpha"]) == np.float32(16 * math.sqrt(8))
    assert math.isclose(float(t[f"{kr}.alpha"]) / 8, ad.modules["model.layers.1.self_attn.q_proj"].summary()["scale"], rel_tol=1e-7)
    # embedding / fan_in_fan_out: up·down is ΔW in the base weight's own layout
    for name in ("model.embed_tokens", "transformer.h.0.attn.c_attn"):
        kn = "lora_unet_" + name.replace(".", "_")
        m = ad.modules[name]
        kohya_delta = reference_delta(
            t[f"{kn}.lora_down.weight"], t[f"{kn}.lora_up.weight"], float(t[f"{kn}.alpha"]) / m.params["rank"]
        )
        assert kohya_delta.shape == m.base_shape
        np.testing.assert_allclose(m.delta(), kohya_delta, rtol=1e-5, atol=1e-6)
    assert json.loads(meta[META_PARAMS]) == {
        "lora_unet_model_embed_tokens": {"layout": "embedding"},
        "lora_unet_transformer_h_0_attn_c_attn": {"layout": "fan_in_fan_out"},
        kr: {"rslora": True, "alpha": 16},
    }
    # import restores dotted names, layouts, rsLoRA alpha and the factors bit for bit
    back = read_kohya(path)
    assert sorted(back.modules) == sorted(ad.modules)
    for name, m in ad.modules.items():
        assert back.modules[name].params == m.params
        assert back.modules[name].base_shape == m.base_shape
        for slot in ("A", "B"):
            assert bits(back.modules[name].array(slot)) == bits(m.array(slot))
    # and exporting the import again gives the same file
    assert_same_file(path, write_kohya(back, tmp_path / "again.safetensors"))
    # PEFT has one use_rslora switch per adapter: this mix cannot become a PEFT folder
    with pytest.raises(ConversionError, match="use_rslora"):
        write_peft(back, tmp_path / "peft")


def test_rslora_without_metadata_keeps_kohya_alpha(tmp_path: Path) -> None:
    ad = peft_like()
    path = write_kohya(ad, tmp_path / "k.safetensors")
    t, meta = load_st(path)
    del meta[META_PARAMS]
    save_file(t, path, metadata=meta)
    back = read_kohya(path)
    m = back.modules["model.layers.1.self_attn.q_proj"]
    assert m.params["rslora"] is False and m.params["alpha"] == float(np.float32(16 * math.sqrt(8)))
    np.testing.assert_allclose(m.delta(), ad.delta(m.name), rtol=1e-6, atol=1e-7)
    # without the layout entry the embedding comes back as a linear module with the same ΔW
    e = back.modules["model.embed_tokens"]
    assert e.params["layout"] == "linear" and e.base_shape == (100, 64)
    np.testing.assert_allclose(e.delta(), ad.delta("model.embed_tokens"), rtol=1e-6, atol=1e-7)


def test_stale_rslora_metadata_is_ignored_with_note(tmp_path: Path) -> None:
    path = write_kohya(peft_like(), tmp_path / "k.safetensors")
    t, meta = load_st(path)
    t["lora_unet_model_layers_1_self_attn_q_proj.alpha"] = np.array(5.0, np.float32)  # edited by another tool
    save_file(t, path, metadata=meta)
    back = read_kohya(path)
    m = back.modules["model.layers.1.self_attn.q_proj"]
    assert m.params["rslora"] is False and m.params["alpha"] == 5.0
    assert any("no longer fits" in n for n in back.source["notes"])


def test_bf16_rslora_alpha_is_float32(tmp_path: Path) -> None:
    ad = peft_like(BF16)
    t, _ = load_st(write_kohya(ad, tmp_path / "k.safetensors"))
    assert t["lora_unet_model_layers_0_self_attn_q_proj.alpha"].dtype == BF16  # 16 is exact in bf16
    assert t["lora_unet_model_layers_1_self_attn_q_proj.alpha"].dtype == np.float32  # 16·√8 is not
    back = read_kohya(tmp_path / "k.safetensors")
    assert back.modules["model.layers.1.self_attn.q_proj"].params["alpha"] == 16


def test_prefix_and_dtype(tmp_path: Path) -> None:
    ad = peft_like()
    t, _ = load_st(write_kohya(ad, tmp_path / "k.safetensors", prefix="lora_te", dtype="fp16"))
    key = "lora_te_model_layers_0_self_attn_v_proj"
    assert bits(t[f"{key}.lora_down.weight"]) == bits(ad.modules["model.layers.0.self_attn.v_proj"].array("A").astype(np.float16))
    assert t[f"{key}.alpha"].dtype == np.float16


def test_export_refusals(tmp_path: Path) -> None:
    ad = peft_like()
    m = ad.modules["model.layers.0.self_attn.v_proj"]
    m.tensors["magnitude"] = np.ones(32, np.float32)
    m.params["dora"] = True
    with pytest.raises(ConversionError, match="DoRA") as e:
        write_kohya(ad, tmp_path / "a.safetensors")
    assert e.type is ConversionError
    assert not (tmp_path / "a.safetensors").exists()

    ad = peft_like()
    ad.tensors["base_model.model.lm_head.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(ConversionError, match="drop_tensors"):
        write_kohya(ad, tmp_path / "b.safetensors")
    t, _ = load_st(write_kohya(ad, tmp_path / "b.safetensors", drop_tensors=True))
    assert "base_model.model.lm_head.weight" not in t

    rng = np.random.default_rng(0)
    clash = Adapter(modules={n: lora(n, rng, 8, 8, 2, 2) for n in ("a.b_c", "a_b.c")})
    with pytest.raises(ConversionError, match="collide"):
        write_kohya(clash, tmp_path / "c.safetensors")

    broken = Adapter(modules={"x.y": Module("x.y", "svd", (8, 8), {}, {})})  # other encodings are lowered to lora: checked first
    with pytest.raises(RecordError, match="svd needs tensors S, Ut and Vt"):
        write_kohya(broken, tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()

    with pytest.raises(ConversionError, match="no modules to export") as e:
        write_kohya(Adapter(), tmp_path / "e.safetensors")
    assert e.type is ConversionError and not (tmp_path / "e.safetensors").exists()

    ad = peft_like()
    ad.source = {"format": "kohya", "no_alpha": 5}
    with pytest.raises(ConversionError, match="no_alpha") as e:
        write_kohya(ad, tmp_path / "f.safetensors")
    assert e.type is ConversionError


def test_deeply_nested_safetensors_header_is_unrecognized(tmp_path: Path) -> None:
    from adapterpack.errors import UnrecognizedInputError

    header = b"[" * 200_000 + b"]" * 200_000
    path = tmp_path / "deep.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(UnrecognizedInputError, match="header is not JSON") as e:
        detect_format(path)
    assert e.type is UnrecognizedInputError
    with pytest.raises(UnrecognizedInputError):
        adapterpack.open(path)


# --- bad input ----------------------------------------------------------------------------------


def rewrite(path: Path, change: dict[str, Any], drop: tuple[str, ...] = (), meta: dict[str, str] | None = None) -> None:
    t, m = load_st(path)
    for k in drop:
        del t[k]
    t.update(change)
    save_file(t, path, metadata=meta if meta is not None else m)


@pytest.mark.parametrize(
    ("change", "drop", "meta", "message"),
    [
        ({}, (f"{LIN}.lora_up.weight",), None, f"module '{LIN}' needs both lora_down and lora_up"),
        ({f"{LIN}.alpha": np.array(np.nan, np.float16)}, (), None, "alpha is nan"),
        ({f"{LIN}.alpha": np.ones(2, np.float16)}, (), None, "alpha must be a single number"),
        ({f"{LIN}.lora_up.weight": np.zeros((48, 3), np.float16)}, (), None, "disagree on the rank"),
        ({f"{LIN}.lora_up.weight": np.zeros((48, 4), np.int8)}, (), None, "share one float dtype"),  # mixed floats: widened
        ({}, (), {META_NAMES: "{oops"}, "not valid JSON"),
        ({}, (), {META_NAMES: "[" * 100_000}, "not valid JSON"),
        ({}, (), {META_PARAMS: "[" * 100_000 + "]" * 100_000}, "not valid JSON"),
        ({}, (), {META_NAMES: json.dumps({LIN: "x", CONV: "x"})}, "two kohya modules map to the module name 'x'"),
    ],
)
def test_read_errors(
    kohya_file: Path, change: dict[str, Any], drop: tuple[str, ...], meta: dict[str, str] | None, message: str
) -> None:
    rewrite(kohya_file, change, drop, meta)
    with pytest.raises(InputError, match=message) as e:
        read_kohya(kohya_file)
    assert e.type is InputError


def test_no_lora_modules(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a.hada_w1_a": np.zeros((2, 2), np.float32), "a.lora_up.weight": np.zeros((2, 2), np.float32)}, path)
    with pytest.raises(InputError, match="needs both lora_down and lora_up"):
        read_kohya(path)
    save_file({"a.hada_w1_a": np.zeros((2, 2), np.float32)}, path)
    with pytest.raises(InputError, match="no kohya LoRA modules"):
        read_kohya(path)


# --- a real PEFT rsLoRA adapter through kohya ------------------------------------------------


def test_real_peft_rslora_through_kohya(tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128
    )
    base = LlamaForCausalLM(cfg).eval()
    keep = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(
            base, LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        pm.save_pretrained(tmp_path / "peft")
    path = write_kohya(read_peft(tmp_path / "peft"), tmp_path / "k.safetensors")
    t, _ = load_st(path)
    from peft.tuners.lora import LoraLayer

    for name, layer in pm.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        k = "lora_unet_" + name.replace(".", "_")
        ref = layer.get_delta_weight("default").detach().numpy()
        kohya_delta = reference_delta(t[f"{k}.lora_down.weight"], t[f"{k}.lora_up.weight"], float(t[f"{k}.alpha"]) / 8)
        np.testing.assert_allclose(kohya_delta, ref, rtol=1e-5, atol=1e-6)
    # kohya → PEFT: a rebuilt config (use_rslora, lora_alpha 16) loads the same model as the original
    folder = write_peft(read_kohya(path), tmp_path / "peft2")
    assert json.loads((folder / "adapter_config.json").read_text())["use_rslora"] is True
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        a = PeftModel.from_pretrained(copy.deepcopy(keep), tmp_path / "peft").eval()(input_ids=ids).logits
        b = PeftModel.from_pretrained(copy.deepcopy(keep), folder).eval()(input_ids=ids).logits
    assert torch.equal(a, b)
