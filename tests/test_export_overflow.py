"""Exports never write an alpha or a factor their target reads as inf (or as "no alpha"): they refuse it.

kohya's loaders and llama.cpp read alpha as float32 and alpha 0 as "no alpha" (kohya: alpha = rank,
llama.cpp: scale 1); PEFT and diffusers read alpha from JSON, which has no infinity; a scale baked into
B (llama.cpp, vLLM) and re-ranked lora factors (√σ·u, √σ·v) are rounded to the output dtype. Each
refusal is one ConversionError naming adapter and module, before any output is written, without a
numpy warning.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from adapterpack import Adapter
from adapterpack.errors import ConversionError
from adapterpack.formats.diffusers import write_diffusers
from adapterpack.formats.gguf import GgufBase, gguf_tensors
from adapterpack.formats.kohya import kohya_state
from adapterpack.formats.peft import read_peft, write_peft
from adapterpack.formats.serving import to_vllm
from adapterpack.ops.rerank import RerankPolicy, rerank
from tests.factories import example_with_alpha, qv_adapter

pytestmark = pytest.mark.filterwarnings("error")  # a numpy RuntimeWarning escaping is a failure

REPO = Path(__file__).resolve().parent.parent
BAD = "model.layers.1.self_attn.v_proj"
NAMED = f"adapter 'default' module '{BAD}'"
F32_MAX = float(np.finfo(np.float32).max)


def toy(alpha: float | None = None, *, rslora: bool = False, every: bool = False) -> Adapter:
    """Four rank-4 modules (alpha 8); ``BAD`` (or ``every`` module) gets ``alpha`` and ``rslora``."""
    a = qv_adapter(1, layers=2, rank=4, in_features=24, q_out=32, v_out=16, b_scale=0.05)
    for m in a:
        if alpha is not None and (every or m.name == BAD):
            m.params.update(alpha=alpha, rslora=rslora)
    return a


# --- kohya: alpha is read as float32, 0 as alpha = rank ------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "rslora", "shown"),
    [
        pytest.param(1e308, False, "alpha 1e+308 does not fit float32", id="1e308"),
        pytest.param(F32_MAX * 1.01, False, "alpha 3.43685e+38 does not fit float32", id="just-past-float32"),
        pytest.param(1e308, True, "alpha inf does not fit float32", id="rslora-alpha-sqrt-r-past-binary64"),
        pytest.param(1e-50, False, "alpha 1e-50 does not fit float32", id="rounds-to-0"),
        pytest.param(0.0, False, "alpha 0 (scale 0) cannot be written", id="zero"),
    ],
)
def test_kohya_refuses_an_alpha_its_loaders_misread(alpha: float, rslora: bool, shown: str) -> None:
    with pytest.raises(ConversionError) as e:
        kohya_state(toy(alpha, rslora=rslora))
    assert type(e.value) is ConversionError and str(e.value).startswith(f"{NAMED}: {shown}")


def test_kohya_keeps_the_largest_float32_alpha() -> None:
    tensors, _ = kohya_state(toy(F32_MAX))
    alpha = tensors["lora_unet_model_layers_1_self_attn_v_proj.alpha"]
    assert alpha.dtype == np.float32 and float(alpha) == F32_MAX


# --- llama.cpp: one f32 adapter.lora.alpha, 0 means scale 1 ---------------------------------------------------------

LLAMA = GgufBase("llama", 4, 2)


@pytest.mark.parametrize(
    ("alpha", "rslora", "shown"),
    [
        pytest.param(1e308, False, "alpha 1e+308 does not fit float32", id="1e308"),
        pytest.param(1e308, True, "alpha inf does not fit float32", id="rslora-scale-times-rank-past-binary64"),
        pytest.param(1e-50, False, "alpha 1e-50 does not fit float32", id="rounds-to-0"),
        pytest.param(0.0, False, "alpha 0 (scale 0) cannot be written", id="zero"),
    ],
)
def test_gguf_refuses_an_alpha_llama_cpp_misreads(alpha: float, rslora: bool, shown: str) -> None:
    with pytest.raises(ConversionError) as e:
        gguf_tensors(toy(alpha, rslora=rslora, every=True), LLAMA)
    first = "adapter 'default' module 'model.layers.0.self_attn.q_proj'"  # the first module with the common alpha
    assert type(e.value) is ConversionError and str(e.value).startswith(f"{first}: {shown}")


def test_gguf_refuses_a_baked_scale_past_binary64() -> None:
    """alpha·r of three modules is 4e-30, of the fourth 4e300: B·1e330 is no number."""
    ad = toy(1e-30, every=True)
    ad.modules[BAD].params["alpha"] = 1e300
    with pytest.raises(ConversionError, match=rf"^{NAMED}: scaling B by inf overflows"):
        gguf_tensors(ad, LLAMA)




@pytest.mark.parametrize("dst", ["x.safetensors", "x.gguf"])
def test_issue_convert_of_alpha_1e308_is_refused_in_one_line(tmp_path: Path, dst: str) -> None:
    """The issue's commands: ``convert`` of the real adapter with lora_alpha 1e308 to kohya and llama.cpp."""
    src, out = example_with_alpha(tmp_path, 1e308), tmp_path / dst
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_attention_heads": 9, "num_key_value_heads": 3}))
    base = ["--base", str(config)] if dst.endswith(".gguf") else []
    p = subprocess.run(
        [sys.executable, "-W", "error", "-m", "adapterpack", "convert", str(src), str(out), *base],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 1 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("adapterpack: adapter 'default' module 'model.layers.0.self_attn.") and "alpha 1e+308" in p.stderr
    assert not out.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["big", "config.json"]


# --- PEFT and diffusers: alpha in JSON, which has no infinity ---------------------------------------------------------


def test_peft_writes_alpha_1e308_exactly(tmp_path: Path) -> None:
    """1e308 is finite in JSON and binary64: PEFT reads it back as it is (nothing to refuse)."""
    out = write_peft(toy(1e308), tmp_path / "p")
    assert "Infinity" not in (out / "adapter_config.json").read_text()
    assert read_peft(out).module(BAD).params["alpha"] == 1e308


def test_diffusers_refuses_an_rslora_alpha_whose_plain_alpha_is_past_binary64(tmp_path: Path) -> None:
    """A mixed adapter's rsLoRA module is written as a plain alpha = scale·r: 1e308/√4·4 is inf."""
    out = tmp_path / "pytorch_lora_weights.safetensors"
    with pytest.raises(ConversionError, match=rf"^module '{BAD}': rsLoRA scale 5e\+307 × rank 4 is beyond binary64"):
        write_diffusers(toy(1e308, rslora=True), out, component="unet")
    assert not out.exists()
    write_diffusers(toy(1e308), out, component="unet")  # plain 1e308 is finite JSON
    with safe_open(str(out), "np") as f:
        meta = f.metadata()["lora_adapter_metadata"]
    assert "Infinity" not in meta and json.loads(meta)["unet.alpha_pattern"] == {r"^model\.layers\.1\.self_attn\.v_proj": 1e308}


# --- vLLM: one lora_alpha in JSON, other scales baked into B -------------------------------------------------------------


def test_vllm_refuses_a_scale_its_b_cannot_hold() -> None:
    with pytest.raises(ConversionError, match=rf"^{NAMED}: casting to float32 overflows"):
        to_vllm(toy(1e308))  # baked: B · 1.25e307 past float32


def test_vllm_refuses_a_lora_alpha_past_binary64() -> None:
    """Every module rsLoRA at alpha 1e308, rank 4: lora_alpha = scale 5e307 · r 4 is inf. Plain alpha 1e308 at
    rank 4 is kept as it is (ranks are not padded: vLLM copies each module's own rank into its slot)."""
    with pytest.raises(ConversionError, match=r"^adapter 'default' module 'model.layers.0.self_attn.q_proj': lora_alpha") as e:
        to_vllm(toy(1e308, rslora=True, every=True))
    assert type(e.value) is ConversionError
    assert to_vllm(toy(1e308, every=True))[1].alpha == 1e308


# --- lora factors rebuilt from other records (rerank --encoding lora, svd → lora) ------------------------------------


def test_rerank_lora_refuses_factors_past_the_output_dtype(tmp_path: Path) -> None:
    """alpha 8e11 puts σ near 1e11: its √σ fits float32 (the spectrum check passes) but not float16."""
    from click.testing import CliRunner

    import adapterpack
    from adapterpack.cli import main

    ad = toy(8e11)
    with pytest.raises(ConversionError, match=rf"^module '{BAD}' tensor '[AB]': casting to float16 overflows"):
        rerank(ad, RerankPolicy(rank=2, dtype="float16", encoding="lora"))
    out, _ = rerank(ad, RerankPolicy(rank=2, dtype="float32", encoding="lora"))
    assert all(np.isfinite(out.module(BAD).array(s)).all() for s in ("A", "B"))
    src, dst = tmp_path / "big.apack", tmp_path / "out.apack"
    adapterpack.save(ad, src)
    r = CliRunner().invoke(main, ["rerank", str(src), str(dst), "--rank", "2", "--dtype", "fp16", "--encoding", "lora"])
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.startswith(f"adapterpack: module '{BAD}' tensor"), r.output
    assert r.stderr.count("\n") == 1 and not dst.exists()


def test_svd_records_exported_as_lora_refuse_factors_past_their_dtype(tmp_path: Path) -> None:
    """An svd record with float16 vectors and S = 1e10 (float32): B = Utᵀ·√S holds 1e5, past float16."""
    from adapterpack.adapter import Module

    ut, vt = np.eye(2, 6, dtype=np.float16), np.eye(2, 5, dtype=np.float16)
    m = Module(BAD, "svd", (6, 5), {"rank": 2}, {"Ut": ut, "S": np.array([1e10, 1.0], np.float32), "Vt": vt})
    for write in (lambda a: write_peft(a, tmp_path / "p"), lambda a: kohya_state(a)):
        with pytest.raises(ConversionError, match=rf"^module '{BAD}' tensor 'A': casting to float16 overflows \(\|value\| 100000"):
            write(Adapter(modules={BAD: m}))
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("zeros", [1, 3, 4])
def test_vllm_exports_alpha_0_as_a_zero_delta(zeros: int) -> None:
    """Modules at alpha 0 (scale 0): when they were the most common scale, lora_alpha was 0 and the others'
    scale divided by it (ZeroDivisionError); ΔW stays exact however many there are."""
    src = toy()
    for m in list(src)[:zeros]:
        m.params["alpha"] = 0.0
    out, plan = to_vllm(src)
    assert (plan.alpha == 0.0) == (zeros == 4)
    for i, m in enumerate(src):
        np.testing.assert_allclose(out.modules[m.name].delta(), m.delta(), rtol=1e-6, atol=0, err_msg=m.name)
        assert out.modules[m.name].delta().any() == (i >= zeros)


def test_kohya_import_of_a_hostile_rslora_alpha_keeps_the_tensor_alpha(tmp_path: Path) -> None:
    """An rsLoRA alpha in adapterpack.module_params past float32 was an overflow RuntimeWarning on read; it is a
    mismatch with the alpha tensor, so the file's own alpha is kept (and said)."""
    from safetensors.numpy import load_file, save_file

    from adapterpack.formats.kohya import META_PARAMS, read_kohya, write_kohya

    src = toy(8.0, rslora=True)
    path = tmp_path / "k.safetensors"
    write_kohya(src, path)
    with safe_open(path, framework="np") as f:
        meta = f.metadata()
    params = json.loads(meta[META_PARAMS])
    (key,) = params
    params[key]["alpha"] = 1e39
    save_file(load_file(path), path, metadata=meta | {META_PARAMS: json.dumps(params)})
    got = read_kohya(path).modules[BAD]
    assert got.params["rslora"] is False
    np.testing.assert_allclose(got.delta(), src.modules[BAD].delta(), rtol=1e-6)
