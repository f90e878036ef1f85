"""``adapterpack convert … --to diffusers`` and diffusers input: the file diffusers expects, round trips
bit-exact through .apack, kohya names resolved or refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from safetensors.numpy import save_file

import adapterpack
from adapterpack.cli import main
from adapterpack.formats.diffusers import META_KEY
from adapterpack.ops.convert import convert, infer_target, target_conflict
from tests.helpers_safetensors import assert_same_file, bits, load_st

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KQ = "lora_unet_" + Q.replace(".", "_")
KTE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def kohya_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    t = {
        f"{KQ}.lora_down.weight": rng.standard_normal((4, 32)).astype(np.float16),
        f"{KQ}.lora_up.weight": rng.standard_normal((32, 4)).astype(np.float16),
        f"{KQ}.alpha": np.array(2.0, np.float16),
        f"{KTE}.lora_down.weight": rng.standard_normal((8, 16)).astype(np.float16),
        f"{KTE}.lora_up.weight": rng.standard_normal((16, 8)).astype(np.float16),
        f"{KTE}.alpha": np.array(1.0, np.float16),
    }
    path = tmp_path / "sd15.safetensors"
    save_file(t, path)
    return path


def test_targets() -> None:
    assert infer_target("x/pytorch_lora_weights.safetensors") == "diffusers"
    assert infer_target("x/lora.safetensors") == "kohya"
    assert target_conflict("lora.safetensors", "diffusers") is None
    assert target_conflict("pytorch_lora_weights.safetensors", "kohya") is None
    assert "kohya or diffusers" in (target_conflict("lora.safetensors", "gguf") or "")


def test_cli_kohya_to_diffusers_and_back(kohya_file: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    r = run("convert", kohya_file, dst)
    assert r.exit_code == 0, r.output
    assert "(diffusers)" in r.output and "split into diffusers paths" in r.output
    t, meta = load_st(dst)
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert sorted(t) == sorted(f"{n}.lora_{s}.weight" for n in (f"unet.{Q}", te) for s in "AB")
    md = json.loads((meta or {})[META_KEY])
    assert (md["unet.r"], md["unet.lora_alpha"], md["text_encoder.r"], md["text_encoder.lora_alpha"]) == (4, 2.0, 8, 1.0)
    # diffusers input is detected and read; .apack and back is bit-exact
    assert run("convert", dst, tmp_path / "d.apack").exit_code == 0
    with adapterpack.open(tmp_path / "d.apack") as ad:
        assert ad.modules[f"unet.{Q}"].summary()["scale"] == 0.5
    r = run("convert", tmp_path / "d.apack", tmp_path / "again.safetensors", "--to", "diffusers")
    assert r.exit_code == 0, r.output
    assert_same_file(dst, tmp_path / "again.safetensors")
    # and to kohya: kohya's names again, factors bit for bit
    assert run("convert", dst, tmp_path / "k.safetensors").exit_code == 0
    tk, _ = load_st(tmp_path / "k.safetensors")
    tk0, _ = load_st(kohya_file)
    for k in (KQ, KTE):
        assert bits(tk[f"{k}.lora_down.weight"]) == bits(tk0[f"{k}.lora_down.weight"])
        assert float(tk[f"{k}.alpha"]) == float(tk0[f"{k}.alpha"])


def test_cli_refusals(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    sgm = "lora_unet_double_blocks_0_img_attn_qkv"  # Flux's original (BFL) names are not mapped
    src = tmp_path / "flux.safetensors"
    save_file({f"{sgm}.lora_down.weight": rng.standard_normal((2, 8)), f"{sgm}.lora_up.weight": rng.standard_normal((8, 2))}, src)
    r = run("convert", src, tmp_path / "pytorch_lora_weights.safetensors")
    assert r.exit_code == 1 and "not a diffusers unet module path" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()
    r = run("convert", src, tmp_path / "x.apack", "--to", "diffusers")
    assert r.exit_code == 2 and "names an .apack file" in r.output


def test_convert_base_pipeline_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    odd = "lora_unet_custom_block_proj"
    src = tmp_path / "k.safetensors"
    save_file({f"{odd}.lora_down.weight": rng.standard_normal((2, 8)), f"{odd}.lora_up.weight": rng.standard_normal((8, 2))}, src)
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    save_file({"custom_block.proj.weight": np.zeros((8, 8))}, pipe / "unet" / "diffusion_pytorch_model.safetensors")
    res = convert(src, tmp_path / "pytorch_lora_weights.safetensors", base=pipe)
    assert res.dst_format == "diffusers"
    assert sorted(load_st(tmp_path / "pytorch_lora_weights.safetensors")[0]) == [
        "unet.custom_block.proj.lora_A.weight",
        "unet.custom_block.proj.lora_B.weight",
    ]


def test_component_puts_a_language_model_adapter_under_one_component(tmp_path: Path) -> None:
    """The bundled SmolLM2 adapter names no diffusers component: refused without --component, written under
    ``transformer.`` with it, and read back with every factor bit-exact and every scale equal."""
    from adapterpack.examples import example_path

    src = example_path()
    dst = tmp_path / "pytorch_lora_weights.safetensors"
    r = CliRunner().invoke(main, ["convert", str(src), str(dst)])
    assert r.exit_code != 0 and "names no diffusers component" in r.output and not dst.exists()
    assert run("convert", src, dst, "--component", "transformer").exit_code == 0
    orig, back = adapterpack.open(src), adapterpack.open(dst)
    assert sorted(back.modules) == sorted(f"transformer.{n}" for n in orig.modules)
    for m in orig:
        f, g = m.factors(), back.modules[f"transformer.{m.name}"].factors()
        assert bits(f.A) == bits(g.A) and bits(f.B) == bits(g.B) and f.scale == g.scale
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "x.apack"), "--component", "unet"])
    assert r.exit_code == 2 and "--component applies to diffusers output only" in r.output


def test_rerank_writes_diffusers_with_a_component(tmp_path: Path) -> None:
    from adapterpack.examples import example_path

    dst = tmp_path / "pytorch_lora_weights.safetensors"
    assert run("rerank", example_path(), dst, "--rank", "2", "--component", "transformer").exit_code == 0
    orig, back = adapterpack.open(example_path()), adapterpack.open(dst)
    for m in orig:
        r = back.modules[f"transformer.{m.name}"]
        assert r.summary()["rank"] == 2
        d = m.delta().astype(np.float64)
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vt[:2]
        np.testing.assert_allclose(r.delta(), best, rtol=0, atol=1e-5 * s[0])
