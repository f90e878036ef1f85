"""adapterpack.ops.convert: exact ΔW errors of dtype casts, conversions between formats, overwrite rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import adapterpack
from adapterpack import Adapter, Module
from adapterpack.container.reader import ApackReader
from adapterpack.dtypes import cast_array
from adapterpack.errors import ConversionError, OutputExistsError, UnknownDTypeError
from adapterpack.factors import Factors
from adapterpack.ops.convert import (
    adapter_differences,
    cast_adapter,
    convert,
    delta_error,
    infer_target,
    safetensors_differences,
    target_conflict,
)
from tests.factories import qv_adapter

BF16 = ml_dtypes.bfloat16


def toy_adapter(seed: int = 0, name: str = "default", dtype: type = np.float32) -> Adapter:
    """Linear, fan_in_fan_out, embedding, conv and DoRA modules plus two pass-through tensors."""
    rng = np.random.default_rng(seed)

    def f(*shape: int, s: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * s).astype(dtype)

    mods = [
        Module("layers.0.q_proj", "lora", (40, 24), {"rank": 4, "alpha": 8.0}, {"A": f(4, 24), "B": f(40, 4, s=0.1)}),
        Module("layers.0.v_proj", "lora", (16, 24), {"rank": 2, "alpha": 4.0, "rslora": True}, {"A": f(2, 24), "B": f(16, 2)}),
        Module("h.0.c_attn", "lora", (24, 30), {"rank": 3, "alpha": 3.0, "fan_in_fan_out": True}, {"A": f(3, 24), "B": f(30, 3)}),
        Module("embed_tokens", "lora", (50, 12), {"rank": 2, "alpha": 2.0, "layout": "embedding"}, {"A": f(2, 50), "B": f(12, 2)}),
        Module("conv", "lora", (6, 5, 3, 3), {"rank": 2, "alpha": 2.0, "layout": "conv"}, {"A": f(2, 5, 3, 3), "B": f(6, 2, 1, 1)}),
        Module(
            "layers.1.o_proj",
            "lora",
            (24, 24),
            {"rank": 4, "alpha": 4.0, "dora": True},
            {"A": f(4, 24), "B": f(24, 4), "magnitude": (1 + f(24, s=0.1)).astype(dtype)},
        ),
    ]
    return Adapter(
        name=name,
        base_model="toy/base",
        base_architecture="ToyForCausalLM",
        modules={m.name: m for m in mods},
        tensors={"lm_head.weight": f(7, 24), "steps": np.arange(5, dtype=np.int64)},
        source={"format": "test", "notes": ["a note"]},
    )


def dense_delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    return scale * (b.reshape(b.shape[0], -1).astype(np.float64) @ a.reshape(a.shape[0], -1).astype(np.float64))


# --- delta_error against a dense reference ---------------------------------------------------------


@pytest.mark.parametrize("cast_to", [BF16, np.float16])
def test_delta_error_matches_dense_numpy(cast_to: type) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((8, 300)).astype(np.float32), rng.standard_normal((200, 8)).astype(np.float32)
    a2, b2 = a.astype(cast_to).astype(np.float32), b.astype(cast_to).astype(np.float32)
    before, after = Factors(a, b, 2.0, (200, 300)), Factors(a2, b2, 2.0, (200, 300))
    err, norm = delta_error(before, after)
    d, d2 = dense_delta(a, b, 2.0), dense_delta(a2, b2, 2.0)
    assert err == pytest.approx(np.linalg.norm(d - d2), rel=1e-9)
    assert norm == pytest.approx(np.linalg.norm(d), rel=1e-12)
    assert 1e-5 < err / norm < 1e-2  # a real, nonzero cast error


def test_delta_error_different_ranks_and_scales() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((6, 20)), rng.standard_normal((10, 6))
    a2, b2 = rng.standard_normal((3, 20)), rng.standard_normal((10, 3))
    err, norm = delta_error(Factors(a, b, 0.5, (20, 10), transpose=True), Factors(a2, b2, 3.0, (20, 10), transpose=True))
    assert err == pytest.approx(np.linalg.norm(dense_delta(a, b, 0.5) - dense_delta(a2, b2, 3.0)), rel=1e-10)
    assert norm == pytest.approx(np.linalg.norm(dense_delta(a, b, 0.5)), rel=1e-12)


def test_delta_error_identical_factors_is_zero() -> None:
    rng = np.random.default_rng(3)
    f = Factors(rng.standard_normal((4, 9)).astype(np.float32), rng.standard_normal((7, 4)).astype(np.float32), 1.5, (7, 9))
    assert delta_error(f, f)[0] == 0.0


def test_delta_error_refuses_different_shapes() -> None:
    f = Factors(np.ones((1, 3)), np.ones((2, 1)), 1.0, (2, 3))
    g = Factors(np.ones((1, 2)), np.ones((3, 1)), 1.0, (3, 2))
    with pytest.raises(ConversionError):
        delta_error(f, g)


# --- cast_adapter --------------------------------------------------------------------------------


def test_cast_adapter_bf16_errors_match_dense_reference() -> None:
    src = toy_adapter()
    cast, rep = cast_adapter(src, "bf16")
    assert rep.dtype == "bfloat16"
    floats = [t for m in src for t in m.tensors.values()] + [src.tensors["lm_head.weight"]]
    assert rep.tensors_cast == len(floats)
    ref_max = max(float(np.max(np.abs(t.astype(np.float64) - t.astype(BF16).astype(np.float64)))) for t in floats)
    assert rep.max_abs_error == ref_max > 0
    total_err2 = total_norm2 = 0.0
    for m in src:
        new = cast.modules[m.name]
        for slot, t in m.tensors.items():  # values are numpy's (round-to-nearest-even) bf16 casts
            assert new.tensors[slot].dtype == BF16
            assert np.array_equal(new.tensors[slot].view(np.uint16), t.astype(BF16).view(np.uint16))
        d, d2 = m.delta().astype(np.float64), new.delta().astype(np.float64)
        assert d.shape == d2.shape == tuple(m.base_shape)
        mc = next(x for x in rep.modules if x.module == m.name)
        assert mc.delta_rel_error == pytest.approx(np.linalg.norm(d - d2) / np.linalg.norm(d), rel=1e-4)
        total_err2 += np.linalg.norm(d - d2) ** 2
        total_norm2 += np.linalg.norm(d) ** 2
    assert rep.delta_rel_error == pytest.approx(math.sqrt(total_err2 / total_norm2), rel=1e-4)
    assert rep.worst_module.delta_rel_error == max(m.delta_rel_error for m in rep.modules)
    assert cast.tensors["steps"] is src.tensors["steps"]  # integers untouched
    assert cast.tensors["lm_head.weight"].dtype == BF16
    assert cast.source == src.source and cast.name == src.name


def test_cast_to_same_dtype_is_free() -> None:
    src = toy_adapter()
    cast, rep = cast_adapter(src, "fp32")
    assert rep.tensors_cast == 0 and rep.max_abs_error == 0 and rep.delta_rel_error == 0
    assert adapter_differences(src, cast) == []


def test_widening_cast_is_exact() -> None:
    src = toy_adapter(dtype=np.float16)
    _, rep = cast_adapter(src, "fp32")
    assert rep.tensors_cast > 0 and rep.max_abs_error == 0 and rep.delta_rel_error == 0


def test_cast_overflow_refused() -> None:
    with pytest.raises(ConversionError, match="overflows"):
        cast_array(np.array([1.0, 1e6], dtype=np.float32), "fp16", "module 'x' tensor 'A'")


def test_cast_array_keeps_integers_and_nan() -> None:
    ints = np.arange(3, dtype=np.int32)
    assert cast_array(ints, "bf16")[0] is ints
    out, err = cast_array(np.array([np.nan, 1.0, np.inf], dtype=np.float32), "fp16")
    assert out.dtype == np.float16 and np.isnan(out[0]) and np.isinf(out[2]) and err == 0.0


# --- convert --------------------------------------------------------------------------------------


def save_toy(path: Path, adapters: list[Adapter] | None = None, codec: str = "byteplanes") -> Path:
    adapterpack.save(adapters or [toy_adapter()], path, codec=codec)
    return path


def test_infer_target_and_conflicts() -> None:
    assert infer_target("x.apack") == "apack"
    assert infer_target("x.safetensors") == "kohya"
    assert infer_target("some/folder") == "peft"
    assert target_conflict("x.apack", "apack") is None
    assert target_conflict("x.apack", "kohya") is not None
    assert target_conflict("folder", "apack") is None


def test_convert_apack_to_apack_recodes_losslessly(tmp_path: Path) -> None:
    src = save_toy(tmp_path / "a.apack")
    res = convert(src, tmp_path / "b.apack", codec="raw")
    assert (res.src_format, res.dst_format, res.codec) == ("apack", "apack", "raw")
    assert res.dst_bytes == (tmp_path / "b.apack").stat().st_size and res.src_bytes == src.stat().st_size
    assert res.notes == ["a note"]
    with ApackReader(tmp_path / "b.apack") as r:
        assert {b.codec_id for b in r.blobs} == {"raw"}
    with adapterpack.open(src) as a, adapterpack.open(tmp_path / "b.apack") as b:
        assert adapter_differences(a, b) == []


def test_convert_with_dtype_writes_cast_values(tmp_path: Path) -> None:
    src = save_toy(tmp_path / "a.apack")
    res = convert(src, tmp_path / "b.apack", dtype="bf16")
    assert res.dtype == "bfloat16" and len(res.casts) == 1
    expected, rep = cast_adapter(toy_adapter(), "bf16")
    assert res.casts[0].as_dict() == rep.as_dict()
    with adapterpack.open(tmp_path / "b.apack") as b:
        assert adapter_differences(expected, b) == []


def test_convert_multi_adapter(tmp_path: Path) -> None:
    src = save_toy(tmp_path / "two.apack", [toy_adapter(0, "one"), toy_adapter(1, "two")])
    res = convert(src, tmp_path / "both.apack")
    assert res.adapters == ["one", "two"]
    assert ApackReader(tmp_path / "both.apack").adapter_names == ["one", "two"]
    res = convert(src, tmp_path / "second.apack", adapter="two")
    with adapterpack.open(tmp_path / "second.apack") as b:
        assert b.name == "two" and adapter_differences(toy_adapter(1, "two"), b) == []
    with pytest.raises(ConversionError, match="pick one"):
        convert(src, tmp_path / "peft_out", to="peft")
    assert not (tmp_path / "peft_out").exists()


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    src = save_toy(tmp_path / "a.apack")
    dst = tmp_path / "b.apack"
    dst.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="already exists"):
        convert(src, dst)
    assert dst.read_bytes() == b"precious"
    convert(src, dst, force=True)
    assert dst.read_bytes()[:4] == b"\x89APK"


def test_refuses_to_write_onto_the_source(tmp_path: Path) -> None:
    src = save_toy(tmp_path / "a.apack")
    with pytest.raises(ConversionError, match="same path"):
        convert(src, src, force=True)


def test_refuses_to_replace_a_folder_that_is_not_an_adapter(tmp_path: Path) -> None:
    src = save_toy(tmp_path / "a.apack")
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "thesis.tex").write_text("keep me")
    with pytest.raises(ConversionError, match="holds no PEFT adapter"):
        convert(src, folder, to="peft", force=True)
    with pytest.raises(ConversionError, match="is a folder"):
        convert(src, folder, to="apack", force=True)
    assert (folder / "thesis.tex").read_text() == "keep me"


def test_unknown_dtype_refused(tmp_path: Path) -> None:
    src = save_toy(tmp_path / "a.apack")
    with pytest.raises(UnknownDTypeError):
        convert(src, tmp_path / "b.apack", dtype="fp8")


def test_adapter_differences_sees_one_bit(tmp_path: Path) -> None:
    a, b = toy_adapter(), toy_adapter()
    b.modules["conv"].tensors["A"].view(np.uint32).reshape(-1)[5] ^= 1
    assert adapter_differences(a, b) == ["module 'conv' tensor 'A': values differ"]
    b.modules["conv"].params["alpha"] = 3.0
    assert any("params" in d for d in adapter_differences(a, b))


# --- PEFT and kohya (adapterpack.formats) -----------------------------------------------------------


def peft_adapter(seed: int = 0) -> Adapter:
    """A PEFT-exportable toy: q/v linear modules, one shared rank and alpha."""
    return qv_adapter(seed, layers=2, rank=4, in_features=24, q_out=32, v_out=16, b_scale=0.1)


def test_apack_peft_apack_round_trip_is_bit_exact(tmp_path: Path) -> None:
    src = save_toy(tmp_path / "a.apack", [peft_adapter()])
    res = convert(src, tmp_path / "peft")
    assert res.dst_format == "peft" and (tmp_path / "peft" / "adapter_config.json").is_file()
    assert res.dst_bytes == sum(p.stat().st_size for p in (tmp_path / "peft").iterdir())
    convert(tmp_path / "peft", tmp_path / "b.apack")
    with adapterpack.open(src) as a, adapterpack.open(tmp_path / "peft") as p, adapterpack.open(tmp_path / "b.apack") as b:
        assert adapter_differences(a, p) == []
        assert adapter_differences(a, b) == []
    convert(tmp_path / "b.apack", tmp_path / "peft2")
    assert (
        safetensors_differences(tmp_path / "peft" / "adapter_model.safetensors", tmp_path / "peft2" / "adapter_model.safetensors")
        == []
    )
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0


def test_peft_to_peft_with_bf16(tmp_path: Path) -> None:
    src = save_toy(tmp_path / "a.apack", [peft_adapter()])
    convert(src, tmp_path / "peft")
    res = convert(tmp_path / "peft", tmp_path / "peft16", dtype="bf16")
    expected, rep = cast_adapter(peft_adapter(), "bf16")
    assert res.casts[0].max_abs_error == rep.max_abs_error
    with adapterpack.open(tmp_path / "peft16") as p:
        assert adapter_differences(expected, p) == []


def test_safetensors_differences_sees_one_bit(tmp_path: Path) -> None:
    src = save_toy(tmp_path / "a.apack", [peft_adapter()])
    convert(src, tmp_path / "p1")
    convert(src, tmp_path / "p2")
    f1, f2 = tmp_path / "p1" / "adapter_model.safetensors", tmp_path / "p2" / "adapter_model.safetensors"
    assert safetensors_differences(f1, f2) == []
    data = bytearray(f2.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes
    f2.write_bytes(bytes(data))
    assert len(safetensors_differences(f1, f2)) == 1


def test_apack_kohya_apack_round_trip_is_bit_exact(tmp_path: Path) -> None:
    src = save_toy(tmp_path / "a.apack", [peft_adapter()])
    res = convert(src, tmp_path / "k.safetensors")
    assert res.dst_format == "kohya"
    res2 = convert(tmp_path / "k.safetensors", tmp_path / "b.apack")
    assert res2.src_format == "kohya"
    with adapterpack.open(src) as a, adapterpack.open(tmp_path / "b.apack") as b:
        assert adapter_differences(a, b) == []


def test_kohya_without_alpha_passes_its_note_on(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(5)
    down, up = rng.standard_normal((2, 6)).astype(np.float32), rng.standard_normal((5, 2)).astype(np.float32)
    save_file({"lora_unet_blk_q.lora_down.weight": down, "lora_unet_blk_q.lora_up.weight": up}, str(tmp_path / "k.safetensors"))
    res = convert(tmp_path / "k.safetensors", tmp_path / "k.apack")
    assert len(res.notes) == 1 and "no alpha" in res.notes[0]
    with adapterpack.open(tmp_path / "k.apack") as b:
        (m,) = b.modules.values()
        assert np.array_equal(m.delta(), up @ down)  # scale 1


# --- provenance (adapter.source) from an untrusted .apack index ---------------------------------


def crafted(tmp_path: Path, source: dict, adapter: Adapter | None = None) -> Path:
    """A valid .apack whose adapter records ``source`` (as any writer of the format could)."""
    a = adapter or peft_adapter()
    a.source = source
    return save_toy(tmp_path / "crafted.apack", [a])


@pytest.mark.parametrize(
    "fmt, extra, dst, key",
    [
        ("peft", {"key_overrides": ["model.layers.0.self_attn.q_proj"]}, "peft", "key_overrides"),
        ("peft", {"key_overrides": {"model.layers.0.self_attn.q_proj": {"A": 5}}}, "peft", "key_overrides"),
        ("peft", {"key_prefix": 5}, "peft", "key_prefix"),
        ("peft", {"magnitude_shapes": 5}, "peft", "magnitude_shapes"),
        ("peft", {"safetensors_metadata": {"format": 1}}, "peft", "safetensors_metadata"),
        ("peft", {"config": {"peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "target_modules": [1]}}, "peft", "target_modules"),
        ("peft", {"config": {"peft_type": "LORA", "r": "4"}}, "peft", "r must be"),
        ("peft", {"config": [1]}, "peft", "config"),
        ("kohya", {"kohya_names": ["x"]}, "k.safetensors", "kohya_names"),
        ("kohya", {"no_alpha": 5}, "k.safetensors", "no_alpha"),
        ("kohya", {"alpha_tensors": [1]}, "k.safetensors", "alpha_tensors"),
        ("kohya", {"safetensors_metadata": {"k": 1}}, "k.safetensors", "safetensors_metadata"),
    ],
)
def test_malformed_source_is_a_conversion_error(tmp_path: Path, fmt: str, extra: dict, dst: str, key: str) -> None:
    src = crafted(tmp_path, {"format": fmt, **extra})
    with pytest.raises(ConversionError, match=key) as e:
        convert(src, tmp_path / dst)
    assert type(e.value) is ConversionError
    assert not (tmp_path / dst).exists()


def test_source_notes_that_are_not_a_list_are_ignored_with_a_note(tmp_path: Path) -> None:
    src = crafted(tmp_path, {"format": "peft", "notes": 5})
    res = convert(src, tmp_path / "b.apack")
    assert res.notes == ["source['notes'] ignored: not a list of strings (5)"]


def test_recorded_alpha_shape_is_bounded_by_the_real_tensor(tmp_path: Path) -> None:
    """A recorded alpha shape of 2^40 elements is ignored (kohya alphas have one), not allocated."""
    a = peft_adapter()
    name = "model.layers.0.self_attn.q_proj"
    info = {"dtype": "float32", "shape": [2**20, 2**20], "value": 8.0}
    src = crafted(tmp_path, {"format": "kohya", "alpha_tensors": {name: info}}, a)
    convert(src, tmp_path / "k.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "k.safetensors", framework="np") as f:
        alpha = f.get_tensor("lora_unet_model_layers_0_self_attn_q_proj.alpha")
    assert alpha.shape == () and alpha.dtype == np.float32 and float(alpha) == 8.0


def test_recorded_magnitude_shape_that_does_not_fit_is_ignored(tmp_path: Path) -> None:
    a = peft_adapter()
    m = a.modules["model.layers.0.self_attn.v_proj"]  # out = 16
    m.params["dora"] = True
    m.tensors["magnitude"] = np.ones(16, np.float32)
    for m2 in a:
        if m2 is not m:
            m2.params["dora"] = True
            m2.tensors["magnitude"] = np.ones(m2.base_shape[0], np.float32)
    src = crafted(tmp_path, {"format": "peft", "magnitude_shapes": {m.name: [3, 3]}}, a)
    convert(src, tmp_path / "peft")
    from safetensors import safe_open

    with safe_open(tmp_path / "peft" / "adapter_model.safetensors", framework="np") as f:
        mag = f.get_tensor(f"base_model.model.{m.name}.lora_magnitude_vector")
    assert mag.shape == (16,)


# --- overwriting a PEFT folder, atomic folders ----------------------------------------------------


def test_force_onto_a_peft_folder_keeps_its_other_files(tmp_path: Path) -> None:
    src = save_toy(tmp_path / "a.apack", [peft_adapter(0)])
    dst = tmp_path / "peft"
    convert(src, dst)
    (dst / "README.md").write_text("model card")
    (dst / "checkpoint-10").mkdir()
    (dst / "checkpoint-10" / "state.json").write_text("{}")
    other = save_toy(tmp_path / "b.apack", [peft_adapter(1)])
    convert(other, dst, force=True)
    assert (dst / "README.md").read_text() == "model card"
    assert (dst / "checkpoint-10" / "state.json").read_text() == "{}"
    kept = ["README.md", "adapter_config.json", "adapter_model.safetensors", "checkpoint-10"]
    assert sorted(p.name for p in dst.iterdir()) == kept
    with adapterpack.open(dst) as got:
        assert adapter_differences(peft_adapter(1), got) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.apack", "b.apack", "peft"]  # no temp files left


def test_atomic_dir_refuses_a_file_destination(tmp_path: Path) -> None:
    from adapterpack.atomic import atomic_dir

    dest = tmp_path / "out"
    dest.write_text("a file")
    with pytest.raises(NotADirectoryError, match="not a folder"), atomic_dir(dest) as tmp:
        (tmp / "x").write_text("x")
    assert dest.read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- adapter_differences sees every record fact -----------------------------------------------------


def square_lora(**params: object) -> Adapter:
    rng = np.random.default_rng(3)
    p = {"rank": 2, "alpha": 2.0, **params}
    m = Module("w", "lora", (8, 8), p, {"A": rng.standard_normal((2, 8)).astype(np.float32), "B": np.ones((8, 2), np.float32)})
    return Adapter(modules={"w": m})


def test_adapter_differences_sees_fan_in_fan_out_and_must_understand() -> None:
    plain, fifo = square_lora(), square_lora(fan_in_fan_out=True)
    assert not np.array_equal(plain.modules["w"].delta(), fifo.modules["w"].delta())
    (diff,) = adapter_differences(plain, fifo)
    assert "fan_in_fan_out" in diff
    optional = square_lora()
    optional.modules["w"].must_understand = False
    (diff,) = adapter_differences(plain, optional)
    assert "must_understand" in diff
    assert adapter_differences(plain, square_lora(fan_in_fan_out=False, rslora=False, layout="linear", dora=False)) == []


def test_kohya_name_note_only_for_unmapped_kohya_names() -> None:
    from adapterpack.formats.peft import export_notes

    plain = square_lora()  # a top-level module "w" of a model is a fine PEFT name
    assert export_notes(plain) == []
    kohya = square_lora()
    kohya.source = {"format": "kohya"}
    (note,) = export_notes(kohya)
    assert "'w'" in note and "cannot attach" in note
    kohya.source = {"format": "kohya", "kohya_names": {"w": "lora_unet_w"}}
    assert export_notes(kohya) == []


def test_float64_to_bf16_rounds_once() -> None:
    """ml_dtypes casts float64 → bfloat16 through float32; cast_array rounds once, to the nearest bf16."""
    import ml_dtypes

    from adapterpack.dtypes import cast_array

    # 1 + 2^-8 + 2^-30: just above the midpoint between the bf16 neighbours 1 and 1 + 2^-7, so the nearest is
    # 1 + 2^-7; through float32 the 2^-30 is rounded away first and the tie goes to even, 1.
    x = np.array([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30), 3.0], dtype=np.float64)
    out, err = cast_array(x, "bfloat16")
    assert out.dtype == np.dtype(ml_dtypes.bfloat16)
    assert out.astype(np.float64).tolist() == [1 + 2**-7, -(1 + 2**-7), 3.0]
    assert err == pytest.approx(2**-8 - 2**-30)
