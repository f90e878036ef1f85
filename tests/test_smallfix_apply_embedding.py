"""``adapterpack.torch.apply`` of a PEFT LoRA on embed_tokens / lm_head: PEFT saves such a layer's own weight beside its
factors (``<module>.base_layer.weight``) and loads it into the base layer before adding ΔW. apply() refused these
adapters ("full tensors besides LoRA factors"); it now takes the saved weight as W, as merge does and as PEFT loads it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import adapterpack  # noqa: E402
from adapterpack.adapter import as_array  # noqa: E402
from adapterpack.errors import ApplyError  # noqa: E402
from adapterpack.torch import apply  # noqa: E402

IDS = torch.tensor([[1, 5, 7, 2, 39, 0, 11]])
SAVED = ["base_model.model.lm_head.base_layer.weight", "base_model.model.model.embed_tokens.base_layer.weight"]


def _llama(tied: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=40, tie_word_embeddings=tied)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _save(folder: Path, targets: list[str], tied: bool = False, edit: float = 0.0, **kw: object) -> Path:
    """A real PEFT LoRA of ``targets``; ``edit`` added to every saved base weight (a W that is not the model's)."""
    from safetensors.numpy import load_file, save_file

    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True"
        peft.get_peft_model(_llama(tied), cfg).save_pretrained(folder)
    if edit:
        weights = folder / "adapter_model.safetensors"
        state = load_file(str(weights))
        for k in state:
            if k.endswith(".base_layer.weight"):
                state[k] = state[k] + np.float32(edit)
        save_file(state, str(weights), metadata={"format": "pt"})
    return folder


def _peft_logits(folder: Path, tied: bool = False) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(_llama(tied), folder).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("edit", [0.0, 0.25])
@pytest.mark.parametrize("merge", [True, False])
def test_apply_matches_peft_with_the_saved_base_weights(tmp_path: Path, merge: bool, edit: float) -> None:
    """embed_tokens (an nn.Embedding), lm_head and q_proj: apply() gives PEFT's own logits, merged and hooked, also when
    the saved W differs from the model's (PEFT then runs on the saved one); unapply puts back the very weights."""
    folder = _save(tmp_path / "ad", ["embed_tokens", "q_proj", "lm_head"], edit=edit)
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "np") as f:
        assert sorted(k for k in f.keys() if k.endswith(".base_layer.weight")) == SAVED
    want = _peft_logits(folder)
    assert (want - _logits(_llama())).abs().max() > 1e-3  # the adapter changes the output
    for source in ("folder", "apack", "adapter"):
        model = _llama()
        before = _state(model)
        if source == "folder":
            applied = apply(model, folder, merge=merge)
        elif source == "apack":
            with adapterpack.open(folder) as ad:
                adapterpack.save(ad, tmp_path / "a.apack")
            applied = apply(model, tmp_path / "a.apack", merge=merge)
        else:
            with adapterpack.open(folder) as ad:
                applied = apply(model, ad, merge=merge)
        assert sorted(applied.modules) == ["lm_head", "model.embed_tokens", "model.layers.0.self_attn.q_proj"]
        torch.testing.assert_close(_logits(model), want, rtol=0, atol=1e-5, msg=source)
        applied.unapply()
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), source


def test_unmerged_with_the_models_own_weight_touches_no_weight(tmp_path: Path) -> None:
    """Saved W equal to the model's: hooks only, the weight stays the very same memory."""
    folder = _save(tmp_path / "ad", ["embed_tokens"])
    model = _llama()
    emb = model.model.embed_tokens.weight.data_ptr()
    applied = apply(model, folder, merge=False)
    assert model.model.embed_tokens.weight.data_ptr() == emb
    torch.testing.assert_close(_logits(model), _peft_logits(folder), rtol=0, atol=1e-5)
    applied.unapply()


def test_a_saved_weight_tied_to_another_module_is_refused_when_it_would_change_it(tmp_path: Path) -> None:
    """Tied embed_tokens / lm_head: a saved W that differs would change lm_head too (refused, model untouched);
    one equal to the model's needs no change, so hooks apply it."""
    model = _llama(tied=True)
    before = _state(model)
    edited = _save(tmp_path / "edited", ["embed_tokens"], tied=True, edit=0.25)
    for merge in (False, True):
        with pytest.raises(ApplyError, match="tied to 'lm_head'"):
            apply(model, edited, merge=merge)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    same = _save(tmp_path / "same", ["embed_tokens"], tied=True)
    applied = apply(model, same, merge=False)
    torch.testing.assert_close(_logits(model), _peft_logits(same, tied=True), rtol=0, atol=1e-5)
    applied.unapply()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_other_full_tensors_are_still_refused(tmp_path: Path) -> None:
    """modules_to_save (a whole replaced lm_head) is not a LoRA module: apply() would apply it half, so it still refuses."""
    folder = _save(tmp_path / "ad", ["embed_tokens", "v_proj"], modules_to_save=["lm_head"])
    model = _llama()
    before = _state(model)
    with pytest.raises(ApplyError, match=r"1 full tensors besides LoRA factors \(modules_to_save: base_model.model.lm_head"):
        apply(model, folder)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_saved_weight_of_another_shape_is_refused(tmp_path: Path) -> None:
    """A model whose embedding is not the saved one's shape (another vocabulary): refused before any change."""
    folder = _save(tmp_path / "ad", ["q_proj", "lm_head"])
    with adapterpack.open(folder) as ad:
        mem = ad.derived(dict(ad.modules), {k: as_array(t)[:-1].copy() for k, t in ad.tensors.items()})
    model = _llama()
    before = _state(model)
    with pytest.raises(ApplyError, match=r"module 'lm_head': its saved base weight is \[39, 32\], the model's \[40, 32\]"):
        apply(model, mem)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
