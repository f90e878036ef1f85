"""adapterpack check / --target vllm: findings per stack, and a vLLM export whose scales are right under vLLM's rule."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.cli import main
from adapterpack.errors import ConversionError
from adapterpack.examples import example_path
from adapterpack.formats.gguf import GgufBase
from adapterpack.formats.peft import write_peft
from adapterpack.formats.serving import VLLM_RANKS, check, next_vllm_rank, to_vllm, vllm_scale, write_vllm
from adapterpack.formats.vllm_models import vllm_lora_support


def _mixed(dora: bool = False) -> Adapter:
    """Per-module ranks and alphas, one rsLoRA module (llama-style names)."""
    rng = np.random.default_rng(0)

    def lora(name: str, out: int, inp: int, r: int, alpha: float, **extra: object) -> Module:
        t = {"A": rng.standard_normal((r, inp)).astype(np.float32), "B": (rng.standard_normal((out, r)) * 0.1).astype(np.float32)}
        if extra.get("dora"):
            t["magnitude"] = np.ones(out, np.float32)
        return Module(name, "lora", (out, inp), {"rank": r, "alpha": alpha, **extra}, t)

    mods = [
        lora("model.layers.0.self_attn.q_proj", 16, 16, 4, 8.0),
        lora("model.layers.0.self_attn.v_proj", 8, 16, 4, 8.0, dora=dora),
        lora("model.layers.1.self_attn.q_proj", 16, 16, 2, 8.0),
        lora("model.layers.1.self_attn.v_proj", 8, 16, 6, 3.0, rslora=True),
    ]
    return Adapter(base_model="tiny/llama", modules={m.name: m for m in mods})


def _vllm_delta(folder: Path) -> dict[str, np.ndarray]:
    """ΔW as vLLM computes it from a PEFT folder: ONE scale from r / lora_alpha (rank_pattern ignored), lora_B @ lora_A."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    st = load_file(str(folder / "adapter_model.safetensors"))
    s = vllm_scale(cfg)
    out = {}
    for k, a in st.items():
        if k.endswith("lora_A.weight"):
            name = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = st[k.replace("lora_A", "lora_B")]
            out[name] = s * (b.astype(np.float64) @ a.astype(np.float64))
    return out


def test_bundled_adapter_is_fine_for_vllm_peft_kohya() -> None:
    ad = adapterpack.open(example_path())
    for target in ("vllm", "peft", "kohya"):
        assert check(ad, target) == []
    found = check(ad, "llama.cpp")
    assert [(f.severity, len(f.modules)) for f in found] == [("misread", 60)]  # q/k need the head counts
    assert [f.severity for f in check(ad, "llama.cpp", base=GgufBase("llama", 9, 3))] == ["note"]


def _vllm_load(folder: Path, max_lora_rank: int = 16) -> dict[str, np.ndarray]:
    """ΔW as vLLM's loader computes it (vllm/lora): PEFTHelper.validate_legal compares the config's r with
    max_lora_rank; one scale lora_alpha / r for every module (rank_pattern / alpha_pattern ignored); set_lora
    copies each module's lora_a / lora_b by their own shape into a zeroed slot of max_lora_rank."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] <= max_lora_rank, "vLLM: LoRA rank is greater than max_lora_rank"
    st = load_file(str(folder / "adapter_model.safetensors"))
    s = vllm_scale(cfg)
    out = {}
    for k, a in st.items():
        if k.endswith("lora_A.weight"):
            name = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = st[k.replace("lora_A", "lora_B")]
            slot_a, slot_b = np.zeros((max_lora_rank, a.shape[1])), np.zeros((b.shape[0], max_lora_rank))
            slot_a[: a.shape[0]], slot_b[:, : b.shape[1]] = a, b * s  # raises when a module's rank exceeds the slot
            out[name] = slot_b @ slot_a
    return out


def test_vllm_findings_and_export(tmp_path: Path) -> None:
    ad = _mixed()
    found = check(ad, "vllm")
    assert [f.severity for f in found] == ["misread"]
    assert found[0].modules == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    # vLLM's rule applied to the plain PEFT export gets these modules wrong ...
    no_rs = Adapter(base_model=ad.base_model, modules={n: m for n, m in ad.modules.items() if not m.params.get("rslora")})
    assert any(f.severity == "refuse" and "use_rslora" in f.problem for f in check(ad, "peft"))  # mixed rsLoRA
    write_peft(no_rs, tmp_path / "plain")
    naive = _vllm_load(tmp_path / "plain")
    assert not np.allclose(naive["model.layers.1.self_attn.q_proj"], ad.delta("model.layers.1.self_attn.q_proj"))
    # ... and gets every module right in the --target vllm export, each at its own rank (no zero padding)
    plan = write_vllm(ad, tmp_path / "vllm")
    cfg = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert cfg["r"] == plan.rank == 6 and cfg["lora_alpha"] == plan.alpha == 12.0 and not cfg["use_rslora"]
    assert sorted(plan.baked) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"] and plan.reranked == {}
    got = _vllm_load(tmp_path / "vllm", max_lora_rank=8)
    for m in ad:
        np.testing.assert_allclose(got[m.name], m.delta(), rtol=1e-6, atol=1e-7)
    exported = adapterpack.open(tmp_path / "vllm")
    assert check(exported, "vllm") == []
    for m in ad:  # PEFT reads the same ΔW (rank_pattern / alpha_pattern give every module vLLM's scale)
        np.testing.assert_allclose(exported.delta(m.name), m.delta(), rtol=1e-6, atol=1e-7)
        assert exported.modules[m.name].array("A").tobytes() == m.array("A").tobytes()


def test_vllm_export_keeps_ranks_and_default_max_rank_loads_rank_4(tmp_path: Path) -> None:
    """vLLM copies each module's own rank into its max_lora_rank slot: no padding, and rank 4 loads under vLLM's
    default --max-lora-rank 16 (no "needs --max-lora-rank 8" note)."""
    rng = np.random.default_rng(1)
    mods = {
        f"model.layers.{i}.self_attn.{p}_proj": Module(
            f"model.layers.{i}.self_attn.{p}_proj",
            "lora",
            (16, 16),
            {"rank": 4, "alpha": 8.0},
            {"A": rng.standard_normal((4, 16)).astype(np.float32), "B": rng.standard_normal((16, 4)).astype(np.float32)},
        )
        for i in range(2)
        for p in "qv"
    }
    ad = Adapter(base_model="tiny/llama", base_architecture="LlamaForCausalLM", modules=mods)
    assert check(ad, "vllm") == []
    single, plan = to_vllm(ad)
    assert plan.rank == 4 and plan.baked == [] and all(m.array("A").shape == (4, 16) for m in single)
    assert "vLLM's default --max-lora-rank 16 loads it" in plan.notes()[0]
    write_peft(ad, tmp_path / "plain")
    write_vllm(ad, tmp_path / "vllm")
    size = lambda d: (d / "adapter_model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "vllm") == size(tmp_path / "plain")
    got = _vllm_load(tmp_path / "vllm")
    for m in ad:
        np.testing.assert_allclose(got[m.name], m.delta(), rtol=1e-6, atol=1e-7)
    # rank 32 is above vLLM's default: a note naming the --max-lora-rank to serve with
    wide = Module("model.layers.0.mlp.up_proj", "lora", (64, 64), {"rank": 32, "alpha": 64.0},
                  {"A": np.ones((32, 64), np.float32), "B": np.ones((64, 32), np.float32)})  # fmt: skip
    big = Adapter(modules={wide.name: wide})
    notes = [f for f in check(big, "vllm") if f.severity == "note"]
    assert notes and "--max-lora-rank 32" in notes[0].fix


def test_vllm_knows_which_architectures_it_serves_with_lora() -> None:
    ad = adapterpack.open(example_path())
    for arch, want in (("LlamaForCausalLM", []), ("GPT2LMHeadModel", ["refuse"]), ("MyOwnForCausalLM", ["note"])):
        ad.base_architecture = arch
        assert [f.severity for f in check(ad, "vllm")] == want, arch
    assert vllm_lora_support("Qwen2ForCausalLM") is True and vllm_lora_support("MambaForCausalLM") is False


def _save(ad: Adapter, tmp: Path) -> Path:
    p = tmp / "a.apack"
    adapterpack.save(ad, p)
    return p


def test_vllm_refusals_and_rerank(tmp_path: Path) -> None:
    dora = _mixed(dora=True)
    found = check(dora, "vllm")
    assert found[0].severity == "refuse" and "DoRA" in found[0].problem and found[0].modules == ["model.layers.0.self_attn.v_proj"]
    with pytest.raises(ConversionError, match="DoRA"):
        to_vllm(dora)
    extra = _mixed()
    extra.tensors["base_model.model.lm_head.weight"] = np.zeros((2, 2), np.float32)
    assert check(extra, "vllm")[0].severity == "refuse"
    with pytest.raises(ConversionError, match="drop-tensors"):
        to_vllm(extra)
    single, _ = to_vllm(extra, drop_tensors=True)
    assert not single.tensors
    # rank 6 above --max-lora-rank 1 (an allowed value): re-ranked down by truncated SVD, the error reported
    found = check(_mixed(), "vllm", max_lora_rank=1)
    assert any(f.severity == "refuse" and "rank above" in f.problem for f in found)
    single, plan = to_vllm(_mixed(), max_lora_rank=1)
    assert plan.rank == 1 and set(plan.reranked) == set(_mixed().modules)
    assert all(0 < e < 1 for e in plan.reranked.values())
    assert next(f.severity for f in check(_mixed(), "vllm", max_lora_rank=12)) == "refuse"  # 12 is not an allowed value
    assert next_vllm_rank(9) == 16 and next_vllm_rank(513) is None and VLLM_RANKS[-1] == 512


def test_llama_cpp_and_kohya_findings() -> None:
    ad = _mixed()
    found = check(ad, "llama.cpp", base=GgufBase("llama", 2, 2))
    kinds = [(f.severity, f.problem.split(":")[0]) for f in found]
    assert ("misread", "one adapter.lora.alpha per file") in kinds
    dora = check(_mixed(dora=True), "kohya")
    assert dora[0].severity == "refuse" and "DoRA" in dora[0].problem
    assert [f.problem.split(":")[0] for f in check(ad, "kohya")] == ["rsLoRA"]


def test_peft_export_of_vllm_folder_gives_peft_outputs(tmp_path: Path) -> None:
    """A PEFT adapter with rank_pattern / alpha_pattern, exported --target vllm: PEFT itself gives the same outputs."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("q_proj", torch.nn.Linear(16, 16))
    base.add_module("v_proj", torch.nn.Linear(16, 8))
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), cfg).eval()
        pm.save_pretrained(tmp_path / "src")
        x = torch.randn(3, 16)
        want = pm(x)
        plan = write_vllm(adapterpack.open(tmp_path / "src"), tmp_path / "vllm")
        got = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "vllm").eval()(x)
    assert plan.rank == 4 and plan.baked == ["v_proj"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cli_check(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["check", "--target", "vllm", str(example_path())])
    assert ok.exit_code == 0 and "vllm loads it as is" in ok.output
    path = _save(_mixed(), tmp_path)
    bad = runner.invoke(main, ["check", "--target", "vllm", str(path)])
    assert bad.exit_code == 1 and "misread" in bad.output and "baked into lora_B" in bad.output and "padded" not in bad.output
    js = runner.invoke(main, ["check", "--target", "vllm", "--json", str(path)])
    assert js.exit_code == 1 and json.loads(js.output)["findings"][0]["severity"] == "misread"
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "num_attention_heads": 9, "num_key_value_heads": 3}'
    )
    based = runner.invoke(main, ["check", "--target", "llama.cpp", "--base", str(tmp_path / "config.json"), str(example_path())])
    assert based.exit_code == 0 and "permuted" in based.output


@pytest.mark.parametrize("drop", [("r",), ("lora_alpha",), ("target_modules",), ("r", "lora_alpha")])
def test_a_config_without_the_keys_vllm_requires_is_reported_and_the_export_writes_them(tmp_path: Path, drop: tuple) -> None:
    """vLLM's PEFTHelper refuses an adapter_config.json without r, lora_alpha or target_modules (PEFT uses defaults).
    check --target vllm says so (it ended in a KeyError on a missing r or lora_alpha; found by tools/fuzz_import
    --cli), and the vLLM export, which rebuilds the config, writes all three and loads as is."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(example_path(), src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    for key in drop:
        cfg.pop(key)
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with adapterpack.open(src) as ad:
        findings = check(ad, "vllm")
    lacks = [f for f in findings if f.problem.startswith("adapter_config.json lacks")]
    assert len(lacks) == 1 and lacks[0].severity == "refuse" and all(k in lacks[0].problem for k in drop), findings
    runner = CliRunner()
    result = runner.invoke(main, ["check", "--target", "vllm", str(src)])
    assert result.exit_code == 1 and (result.exception is None or isinstance(result.exception, SystemExit)), result.output
    out = tmp_path / "vllm"
    assert runner.invoke(main, ["convert", str(src), str(out), "--to", "peft", "--target", "vllm"]).exit_code == 0
    written = json.loads((out / "adapter_config.json").read_text())
    assert all(k in written for k in ("r", "lora_alpha", "target_modules"))
    assert runner.invoke(main, ["check", "--target", "vllm", str(out)]).exit_code == 0
