"""Review: PEFT decides fan_in_fan_out per layer (GPT-2 Conv1D yes, nn.Linear no) and saves the flag of the last
layer it wrapped, so a GPT-2 adapter with lm_head is saved with ``fan_in_fan_out: false`` although its c_attn /
c_proj layers are Conv1D. Reading the flag as every module's gave those modules ΔW transposed: merge refused the
non-square ones and would have merged a square one (attn.c_proj) transposed. Checked against PEFT itself."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import adapterpack  # noqa: E402
from adapterpack.formats.peft import read_peft, write_peft  # noqa: E402
from adapterpack.ops.merge import merge  # noqa: E402


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    cfg.tie_word_embeddings = False  # lm_head is then a tensor of its own in the base folder
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """(adapter folder, base folder, PEFT's merged state dict) for c_attn + attn/mlp c_proj + lm_head."""
    d = tmp_path_factory.mktemp("gpt2")
    _gpt2().save_pretrained(d / "base")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "lm_head"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns as it flips fan_in_fan_out per layer
        model = peft.get_peft_model(_gpt2(), cfg)
    model.save_pretrained(d / "ad")
    merged = {k: v.detach().numpy().copy() for k, v in model.merge_and_unload().state_dict().items()}
    return d / "ad", d / "base", merged


def test_conv1d_modules_read_in_their_layout(saved: tuple[Path, Path, dict[str, np.ndarray]]) -> None:
    folder, _, merged = saved
    assert json.loads((folder / "adapter_config.json").read_text())["fan_in_fan_out"] is False  # PEFT's last layer: lm_head
    base = {k: v.numpy() for k, v in _gpt2().state_dict().items()}
    ad = read_peft(folder)
    assert {m.name: m.params["fan_in_fan_out"] for m in ad} == {
        "lm_head": False,
        **{f"transformer.h.{i}.{s}": True for i in range(2) for s in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")},
    }
    for m in ad:
        key = m.name + ".weight"
        ref = merged[key].astype(np.float64) - base[key]
        np.testing.assert_allclose(m.delta(), ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_merge_matches_peft_and_round_trip_keeps_config(saved: tuple[Path, Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    folder, base_dir, merged = saved
    merge(folder, base_dir, tmp_path / "merged", drop_tensors=True)  # lm_head's saved base_layer copy left out
    with adapterpack.open(folder) as ad:
        write_peft(ad, tmp_path / "back")
    from safetensors.numpy import load_file

    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight", "transformer.h.0.mlp.c_proj.weight"):
        np.testing.assert_allclose(ours[key], merged[key], rtol=0, atol=1e-6)
    back, orig = (json.loads((f / "adapter_config.json").read_text()) for f in (tmp_path / "back", folder))
    assert back == orig  # the original config is still consistent: kept as it is


def test_hub_id_names_the_family(saved: tuple[Path, Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    """No auto_mapping (a hub model): the base model id says GPT-2; another id keeps the config's flag."""
    folder, _, _ = saved
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.pop("auto_mapping", None)
    for base_id, conv1d in (("openai-community/gpt2", True), ("distilgpt2", True), ("bigcode/gpt_bigcode-santacoder", False)):
        cfg["base_model_name_or_path"] = base_id
        (tmp_path / "ad").mkdir(exist_ok=True)
        (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
        (tmp_path / "ad" / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
        ad = read_peft(tmp_path / "ad")
        assert ad.modules["transformer.h.0.attn.c_attn"].params["fan_in_fan_out"] is conv1d
        assert ad.modules["lm_head"].params["fan_in_fan_out"] is False


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=40, tie_word_embeddings=False)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("edited", [False, True])
def test_merge_uses_the_saved_base_layer_like_peft(tmp_path: Path, edited: bool) -> None:
    """PEFT saves an embedding LoRA's layer weight beside its factors (``…embed_tokens.base_layer.weight``) and loads
    it into the base layer before adding ΔW. merge refused the folder ("no base tensor of that name"); now it merges
    W_saved + ΔW, as PEFT's merge_and_unload does (checked with a saved W that differs from the base's too)."""
    from safetensors.numpy import load_file, save_file

    _llama().save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj", "lm_head"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(_llama(), cfg).save_pretrained(tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    state = load_file(str(weights))
    saved = [k for k in state if k.endswith(".base_layer.weight")]
    assert sorted(saved) == ["base_model.model.lm_head.base_layer.weight", "base_model.model.model.embed_tokens.base_layer.weight"]
    if edited:
        for k in saved:
            state[k] = state[k] + np.float32(0.25)
        save_file(state, str(weights), metadata={"format": "pt"})
    merge(tmp_path / "ad", tmp_path / "base", tmp_path / "merged")
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_llama(), tmp_path / "ad").merge_and_unload().state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
        np.testing.assert_allclose(ours[key], theirs[key].numpy(), rtol=0, atol=1e-6, err_msg=key)


def test_merge_takes_the_layer_types_from_the_base(saved: tuple[Path, Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    """A config naming its base by a local path (no auto_mapping) says nothing of the family: the reader keeps the
    config's flag (false), and merge takes each layer's type from the base folder's config.json (GPT2LMHeadModel)."""
    folder, base_dir, merged = saved
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.pop("auto_mapping", None)
    cfg["base_model_name_or_path"] = "/models/my-finetune"
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    assert read_peft(tmp_path / "ad").modules["transformer.h.0.attn.c_attn"].params["fan_in_fan_out"] is False
    merge(tmp_path / "ad", base_dir, tmp_path / "merged", drop_tensors=True)
    from safetensors.numpy import load_file

    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight", "lm_head.weight"):
        np.testing.assert_allclose(ours[key], merged[key], rtol=0, atol=1e-6, err_msg=key)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _Net(torch.nn.Module):
    """Layers named by their place in a Sequential (``blocks.0.proj.0``), like diffusers' ``to_out.0``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def test_rebuilt_target_modules_do_not_name_a_block_by_its_index(tmp_path: Path) -> None:
    """A rebuilt config listed each module's last name component: ``0`` and ``2``, which PEFT matches against
    ``blocks.0`` too and refuses ("Target module Block(...) is not supported"). A numeric component keeps its parent."""
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj.0", "proj.2"], init_lora_weights=False)
    model = peft.get_peft_model(_Net(), cfg)
    model.save_pretrained(tmp_path / "ad")
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    ad = read_peft(tmp_path / "ad")
    ad.source = {}  # no original config: rebuilt from the modules
    write_peft(ad, tmp_path / "rebuilt")
    assert json.loads((tmp_path / "rebuilt" / "adapter_config.json").read_text())["target_modules"] == ["proj.0", "proj.2"]
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(_Net(), tmp_path / "rebuilt")(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_unconverted_pissa_is_refused_where_its_delta_would_be_wrong(tmp_path: Path) -> None:
    """PEFT replays PiSSA's init on load (W ← W − s·B₀A₀ from W's SVD), so an adapter saved without conversion changes
    the model by s·(B·A − B₀A₀), not s·B·A: merge, kohya / diffusers / gguf / vLLM outputs applied s·B·A to the
    original weights. They are refused now (check predicts it); a PEFT export keeps the init and loads like the original."""
    from adapterpack.errors import ConversionError
    from adapterpack.formats.serving import check_path
    from adapterpack.formats.write import write_adapters

    _llama().save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], init_lora_weights="pissa")
    model = peft.get_peft_model(_llama(), cfg)
    with torch.no_grad():  # "training": the factors move away from W's principal components
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(1.5)
    model.save_pretrained(tmp_path / "ad")
    x = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(_llama(), tmp_path / "ad")(x).logits
        plain = _llama()(x).logits
    src = tmp_path / "ad"
    with pytest.raises(ConversionError, match="pissa"):
        merge(src, tmp_path / "base", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with adapterpack.open(src) as ad:
        assert any("pissa" in n for n in ad.source["notes"])
        for fmt, dst, kw in (("kohya", "k.safetensors", {}), ("gguf", "g.gguf", {"base": tmp_path / "base"}),
                             ("diffusers", "pytorch_lora_weights.safetensors", {"component": "transformer"}),
                             ("peft", "v", {"serve_for": "vllm"})):  # fmt: skip
            with pytest.raises(ConversionError, match="pissa"):
                write_adapters([ad], tmp_path / dst, fmt, **kw)
            assert not (tmp_path / dst).exists()
        write_adapters([ad], tmp_path / "p", "peft")
    for target in ("vllm", "llama.cpp", "kohya"):
        assert any("pissa" in f.problem and f.severity == "refuse" for f in check_path(src, target)), target
    assert not [f for f in check_path(src, "peft") if f.severity == "refuse"]
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(_llama(), tmp_path / "p")(x).logits
    assert (want - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    from adapterpack.errors import ApplyError
    from adapterpack.torch import apply

    model = _llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ApplyError, match="pissa"):  # torch.apply would add s·B·A to the original weights as well
        apply(model, src)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
