"""Review: a diffusers (or kohya SD) adapter written as a PEFT folder keeps its pipeline component in every key
(``base_model.model.unet.down_blocks…``); PEFT loads it onto the UNet without attaching one key, a silent no-op.
``check --target peft`` said "loads as is"; it now reports the misread, and the export says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

import adapterpack  # noqa: E402
from adapterpack.formats.diffusers import write_diffusers  # noqa: E402
from adapterpack.formats.serving import check_path  # noqa: E402
from adapterpack.formats.write import write_adapters  # noqa: E402

UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (8, 16),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 8, "attention_head_dim": 2, "norm_num_groups": 4}  # fmt: skip


def _unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**UNET).eval()


def test_pipeline_names_in_a_peft_folder_are_reported(tmp_path: Path) -> None:
    unet = _unet()
    rng = np.random.default_rng(0)
    ad = adapterpack.Adapter()
    for n in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.proj_in"):
        w = tuple(unet.get_submodule(n).weight.shape)
        a = rng.standard_normal((2, *w[1:])).astype(np.float32)
        b = rng.standard_normal((w[0], 2, *([1] * (len(w) - 2)))).astype(np.float32)
        params = {"rank": 2, "alpha": 2.0, "layout": "conv" if len(w) == 4 else "linear"}
        ad.modules[f"unet.{n}"] = adapterpack.Module(f"unet.{n}", "lora", w, params, {"A": a, "B": b})
    src = tmp_path / "pytorch_lora_weights.safetensors"
    write_diffusers(ad, src)
    found = [f for f in check_path(src, "peft") if f.severity != "note"]
    assert len(found) == 1 and found[0].severity == "misread" and "pipeline component" in found[0].problem
    assert sorted(found[0].modules) == sorted(ad.modules)
    with adapterpack.open(src) as read:
        notes = write_adapters([read], tmp_path / "p", "peft")
    assert any("pipeline component" in n for n in notes)
    # what PEFT does with that folder: every layer wrapped, no factor loaded (B stays zero): the adapter is a no-op
    model = peft.PeftModel.from_pretrained(_unet(), tmp_path / "p")
    layer = model.base_model.model.get_submodule("down_blocks.0.attentions.0.proj_in")
    assert float(layer.lora_B["default"].weight.abs().max()) == 0.0


def test_kohya_check_notes_diffusers_attention_alphas(tmp_path: Path) -> None:
    """diffusers 0.42 loads a kohya SD file (ours, or sd-scripts') with the attention layers' alphas under the wrong
    names: with per-module alphas those layers get the commonest alpha. check --target kohya says so."""
    import copy

    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    from adapterpack.formats.kohya import write_kohya

    unet = _unet()
    rng = np.random.default_rng(1)
    ad = adapterpack.Adapter()
    block = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    names = (f"{block}.to_q", f"{block}.to_k", "down_blocks.0.attentions.0.proj_in", "up_blocks.1.attentions.0.proj_out")
    for n, alpha in zip(names, (7.0, 1.0, 1.0, 1.0)):
        w = tuple(unet.get_submodule(n).weight.shape)
        a = rng.standard_normal((2, *w[1:])).astype(np.float32)
        b = rng.standard_normal((w[0], 2, *([1] * (len(w) - 2)))).astype(np.float32)
        params = {"rank": 2, "alpha": alpha, "layout": "conv" if len(w) == 4 else "linear"}
        ad.modules[f"unet.{n}"] = adapterpack.Module(f"unet.{n}", "lora", w, params, {"A": a, "B": b})
    src = tmp_path / "k.safetensors"
    write_kohya(ad, src)
    model = copy.deepcopy(unet)
    state, alphas, meta = Loader.lora_state_dict(str(src), return_lora_metadata=True)
    Loader.load_lora_into_unet(state, alphas, model, adapter_name="x", metadata=meta)
    q = model.get_submodule(names[0])
    assert q.scaling["x"] != 7.0 / 2  # diffusers' misread, which the note describes
    notes = [f for f in check_path(src, "kohya") if "attention layers" in f.problem]
    assert len(notes) == 1 and notes[0].severity == "note" and f"unet.{names[0]}" in notes[0].modules
