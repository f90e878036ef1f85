"""Odd-but-legal and hostile importer inputs (review round): factor dtypes, safetensors dtypes adapterpack cannot store."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import adapterpack
from adapterpack.errors import InputError
from tests.apack_builders import lora_gguf

BF16 = ml_dtypes.bfloat16
K = "lora_unet_down_blocks_0_attentions_0_proj_in"
D = "unet.down_blocks.0.attentions.0.proj_in"
MIXES = [(np.float16, BF16), (BF16, np.float32), (np.float32, np.float16), (np.float64, np.float16)]


def _factors(down_dt: object, up_dt: object) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, 32)).astype(down_dt), (rng.standard_normal((48, 4)) * 0.1).astype(up_dt)


def _ref(down: np.ndarray, up: np.ndarray, scale: float) -> np.ndarray:
    return scale * (up.astype(np.float64) @ down.astype(np.float64))


def _check(ad: adapterpack.Adapter, name: str, down: np.ndarray, up: np.ndarray, scale: float) -> None:
    m = ad.module(name)
    f = m.factors()
    a, b = np.asarray(f.A), np.asarray(f.B)
    assert a.dtype == b.dtype
    # the common dtype holds both factors' values exactly
    assert np.array_equal(a.astype(np.float64), down.astype(np.float64))
    assert np.array_equal(b.astype(np.float64), up.astype(np.float64))
    np.testing.assert_allclose(m.delta().astype(np.float64), _ref(down, up, scale), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("down_dt", "up_dt"), MIXES)
def test_kohya_factors_of_two_float_dtypes_are_read(tmp_path: Path, down_dt: object, up_dt: object) -> None:
    """kohya, ComfyUI and diffusers copy each factor into the layer's dtype, so a file may mix them (was InputError)."""
    down, up = _factors(down_dt, up_dt)
    path = tmp_path / "k.safetensors"
    save_file({f"{K}.lora_down.weight": down, f"{K}.lora_up.weight": up, f"{K}.alpha": np.array(2.0, np.float32)}, path)
    ad = adapterpack.open(path)
    _check(ad, K, down, up, 0.5)
    assert any("dtype" in n for n in ad.source.get("notes", []))
    adapterpack.save(ad, tmp_path / "k.apack")
    _check(adapterpack.open(tmp_path / "k.apack"), K, down, up, 0.5)


@pytest.mark.parametrize(("down_dt", "up_dt"), MIXES)
def test_peft_factors_of_two_float_dtypes_are_read(tmp_path: Path, down_dt: object, up_dt: object) -> None:
    """PEFT's load_state_dict copies each tensor into its parameter's dtype: a mixed file loads there (was InputError)."""
    down, up = _factors(down_dt, up_dt)
    folder = tmp_path / "peft"
    folder.mkdir()
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{pre}.lora_A.weight": down, f"{pre}.lora_B.weight": up}, folder / "adapter_model.safetensors")
    ad = adapterpack.open(folder)
    _check(ad, "model.layers.0.self_attn.q_proj", down, up, 2.0)


@pytest.mark.parametrize(("down_dt", "up_dt"), MIXES[:2])
def test_diffusers_factors_of_two_float_dtypes_are_read(tmp_path: Path, down_dt: object, up_dt: object) -> None:
    down, up = _factors(down_dt, up_dt)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({f"{D}.lora_A.weight": down, f"{D}.lora_B.weight": up}, path)
    ad = adapterpack.open(path)
    _check(ad, D, down, up, 1.0)


def test_integer_factor_is_still_refused(tmp_path: Path) -> None:
    down, up = _factors(np.float16, np.float16)
    path = tmp_path / "k.safetensors"
    save_file({f"{K}.lora_down.weight": down, f"{K}.lora_up.weight": up.astype(np.int8)}, path)
    with pytest.raises(InputError, match="float"):
        adapterpack.open(path)


def _raw_safetensors(path: Path, header: dict[str, object], data: bytes) -> None:
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


@pytest.mark.parametrize("code", ["F8_E4M3", "F8_E5M2", "C64", "F4", "U64"])
def test_a_dtype_adapterpack_cannot_store_is_named(tmp_path: Path, code: str) -> None:
    """A float8 alpha (or any tensor of a dtype we do not store) is refused naming the tensor and its dtype,
    not with numpy's "module 'numpy' has no attribute 'float8_e4m3fn'"."""
    down, up = _factors(np.float16, np.float16)
    hdr: dict[str, object] = {}
    data = b""
    for key, arr in ((f"{K}.lora_down.weight", down), (f"{K}.lora_up.weight", up)):
        hdr[key] = {"dtype": "F16", "shape": list(arr.shape), "data_offsets": [len(data), len(data) + arr.nbytes]}
        data += arr.tobytes()
    size = {"F8_E4M3": 1, "F8_E5M2": 1, "C64": 8, "F4": 1, "U64": 8}[code]
    hdr[f"{K}.alpha"] = {"dtype": code, "shape": [], "data_offsets": [len(data), len(data) + size]}
    _raw_safetensors(tmp_path / "k.safetensors", hdr, data + b"\x01" * size)
    with pytest.raises(InputError, match=rf"{K}\.alpha.*(dtype {code}|uint64)") as e:
        adapterpack.open(tmp_path / "k.safetensors")
    assert "numpy" not in str(e.value)


def test_gguf_q8_0_lora_a_beside_an_f16_lora_b_is_read(tmp_path: Path) -> None:
    """llama.cpp's converter with --outtype q8_0 quantizes lora_a but keeps lora_b (rows of rank < 32, not whole
    Q8_0 blocks) in F16: read as float32 (the Q8_0 values dequantized, B widened exactly); was refused."""
    import gguf

    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((4, 64)).astype(np.float32), (rng.standard_normal((32, 4)) * 0.1).astype(np.float16)
    q8, bf16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.BF16
    lora_gguf(tmp_path / "q.gguf", {
        "blk.0.ffn_up.weight.lora_a": (gguf.quants.quantize(a, q8), q8),
        "blk.0.ffn_up.weight.lora_b": b,
        "blk.0.attn_output.weight.lora_a": (a.astype(BF16).view(np.uint8), bf16),
        "blk.0.attn_output.weight.lora_b": b.astype(np.float16),
    }, alpha=8.0)
    ad = adapterpack.open(tmp_path / "q.gguf")
    deq = gguf.quants.dequantize(gguf.quants.quantize(a, q8), q8)
    _check(ad, "model.layers.0.mlp.up_proj", deq, b, 2.0)
    _check(ad, "model.layers.0.self_attn.o_proj", a.astype(BF16), b, 2.0)


@pytest.mark.parametrize("flag", ["use_rslora", "use_dora", "fan_in_fan_out"])
def test_peft_config_flag_null_reads_as_false(tmp_path: Path, flag: str) -> None:
    """PEFT's LoraConfig takes ``null`` for its boolean flags and tests them for truth (null = off); a config
    written by hand or another trainer may hold one (was InputError 'must be true or false')."""
    down, up = _factors(np.float32, np.float32)
    folder = tmp_path / "peft"
    folder.mkdir()
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], flag: None}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{pre}.lora_A.weight": down, f"{pre}.lora_B.weight": up}, folder / "adapter_model.safetensors")
    ad = adapterpack.open(folder)
    m = ad.module("model.layers.0.self_attn.q_proj")
    assert m.params["rslora"] is False and m.params["dora"] is False and m.params["fan_in_fan_out"] is False
    _check(ad, "model.layers.0.self_attn.q_proj", down, up, 2.0)
    # and it converts back to a PEFT folder that reads the same
    from adapterpack.ops.convert import convert

    adapterpack.save(ad, tmp_path / "a.apack")
    convert(tmp_path / "a.apack", tmp_path / "back", to="peft")
    _check(adapterpack.open(tmp_path / "back"), "model.layers.0.self_attn.q_proj", down, up, 2.0)


@pytest.mark.parametrize("value", [1, "false", 0.0])
def test_peft_config_flag_of_another_type_is_still_refused(tmp_path: Path, value: object) -> None:
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "use_rslora": value}))
    down, up = _factors(np.float32, np.float32)
    pre = "base_model.model.q_proj"
    save_file({f"{pre}.lora_A.weight": down, f"{pre}.lora_B.weight": up}, folder / "adapter_model.safetensors")
    with pytest.raises(InputError, match="use_rslora must be true or false"):
        adapterpack.open(folder)


def _qwen2_gguf(path: Path) -> tuple[np.ndarray, np.ndarray]:

    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((4, 64)).astype(np.float32), (rng.standard_normal((64, 4)) * 0.1).astype(np.float32)
    lora_gguf(path, {f"blk.0.{t}.weight.lora_{x}": m for t in ("attn_q", "ffn_up") for x, m in (("a", a), ("b", b))}, arch="qwen2")
    return a, b


def test_a_qwen2_gguf_written_back_keeps_its_architecture(tmp_path: Path) -> None:
    """llama.cpp refuses a LoRA whose general.architecture differs from the model's: a qwen2 adapter read (its
    tensor names kept) and written again, directly or after compress, must stay qwen2 (was: written as llama)."""
    import gguf

    from adapterpack.ops.compress import compress_file
    from adapterpack.ops.convert import convert

    a, b = _qwen2_gguf(tmp_path / "q.gguf")
    convert(tmp_path / "q.gguf", tmp_path / "back.gguf")
    compress_file(tmp_path / "q.gguf", tmp_path / "c.apack", budget=10**6)
    convert(tmp_path / "c.apack", tmp_path / "c.gguf")
    for out in ("back.gguf", "c.gguf"):
        r = gguf.GGUFReader(str(tmp_path / out))
        arch = r.fields["general.architecture"]
        assert bytes(arch.parts[arch.data[0]]).decode() == "qwen2", out
        assert sorted(t.name for t in r.tensors) == sorted(f"blk.0.{t}.weight.lora_{s}" for t in ("attn_q", "ffn_up") for s in "ab")
        back = adapterpack.open(tmp_path / out)
        assert sorted(back.modules) == ["blk.0.attn_q", "blk.0.ffn_up"]
        if out == "back.gguf":  # the compressed one is within its reported error, not exact
            _check(back, "blk.0.attn_q", a, b, 1.0)
