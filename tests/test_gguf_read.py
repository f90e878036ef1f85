"""Reading llama.cpp LoRA GGUF files, ours and llama.cpp's converter's: open, inspect, convert, hostile files.

tests/data/llamacpp-tiny/ holds a tiny PEFT LoRA of a 2-layer LLaMA config (every linear module, a
rank_pattern, the token embedding) and the GGUF llama.cpp's own ``convert_lora_to_gguf.py`` made of it
(``python -m tools.fixtures.llamacpp_tiny``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import adapterpack
from adapterpack.cli import main
from adapterpack.errors import ConversionError, InputError, UnrecognizedInputError
from adapterpack.formats import detect_format
from adapterpack.formats.gguf import permute_rows, read_gguf, unpermute_rows, write_gguf

gguf = pytest.importorskip("gguf")

TINY = Path(__file__).parent / "data" / "llamacpp-tiny"
LLAMACPP = TINY / "llamacpp.gguf"
BASE = TINY / "base" / "config.json"
PEFT = TINY / "lora"


def _fields(path: Path) -> dict[str, object]:
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}


def _same_factors(got: adapterpack.Adapter, want: adapterpack.Adapter) -> None:
    assert sorted(got.modules) == sorted(want.modules)
    for m in want:
        g = got.modules[m.name]
        assert g.array("A").tobytes() == m.array("A").tobytes(), m.name
        assert g.array("B").tobytes() == m.array("B").tobytes(), m.name
        assert g.base_shape == m.base_shape and g.params["layout"] == m.params["layout"], m.name
        assert g.implementation.scale(g) == m.implementation.scale(m), m.name


def test_llamacpp_converter_file_reads_back_to_the_peft_factors() -> None:
    """llama.cpp's own GGUF, with the base model's head counts: the PEFT factors bit for bit, the same scales,
    HF module names (embedding included), and the base model from general.base_model.0.repo_url."""
    assert detect_format(LLAMACPP) == "gguf"
    got = adapterpack.open(LLAMACPP, base=BASE)
    want = adapterpack.open(PEFT)
    _same_factors(got, want)
    assert got.base_model == "tiny/llama" and got.base_architecture == "LlamaForCausalLM"
    assert got.modules["model.layers.1.mlp.down_proj"].params["rank"] == 3
    assert got.source["format"] == "gguf" and got.source["gguf_metadata"]["adapter.lora.alpha"] == "4.0"


def test_without_head_counts_qk_factors_are_refused_not_misread() -> None:
    ad = read_gguf(LLAMACPP)
    assert len(ad.modules) == 15
    assert np.array_equal(
        ad.delta("model.layers.0.self_attn.v_proj"), adapterpack.open(PEFT).delta("model.layers.0.self_attn.v_proj")
    )
    with pytest.raises(ConversionError, match=r"q_proj.*--base"):
        ad.modules["model.layers.0.self_attn.q_proj"].array("B")
    assert any("--base" in n for n in ad.source["notes"])


def test_ours_equals_llamacpp_tensor_for_tensor_and_reads_back_alone(tmp_path: Path) -> None:
    """Our writer on the same PEFT adapter: every tensor llama.cpp's converter wrote, byte for byte, and the
    base-model keys it writes; our head counts let the file read back without --base."""
    out = tmp_path / "ours.gguf"
    write_gguf(adapterpack.open(PEFT), out, base=BASE)
    ours, theirs = _tensors(out), _tensors(LLAMACPP)
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].tobytes() == theirs[k].tobytes() and ours[k].shape == theirs[k].shape, k
    f, g = _fields(out), _fields(LLAMACPP)
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha", "general.quantization_version"):
        assert f[key] == g[key], key
    assert {k: v for k, v in f.items() if k.startswith("general.base_model.")} == {
        k: v for k, v in g.items() if k.startswith("general.base_model.")
    }
    assert f["general.base_model.count"] == 1 and f["general.name"] == "ours"
    _same_factors(adapterpack.open(out), adapterpack.open(PEFT))
    again = tmp_path / "again.gguf"
    write_gguf(adapterpack.open(out), again)  # head counts from the file itself
    assert {k: v.tobytes() for k, v in _tensors(again).items()} == {k: v.tobytes() for k, v in ours.items()}


def test_unpermute_inverts_permute() -> None:
    rows = np.arange(48 * 3).reshape(48, 3)
    for heads in (1, 3, 4, 6):
        assert np.array_equal(unpermute_rows(permute_rows(rows, heads), heads), rows)


def test_cli_inspect_convert_and_refusal(tmp_path: Path) -> None:
    run = CliRunner().invoke
    r = run(main, ["inspect", str(LLAMACPP), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["format"] == "gguf" and len(rep["adapters"][0]["modules"]) == 15
    row = next(x for x in rep["adapters"][0]["modules"] if x["name"] == "model.layers.0.mlp.down_proj")
    assert row["rank"] == 3 and row["base_shape"] == [16, 24]
    r = run(main, ["inspect", str(LLAMACPP)])
    assert r.exit_code == 0 and "model.layers.1.self_attn.q_proj" in r.output and "gguf" in r.output
    r = run(main, ["inspect", str(LLAMACPP), "--spectrum"])  # reads q/k factors: needs the head counts
    assert r.exit_code == 1 and "--base" in r.output
    r = run(main, ["inspect", str(LLAMACPP), "--spectrum", "--json", "--base", str(BASE)])
    assert r.exit_code == 0, r.output
    want = json.loads(run(main, ["inspect", str(PEFT), "--spectrum", "--json"]).output)["adapters"][0]["spectrum"]
    assert json.loads(r.output)["adapters"][0]["spectrum"] == want
    # q/k rows need the head counts: a clear refusal, nothing written
    r = run(main, ["convert", str(LLAMACPP), str(tmp_path / "no")])
    assert r.exit_code == 1 and "--base" in r.output and not (tmp_path / "no").exists()
    r = run(main, ["convert", str(LLAMACPP), str(tmp_path / "peft"), "--base", str(BASE)])
    assert r.exit_code == 0, r.output
    _same_factors(adapterpack.open(tmp_path / "peft"), adapterpack.open(PEFT))
    r = run(main, ["convert", str(LLAMACPP), str(tmp_path / "a.apack"), "--base", str(BASE)])
    assert r.exit_code == 0, r.output
    _same_factors(adapterpack.open(tmp_path / "a.apack"), adapterpack.open(PEFT))


def test_unknown_format_lists_every_format_read(tmp_path: Path) -> None:
    odd = tmp_path / "x.bin"
    odd.write_bytes(b"not an adapter at all")
    with pytest.raises(UnrecognizedInputError) as e:
        adapterpack.open(odd)
    for word in (".apack", "PEFT", "kohya", "diffusers", "GGUF" if "GGUF" in str(e.value) else ".gguf"):
        assert word in str(e.value), word
    r = CliRunner().invoke(main, ["inspect", str(odd)])
    assert r.exit_code == 1 and "diffusers" in r.output and ".gguf" in r.output


# --- hostile and wrong files ---------------------------------------------------------------------


def _write(path: Path, kv: dict[str, object], tensors: dict[str, np.ndarray]) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in kv.items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_key_value(k, v, gguf.GGUFValueType.UINT32)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


LORA = {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 8.0}
A = np.ones((2, 16), np.float32)
B = np.ones((8, 2), np.float32)
PAIR = {"blk.0.attn_v.weight.lora_a": A, "blk.0.attn_v.weight.lora_b": B}


@pytest.mark.parametrize(
    ("kv", "tensors", "match"),
    [
        ({}, PAIR, "not a llama.cpp adapter"),
        ({"general.type": "model"}, PAIR, "GGUF model file"),
        ({**LORA, "adapter.type": "control_vector"}, PAIR, "not a LoRA"),
        ({**LORA, "adapter.lora.alpha": "eight"}, PAIR, "alpha must be a finite number"),
        ({**LORA, "adapter.lora.alpha": float("nan")}, PAIR, "alpha must be a finite number"),
        (LORA, {"blk.0.attn_v.weight.lora_a": A}, "missing lora_b"),
        (
            LORA,
            {"blk.0.attn_v.weight.lora_a": A, "blk.0.attn_v.weight.lora_b": np.ones((8, 3), np.float32)},
            "disagree on the rank",
        ),
        (LORA, {"blk.0.attn_v.lora_a": A, "blk.0.attn_v.lora_b": B}, "does not name a base weight"),
        (LORA, {"blk.0.attn_norm.weight": np.ones(16, np.float32)}, "no LoRA tensors"),
        ({**LORA, "adapterpack.attention.head_count": 0}, PAIR, "positive integers"),
    ],
)
def test_wrong_gguf_files_are_clear_input_errors(
    tmp_path: Path, kv: dict[str, object], tensors: dict[str, np.ndarray], match: str
) -> None:
    path = _write(tmp_path / "bad.gguf", kv, tensors)
    with pytest.raises(InputError, match=match):
        adapterpack.open(path)


def test_damaged_gguf_files(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.gguf", LORA, PAIR)
    assert adapterpack.open(good).modules["model.layers.0.self_attn.v_proj"].params["rank"] == 2
    data = good.read_bytes()
    for n in (3, 10, 24, 60, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(InputError):
            adapterpack.open(cut)
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(b"GGUX" + data[4:])
    with pytest.raises(UnrecognizedInputError, match="GGUF magic"):
        adapterpack.open(wrong)
    huge = bytearray(data)
    huge[8:16] = (2**62).to_bytes(8, "little")  # a tensor count no file backs
    (tmp_path / "huge.gguf").write_bytes(bytes(huge))
    with pytest.raises(InputError, match="not a readable GGUF"):
        adapterpack.open(tmp_path / "huge.gguf")
    # a base model's GGUF given as the adapter
    shutil.copy(good, tmp_path / "copy.gguf")
    assert detect_format(tmp_path / "copy.gguf") == "gguf"


def test_quantized_and_bf16_tensors(tmp_path: Path) -> None:
    """llama.cpp's converter can write q8_0 (dequantized on reading, with a note) and bf16 (read bit-exact)."""
    import ml_dtypes

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 32)).astype(np.float32), rng.standard_normal((32, 2)).astype(np.float32)
    q8, bf16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.BF16
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    for k, v in LORA.items():
        w.add_float32(k, v) if isinstance(v, float) else w.add_string(k, v)
    w.add_tensor("blk.0.ffn_up.weight.lora_a", gguf.quants.quantize(a, q8), raw_dtype=q8)
    w.add_tensor("blk.0.ffn_up.weight.lora_b", b)  # rows of 2 cannot be q8_0 blocks: llama.cpp keeps them f32 too
    a16, b16 = a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)
    w.add_tensor("blk.0.attn_output.weight.lora_a", a16.view(np.uint8), raw_dtype=bf16)
    w.add_tensor("blk.0.attn_output.weight.lora_b", b16.view(np.uint8), raw_dtype=bf16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ad = adapterpack.open(tmp_path / "q.gguf")
    m = ad.modules["model.layers.0.mlp.up_proj"]
    assert (
        np.array_equal(m.array("A"), gguf.quants.dequantize(gguf.quants.quantize(a, q8), q8)) and m.array("A").dtype == np.float32
    )
    assert any("Q8_0" in n and "dequantized" in n for n in ad.source["notes"])
    o = ad.modules["model.layers.0.self_attn.o_proj"]
    assert o.array("A").dtype == ml_dtypes.bfloat16 and o.array("A").tobytes() == a16.tobytes()
    assert o.array("B").tobytes() == b16.tobytes() and o.base_shape == (32, 32)


def test_a_huge_block_index_is_one_name_lookup(tmp_path: Path) -> None:
    """The block index of a name is substituted, not enumerated: blk.20000 used to build every block's names
    (gigabytes for a 500-byte file); a non-canonical index (blk.07) is no llama.cpp block and keeps its name."""
    import tracemalloc

    path = _write(tmp_path / "far.gguf", LORA, {
        "blk.20000.attn_v.weight.lora_a": A, "blk.20000.attn_v.weight.lora_b": B,
        "blk.07.attn_v.weight.lora_a": A, "blk.07.attn_v.weight.lora_b": B,
    })  # fmt: skip
    tracemalloc.start()
    try:
        ad = read_gguf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(ad.modules) == ["blk.07.attn_v", "model.layers.20000.self_attn.v_proj"]
    assert peak < 16 << 20, peak


@pytest.mark.parametrize(
    "config",
    [
        {"architectures": ["LlamaForCausalLM"], "num_attention_heads": [2]},
        {"architectures": ["LlamaForCausalLM"], "num_attention_heads": "2"},
        {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 2.5},
        {"architectures": ["LlamaForCausalLM"], "num_attention_heads": True},
        {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 0},
        {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "num_key_value_heads": -1},
        ["LlamaForCausalLM"],
    ],
)
def test_base_config_head_counts_are_checked(tmp_path: Path, config: object) -> None:
    from adapterpack.formats.gguf import base_info

    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError):
        base_info(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "num_attention_heads": 1e400}')
    with pytest.raises(InputError, match="positive integers"):
        base_info(tmp_path)


@pytest.mark.parametrize("value", ["abc", float("nan"), 2.0])
def test_base_gguf_head_counts_are_checked(tmp_path: Path, value: object) -> None:
    from adapterpack.formats.gguf import base_info

    base = _write(tmp_path / "base.gguf", {"llama.attention.head_count": value}, {"x": np.zeros(2, np.float32)})
    with pytest.raises(InputError, match="positive integers"):
        base_info(base)
    good = _write(tmp_path / "good.gguf", {"llama.attention.head_count": 4, "llama.attention.head_count_kv": 2},
                  {"x": np.zeros(2, np.float32)})  # fmt: skip
    assert (base_info(good).n_head, base_info(good).n_head_kv) == (4, 2)
