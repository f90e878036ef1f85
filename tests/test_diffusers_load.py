"""Our diffusers exports loaded by diffusers' own code path (``lora_state_dict`` → ``load_lora_into_unet`` /
``load_lora_into_text_encoder``, what ``pipeline.load_lora_weights`` runs) into tiny models built offline
from a config: every module gets its exact rank and scale, ΔW matches a float64 reference, and the
LoRA-applied UNet's output equals the base UNet with ΔW merged by hand."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as XLLoader
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModel

import adapterpack
from adapterpack import Adapter, Module
from adapterpack.formats.diffusers import write_diffusers
from adapterpack.formats.kohya import read_kohya
from adapterpack.formats.sd_names import kohya_name_of, sdxl_sgm_path
from tests.helpers_safetensors import assert_same_file

UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (8, 16),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 8,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
}
#: SDXL's UNet layout (3 levels, attention in down 1-2 / up 0-1, add_embedding), tiny
SDXL_CONFIG = UNET_CONFIG | {
    "layers_per_block": 2,
    "block_out_channels": (8, 16, 16),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 2),
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 32,
}
RANKS = (1, 2, 3, 4, 6)
ALPHAS = (1.0, 3.0, 0.5, 4.0, 7.0, 2.5)


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def random_adapter(model: torch.nn.Module, component: str, seed: int) -> Adapter:
    """Every Linear / Conv2d of ``model`` with its own rank and alpha (cycling, so they all differ from their neighbours)."""
    rng = np.random.default_rng(seed)
    ad = Adapter()
    for i, (n, m) in enumerate(layers(model).items()):
        r, alpha = RANKS[i % len(RANKS)], ALPHAS[i % len(ALPHAS)]
        w = tuple(m.weight.shape)
        a = rng.standard_normal((r, *w[1:])).astype(np.float32)
        b = (rng.standard_normal((w[0], r, *([1] * (len(w) - 2)))) * 0.05).astype(np.float32)
        name = f"{component}.{n}"
        layout = "conv" if len(w) == 4 else "linear"
        ad.modules[name] = Module(name, "lora", w, {"rank": r, "alpha": alpha, "layout": layout}, {"A": a, "B": b})
    return ad


def reference(m: Module) -> np.ndarray:
    """ΔW = scale · B @ A in float64, in the base weight's shape."""
    f = m.factors()
    return (f.scale * (f.B.astype(np.float64) @ f.A.astype(np.float64))).reshape(m.base_shape)


def check_loaded(model: torch.nn.Module, ad: Adapter, component: str, strip: str = "") -> None:
    """Every adapted layer of ``model`` has the module's rank, scale and (to float32 rounding) ΔW."""
    for name, m in ad.modules.items():
        layer = model.get_submodule(name[len(component) + 1 :].removeprefix(strip))
        assert layer.r["x"] == m.params["rank"], name
        assert layer.scaling["x"] == m.summary()["scale"], name
        ref = reference(m)
        got = layer.get_delta_weight("x").detach().double().numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def load_unet(base: UNet2DConditionModel, path: Path) -> UNet2DConditionModel:
    model = copy.deepcopy(base)
    state, alphas, metadata = Loader.lora_state_dict(str(path), return_lora_metadata=True)
    Loader.load_lora_into_unet(state, alphas, model, adapter_name="x", metadata=metadata)
    return model


def test_unet_export_loads_exact(unet: UNet2DConditionModel, tmp_path: Path) -> None:
    ad = random_adapter(unet, "unet", 0)
    assert len({(m.params["rank"], m.params["alpha"]) for m in ad}) > 5 and len(ad) == len(layers(unet))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    write_diffusers(ad, path)
    model = load_unet(unet, path)
    check_loaded(model, ad, "unet")
    # the LoRA-applied forward equals the base UNet with every ΔW merged by hand
    merged = copy.deepcopy(unet)
    with torch.no_grad():
        for name, m in ad.modules.items():
            w = merged.get_submodule(name[len("unet.") :]).weight
            w.copy_(torch.from_numpy((w.double().numpy() + reference(m)).astype(np.float32)))
    g = torch.Generator().manual_seed(1)
    sample, hidden = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    with torch.no_grad():
        want = merged(sample, 10, encoder_hidden_states=hidden).sample
        got = model(sample, 10, encoder_hidden_states=hidden).sample
        plain = unet(sample, 10, encoder_hidden_states=hidden).sample
    assert (want - plain).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_text_encoder_export_loads_exact(tmp_path: Path) -> None:
    """Names with text_model. (kohya's and older diffusers' CLIP layout) load into a CLIP text model
    that transformers builds without that wrapper."""
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=50,
        max_position_embeddings=8, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    te = CLIPTextModel(cfg).eval()
    flat = random_adapter(te, "text_encoder", 2)
    ad = Adapter(modules={})
    for name, m in flat.modules.items():
        wrapped = name if ".text_model." in name else name.replace("text_encoder.", "text_encoder.text_model.", 1)
        ad.modules[wrapped] = Module(wrapped, m.encoding, m.base_shape, m.params, m.tensors)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    write_diffusers(ad, path)
    state, alphas, metadata = Loader.lora_state_dict(str(path), return_lora_metadata=True)
    Loader.load_lora_into_text_encoder(state, alphas, te, prefix="text_encoder", adapter_name="x", metadata=metadata)
    check_loaded(te, ad, "text_encoder", strip="" if hasattr(te, "text_model") else "text_model.")


def test_kohya_file_loads_with_kohyas_scales(unet: UNet2DConditionModel, tmp_path: Path) -> None:
    """A kohya SD file (per-module ranks, alphas, missing alphas) → our diffusers export → diffusers: every
    module's scale is kohya's alpha / rank and ΔW kohya's ΔW."""
    rng = np.random.default_rng(3)
    t: dict[str, np.ndarray] = {}
    expect: dict[str, tuple[int, float]] = {}
    for i, (n, m) in enumerate(layers(unet).items()):
        k = kohya_name_of(f"unet.{n}", False)
        assert k is not None
        r, w = RANKS[i % len(RANKS)], tuple(m.weight.shape)
        t[f"{k}.lora_down.weight"] = rng.standard_normal((r, *w[1:])).astype(np.float16)
        t[f"{k}.lora_up.weight"] = (rng.standard_normal((w[0], r, *([1] * (len(w) - 2)))) * 0.05).astype(np.float16)
        alpha = float(r)  # kohya: no alpha tensor means alpha = rank
        if i % 4:
            alpha = ALPHAS[i % len(ALPHAS)]
            t[f"{k}.alpha"] = np.array(alpha, np.float16)
        expect[n] = (r, alpha)
    src = tmp_path / "kohya.safetensors"
    save_file(t, src)
    dst = tmp_path / "pytorch_lora_weights.safetensors"
    write_diffusers(read_kohya(src), dst)
    model = load_unet(unet, dst)
    for n, (r, alpha) in expect.items():
        layer = model.get_submodule(n)
        k = kohya_name_of(f"unet.{n}", False)
        assert layer.r["x"] == r and layer.scaling["x"] == alpha / r, n
        down, up = t[f"{k}.lora_down.weight"].astype(np.float64), t[f"{k}.lora_up.weight"].astype(np.float64)
        ref = (alpha / r * (up.reshape(up.shape[0], r) @ down.reshape(r, -1))).reshape(tuple(layer.weight.shape))
        got = layer.get_delta_weight("x").detach().double().numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def sgm_kohya_file(model: torch.nn.Module, path: Path, *, uniform: bool) -> dict[str, tuple[int, float]]:
    """A kohya SDXL file naming every Linear / Conv2d of ``model`` by its SGM path; (rank, alpha) per module."""
    rng = np.random.default_rng(4)
    t: dict[str, np.ndarray] = {}
    expect = {}
    for i, (n, m) in enumerate(layers(model).items()):
        sgm = sdxl_sgm_path(n)
        assert sgm is not None, n
        k = "lora_unet_" + sgm.replace(".", "_")
        r, alpha = (2, 1.0) if uniform else (RANKS[i % len(RANKS)], ALPHAS[i % len(ALPHAS)])
        w = tuple(m.weight.shape)
        t[f"{k}.lora_down.weight"] = rng.standard_normal((r, *w[1:])).astype(np.float32)
        t[f"{k}.lora_up.weight"] = (rng.standard_normal((w[0], r, *([1] * (len(w) - 2)))) * 0.05).astype(np.float32)
        t[f"{k}.alpha"] = np.array(alpha, np.float32)
        expect[n] = (r, alpha)
    save_file(t, path)
    return expect


def test_kohya_sdxl_names_match_diffusers_own_mapping(tmp_path: Path) -> None:
    """kohya's SDXL files name the UNet by SGM paths: our conversion puts every module's factors where
    diffusers' own SGM conversion puts them (uniform alpha, which that conversion reads right), and with
    per-module ranks and alphas diffusers loads our file with kohya's exact scales."""
    torch.manual_seed(0)
    base = UNet2DConditionModel(**SDXL_CONFIG).eval()
    src, ours = tmp_path / "sdxl_kohya.safetensors", tmp_path / "pytorch_lora_weights.safetensors"
    sgm_kohya_file(base, src, uniform=True)
    theirs = copy.deepcopy(base)
    state, alphas, metadata = XLLoader.lora_state_dict(str(src), unet_config=base.config, return_lora_metadata=True)
    XLLoader.load_lora_into_unet(state, alphas, theirs, adapter_name="x", metadata=metadata)
    write_diffusers(read_kohya(src), ours)
    mine = load_unet(base, ours)
    for n in layers(base):
        assert torch.equal(mine.get_submodule(n).get_delta_weight("x"), theirs.get_submodule(n).get_delta_weight("x")), n
    expect = sgm_kohya_file(base, src, uniform=False)
    write_diffusers(read_kohya(src), ours)
    mine = load_unet(base, ours)
    for n, (r, alpha) in expect.items():
        layer = mine.get_submodule(n)
        assert layer.r["x"] == r and layer.scaling["x"] == alpha / r, n


def test_file_saved_by_diffusers_reads_exact(unet: UNet2DConditionModel, tmp_path: Path) -> None:
    """A LoRA trained the diffusers way (PEFT LoraConfig with rank/alpha patterns, saved by
    save_lora_weights with its metadata): our reader gives every module PEFT's rank and scale, and
    the file comes back bit-exact through .apack."""
    model = copy.deepcopy(unet)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
        rank_pattern={"attn2.to_k": 2, "^down_blocks.0.resnets.0.conv1": 6},
        alpha_pattern={"to_v": 3, "conv1": 5},
        init_lora_weights=False,
    )
    model.add_adapter(config, adapter_name="x")
    Loader.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(model, adapter_name="x"), unet_lora_adapter_metadata=config.to_dict()
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    ad = adapterpack.formats.diffusers.read_diffusers(path)
    lora_layers = {n: m for n, m in model.named_modules() if hasattr(m, "scaling") and "x" in m.scaling}
    assert sorted(ad.modules) == sorted(f"unet.{n}" for n in lora_layers)
    assert len({m.summary()["scale"] for m in ad}) > 2
    for n, layer in lora_layers.items():
        m = ad.modules[f"unet.{n}"]
        assert m.params["rank"] == layer.r["x"] and m.summary()["scale"] == layer.scaling["x"], n
    adapterpack.save(ad, tmp_path / "d.apack")
    with adapterpack.open(tmp_path / "d.apack") as back:
        write_diffusers(back, tmp_path / "again.safetensors")
    assert_same_file(path, tmp_path / "again.safetensors")
