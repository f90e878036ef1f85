"""--to gguf: llama.cpp LoRA adapters read back with gguf's own reader and checked against ΔW."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.errors import ConversionError
from adapterpack.examples import example_path
from adapterpack.formats.gguf import GgufBase, base_from_config, permute_rows, write_gguf

gguf = pytest.importorskip("gguf")  # a declared test dependency: this only gives a clear message if it is missing


def _read(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    r = gguf.GGUFReader(str(path))
    fields = {}
    for k, f in r.fields.items():
        part = f.parts[f.data[0]] if f.data else None
        if part is None or k.startswith("GGUF."):
            continue
        fields[k] = bytes(part).decode() if part.dtype == np.uint8 else part[0].item()
    tensors = {}
    for t in r.tensors:
        data = np.array(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = data.view(ml_dtypes.bfloat16).reshape(data.shape[0], -1)
        tensors[t.name] = data
    return fields, tensors


@pytest.mark.slow
def test_bundled_adapter_matches_delta_and_base_layout(tmp_path: Path) -> None:
    from safetensors import safe_open

    from adapterpack.formats.gguf import base_from_gguf
    from tools.fixtures import smollm2

    base_reader = gguf.GGUFReader(str(smollm2.gguf_path()))  # parsed once (seconds: the tokenizer is in its metadata)
    assert base_from_gguf(base_reader) == GgufBase("llama", 9, 3)
    ad = adapterpack.open(example_path())
    out = tmp_path / "ex.gguf"
    res = write_gguf(ad, out, base=base_from_gguf(base_reader))
    fields, tensors = _read(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 16.0
    assert len(tensors) == 240 == res.tensors and res.baked == [] and len(res.permuted) == 60
    for m in ad:
        layer, proj = m.name.split(".")[2], m.name.rsplit(".", 1)[1]
        g = f"blk.{layer}.{ {'q_proj': 'attn_q', 'k_proj': 'attn_k', 'v_proj': 'attn_v', 'o_proj': 'attn_output'}[proj] }.weight"
        a, b = tensors[g + ".lora_a"], tensors[g + ".lora_b"]
        assert a.tobytes() == m.array("A").tobytes()  # A as is, [r, in]
        heads = {"q_proj": 9, "k_proj": 3}.get(proj)
        want_b = permute_rows(m.array("B"), heads) if heads else m.array("B")
        assert b.tobytes() == want_b.tobytes()
        # llama.cpp's ΔW: alpha/r · B·A, in its row order
        got = fields["adapter.lora.alpha"] / a.shape[0] * (b.astype(np.float64) @ a.astype(np.float64))
        ref = m.delta().astype(np.float64)
        ref = permute_rows(ref, heads) if heads else ref
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    # the permutation is llama.cpp's: the HF weights of the base model, permuted, are the base GGUF's tensors bit for bit
    base = {t.name: t for t in base_reader.tensors}
    with safe_open(str(smollm2.model_dir() / "model.safetensors"), "np") as f:
        for hf, g, heads in (
            ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", 9),
            ("model.layers.7.self_attn.k_proj.weight", "blk.7.attn_k.weight", 3),
        ):
            w = f.get_tensor(hf)
            deq = gguf.quants.dequantize(base[g].data, base[g].tensor_type).reshape(w.shape)
            assert np.array_equal(permute_rows(w, heads), deq) and not np.array_equal(w, deq)


def _mixed() -> Adapter:
    """Per-module ranks and alphas (one rsLoRA), an embedding and MLP modules: llama names, no q/k."""
    rng = np.random.default_rng(0)

    def lora(name: str, out: int, inp: int, r: int, alpha: float, **extra: object) -> Module:
        a = rng.standard_normal((r, inp)).astype(np.float32)
        b = (rng.standard_normal((out, r)) * 0.1).astype(np.float32)
        base = (inp, out) if extra.get("layout") == "embedding" else (out, inp)
        return Module(name, "lora", base, {"rank": r, "alpha": alpha, **extra}, {"A": a, "B": b})

    mods = [
        lora("model.layers.0.self_attn.v_proj", 8, 16, 4, 8.0),
        lora("model.layers.0.mlp.up_proj", 24, 16, 4, 8.0),
        lora("model.layers.1.mlp.down_proj", 16, 24, 2, 6.0),
        lora("model.layers.1.self_attn.o_proj", 16, 16, 2, 4.0, rslora=True),
        lora("model.embed_tokens", 16, 40, 4, 8.0, layout="embedding"),
    ]
    return Adapter(base_model="tiny/llama", base_architecture="LlamaForCausalLM", modules={m.name: m for m in mods})


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_per_module_scales_are_baked_into_b(tmp_path: Path, dtype: str) -> None:
    ad = _mixed()
    out = tmp_path / "m.gguf"
    res = write_gguf(ad, out, dtype=dtype)
    fields, tensors = _read(out)
    alpha = fields["adapter.lora.alpha"]
    assert alpha == 8.0  # s·r = 8 for three of the five modules
    assert sorted(res.baked) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"] and res.permuted == []
    names = {
        "model.layers.0.self_attn.v_proj": "blk.0.attn_v",
        "model.layers.0.mlp.up_proj": "blk.0.ffn_up",
        "model.layers.1.mlp.down_proj": "blk.1.ffn_down",
        "model.layers.1.self_attn.o_proj": "blk.1.attn_output",
        "model.embed_tokens": "token_embd",
    }
    tol = {"f32": 1e-6, "f16": 2e-3, "bf16": 1.6e-2}[dtype]
    for m in ad:
        a = tensors[names[m.name] + ".weight.lora_a"].astype(np.float64)
        b = tensors[names[m.name] + ".weight.lora_b"].astype(np.float64)
        if m.params.get("layout") == "embedding":
            assert a.shape == (40, 4)  # llama.cpp reads token_embd's lora_a transposed
            got = (alpha / a.shape[1] * (b @ a.T)).T
        else:
            got = alpha / a.shape[0] * (b @ a)
        ref = m.delta().astype(np.float64)
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())
        if dtype == "f32" and m.name not in res.baked:
            assert tensors[names[m.name] + ".weight.lora_b"].tobytes() == m.array("B").tobytes()


TARGET = {"f16": np.float16, "bf16": ml_dtypes.bfloat16}


def _nearest(x: np.ndarray, dtype: type) -> np.ndarray:
    """float64 ``x`` rounded once to ``dtype`` (nearest, ties to even), by comparing the float64 distances to
    the three neighbours of a first guess in the 16-bit code space (independent of any library cast)."""
    guess = x.astype(np.float32).astype(dtype).view(np.uint16).astype(np.int32)
    cands = np.stack([guess - 1, guess, guess + 1]).astype(np.uint16)
    vals = cands.view(dtype).astype(np.float64)
    dist = np.abs(vals - x)
    best = dist.min(axis=0)
    tied = (dist == best) & ((cands & 1) == 0)  # among equally near: the even code
    pick = np.where(tied.any(axis=0), np.argmax(tied, axis=0), np.argmin(dist, axis=0))
    return np.take_along_axis(cands, pick[None], 0)[0].view(dtype)


def _double_rounding_cases(dtype: type, factor: float, n: int) -> np.ndarray:
    """float32 values b whose float64 product b·factor rounds differently once than through float32."""
    rng = np.random.default_rng(7)
    h = rng.standard_normal(4000).astype(dtype)
    nxt = (h.view(np.uint16) + 1).view(dtype)
    mid = (h.astype(np.float64) + nxt.astype(np.float64)) / 2
    b0 = (mid / factor).astype(np.float32).view(np.int32)
    found = []
    for k in range(-3, 4):
        b = (b0 + k).view(np.float32)
        x = b.astype(np.float64) * factor
        hit = _nearest(x, dtype).view(np.uint16) != x.astype(np.float32).astype(dtype).view(np.uint16)
        found.extend(b[hit].tolist())
    out = np.unique(np.array(found, np.float32))[:n]
    assert out.size == n
    return out


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_baked_b_is_rounded_once_from_float64(tmp_path: Path, dtype: str) -> None:
    """A module whose scale is baked (s·r = 6 against alpha 8: factor 0.75) gets B' = round(B·0.75) straight from
    float64; the B values are chosen where rounding through float32 first would give a different 16-bit value."""
    target = TARGET[dtype]
    rng = np.random.default_rng(3)
    b = _double_rounding_cases(target, 0.75, 32).reshape(16, 2)
    mods = {
        "model.layers.0.self_attn.v_proj": Module("model.layers.0.self_attn.v_proj", "lora", (8, 16), {"rank": 4, "alpha": 8.0},
                                                  {"A": rng.standard_normal((4, 16)).astype(np.float32),
                                                   "B": rng.standard_normal((8, 4)).astype(np.float32)}),
        "model.layers.0.mlp.down_proj": Module("model.layers.0.mlp.down_proj", "lora", (16, 24), {"rank": 2, "alpha": 6.0},
                                               {"A": rng.standard_normal((2, 24)).astype(np.float32), "B": b}),
    }
    ad = Adapter(base_model="tiny/llama", base_architecture="LlamaForCausalLM", modules=mods)
    res = write_gguf(ad, tmp_path / "r.gguf", dtype=dtype)
    assert res.baked == ["model.layers.0.mlp.down_proj"] and res.alpha == 8.0
    got = _read(tmp_path / "r.gguf")[1]["blk.0.ffn_down.weight.lora_b"]
    product = b.astype(np.float64) * 0.75
    want = _nearest(product, target)
    assert got.view(np.uint16).tobytes() == want.view(np.uint16).tobytes()
    twice = product.astype(np.float32).astype(target)
    assert np.count_nonzero(twice.view(np.uint16) != want.view(np.uint16)) == 32  # the check bites on every value


def test_written_like_every_other_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """atomic_file: the mode an .apack gets under umask 022, the folder fsynced, and a write failing half-way
    leaves the previous file as it was and no temp file."""
    import adapterpack.atomic

    synced = []
    real_sync = adapterpack.atomic._fsync_dir
    monkeypatch.setattr(adapterpack.atomic, "_fsync_dir", lambda d: (synced.append(Path(d)), real_sync(d)))
    old = os.umask(0o022)
    try:
        adapterpack.save(_mixed(), tmp_path / "m.apack")
        write_gguf(_mixed(), tmp_path / "m.gguf")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "m.gguf").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "m.apack").stat().st_mode) == 0o644
    assert synced[-1] == tmp_path
    good = (tmp_path / "m.gguf").read_bytes()
    assert _read(tmp_path / "m.gguf")[0]["adapter.lora.alpha"] == 8.0

    def failing(self: object, **kw: object) -> None:
        self.write_ti_data_to_file()  # the tensor table is out, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", failing)
    with pytest.raises(OSError, match="No space"):
        write_gguf(_mixed(), tmp_path / "m.gguf", dtype="f16")
    with pytest.raises(OSError, match="No space"):
        write_gguf(_mixed(), tmp_path / "new.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.apack", "m.gguf"]


def test_refusals(tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    ad = adapterpack.open(example_path())
    with pytest.raises(ConversionError, match="head counts"):
        write_gguf(ad, out)  # q_proj/k_proj without the base model's head counts
    dora = _mixed()
    m = dora.modules["model.layers.0.self_attn.v_proj"]
    m.params["dora"] = True
    m.tensors["magnitude"] = np.ones(8, np.float32)
    with pytest.raises(ConversionError, match="DoRA"):
        write_gguf(dora, out)
    extra = _mixed()
    extra.tensors["base_model.model.lm_head.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ConversionError, match="--drop-tensors"):
        write_gguf(extra, out)
    write_gguf(extra, out, drop_tensors=True)
    odd = _mixed()
    odd.modules["vision.proj"] = Module(
        "vision.proj",
        "lora",
        (4, 4),
        {"rank": 1, "alpha": 1.0},
        {"A": np.ones((1, 4), np.float32), "B": np.ones((4, 1), np.float32)},
    )
    with pytest.raises(ConversionError, match=r"no llama.cpp tensor name.*vision\.proj"):
        write_gguf(odd, tmp_path / "odd.gguf")
    assert not (tmp_path / "odd.gguf").exists()
    with pytest.raises(ConversionError, match="dtype"):
        write_gguf(_mixed(), out, dtype="q8_0")
    with pytest.raises(ConversionError, match="rotary"):
        permute_rows(np.ones((10, 2)), 3)


def test_base_from_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "num_attention_heads": 9, "num_key_value_heads": 3}'
    )
    assert base_from_config(tmp_path) == GgufBase("llama", 9, 3)
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ConversionError, match="LlamaForCausalLM"):
        base_from_config(tmp_path)
