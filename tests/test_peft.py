"""PEFT import/export: real adapters made with peft on tiny models, bit-exact round trips, ΔW vs PEFT."""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import get_pattern_key as peft_get_pattern_key
from safetensors.numpy import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import adapterpack
from adapterpack import Adapter, Module
from adapterpack.errors import ConversionError, InputError, UnrecognizedInputError, UnsafeInputError
from adapterpack.formats.detect import detect_format
from adapterpack.formats.patterns import build_patterns, get_pattern_key, resolve
from adapterpack.formats.peft import peft_config, read_peft, write_peft
from tests.helpers_safetensors import assert_same_folder, bits, load_st

CODECS = ("raw", "zstd", "byteplanes")
EXAMPLE = Path(__file__).resolve().parent.parent / "adapterpack" / "examples" / "smollm2-pydoc-lora"


# --- helpers ---------------------------------------------------------------------------------


def lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    """PEFT LoRA layers by base-model module name."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in model.base_model.model.named_modules():
        if isinstance(mod, LoraLayer):
            out[name] = mod
    return out


def forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- real PEFT adapters on tiny models ---------------------------------------------------------


def tiny_llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2() -> torch.nn.Module:
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


@dataclass
class Case:
    name: str
    make_base: Callable[[], torch.nn.Module]
    config: dict[str, Any]
    dtype: torch.dtype = torch.float32
    synth_ok: bool = True  # False: modules_to_save cannot be rebuilt from the tensors alone


CASES = [
    Case("plain", tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    Case(
        "patterns",
        tiny_llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
            # first match in dict order wins: layer 0's q_proj gets 6, not 2
            rank_pattern={"layers.0.self_attn.q_proj": 6, "q_proj": 2, "o_proj": 3},
            alpha_pattern={"model.layers.1.self_attn.v_proj": 5.5, "k_proj": 3, "gate_proj": 12},
        ),
    ),
    Case("rslora", tiny_llama, dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj"])),
    Case("dora", tiny_llama, dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"])),
    Case(
        "embedding",
        tiny_llama,
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"], modules_to_save=["lm_head"]),
        synth_ok=False,
    ),
    Case("fp16", lambda: tiny_llama(torch.float16), dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]), torch.float16),
    Case("bf16", lambda: tiny_llama(torch.bfloat16), dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"]), torch.bfloat16),
    Case("fan_in_fan_out", tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)),
    Case("fan_in_fan_out_dora", tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_proj"], fan_in_fan_out=True, use_dora=True)),
]


@dataclass
class Made:
    case: Case
    folder: Path
    base: torch.nn.Module  # untouched copy of the base model
    peft_model: torch.nn.Module
    ids: torch.Tensor
    _logits: torch.Tensor | None = None

    def reference(self) -> torch.Tensor:
        """Logits of PEFT loading the original folder (as a round-tripped one is loaded)."""
        if self._logits is None:
            self._logits = forward(load_peft(self.base, self.folder), self.ids)
        return self._logits


def make_peft(case: Case, folder: Path, seed: int = 0) -> Made:
    torch.manual_seed(seed)
    base = case.make_base()
    keep = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, LoraConfig(init_lora_weights=False, **case.config), autocast_adapter_dtype=False)
        pm.eval()
        pm.save_pretrained(folder)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    return Made(case, folder, keep, pm, ids)


BY_NAME = {c.name: c for c in CASES}


@pytest.fixture(scope="module")
def make(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Made]:
    """Build each case's PEFT folder once per module."""
    cache: dict[str, Made] = {}

    def get(name: str) -> Made:
        if name not in cache:
            cache[name] = make_peft(BY_NAME[name], tmp_path_factory.mktemp(name) / "peft")
        return cache[name]

    return get


@pytest.fixture(params=list(BY_NAME))
def made(request: pytest.FixtureRequest, make: Callable[[str], Made]) -> Made:
    return make(request.param)


def load_peft(base: torch.nn.Module, folder: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()


# --- reading ---------------------------------------------------------------------------------


def test_read_matches_peft(made: Made) -> None:
    """Every LoRA layer becomes a module with PEFT's rank, scale and ΔW; nothing else is lost."""
    ad = read_peft(made.folder)
    layers = lora_layers(made.peft_model)
    assert sorted(ad.modules) == sorted(layers)
    cfg = json.loads((made.folder / "adapter_config.json").read_text())
    assert ad.source["config"] == cfg
    assert ad.source["format"] == "peft" and ad.source["key_prefix"] == "base_model.model."
    for name, layer in layers.items():
        m = ad.modules[name]
        s = m.summary()
        assert s["rank"] == layer.r["default"]
        assert s["scale"] == layer.scaling["default"]
        assert s["dora"] == bool(made.case.config.get("use_dora"))
        assert m.params["fan_in_fan_out"] == bool(getattr(layer, "fan_in_fan_out", False))
        ref = layer.get_delta_weight("default").detach().float().numpy()
        ours = ad.delta(name)
        assert ours.shape == tuple(layer.get_base_layer().weight.shape) == tuple(m.base_shape)
        tol = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}[made.case.dtype]
        np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol * float(np.abs(ref).max()))
        if s["dora"]:
            mag = layer.lora_magnitude_vector["default"].weight.detach().numpy()
            assert bits(m.array("magnitude")) == bits(mag.reshape(-1))
    expected_np = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16}[made.case.dtype]
    assert all(m.array("A").dtype == expected_np for m in ad)


def test_pattern_case_values(make: Callable[[str], Made]) -> None:
    """rank_pattern / alpha_pattern resolve per module exactly as PEFT built them."""
    made = make("patterns")
    ad = read_peft(made.folder)
    p = {n: (m.params["rank"], m.params["alpha"]) for n, m in ad.modules.items()}
    assert p["model.layers.0.self_attn.q_proj"] == (6, 8)
    assert p["model.layers.1.self_attn.q_proj"] == (2, 8)
    assert p["model.layers.0.self_attn.o_proj"] == (3, 8)
    assert p["model.layers.1.self_attn.v_proj"] == (4, 5.5)
    assert p["model.layers.0.self_attn.v_proj"] == (4, 8)
    assert p["model.layers.0.self_attn.k_proj"] == (4, 3)
    assert p["model.layers.1.mlp.gate_proj"] == (4, 12)


def test_embedding_and_modules_to_save(make: Callable[[str], Made]) -> None:
    made = make("embedding")
    ad = read_peft(made.folder)
    emb = ad.modules["model.embed_tokens"]
    assert emb.params["layout"] == "embedding" and emb.base_shape == (128, 64)
    st, _ = load_st(made.folder / "adapter_model.safetensors")
    assert sorted(ad.tensors) == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.base_layer.weight"]
    for k, t in ad.tensors.items():
        assert bits(t) == bits(st[k])
    assert any("carried untouched" in n for n in ad.source["notes"])


# --- round trips -------------------------------------------------------------------------------


def test_peft_roundtrip(made: Made, tmp_path: Path) -> None:
    """PEFT → Adapter → PEFT: identical keys, tensor bits, metadata and config; PEFT loads it."""
    ad = read_peft(made.folder)
    out = write_peft(ad, tmp_path / "out")
    assert_same_folder(made.folder, out)
    assert detect_format(out) == "peft"
    assert not torch.equal(made.reference(), forward(made.base, made.ids))  # the adapter changes the output
    assert torch.equal(forward(load_peft(made.base, out), made.ids), made.reference())


@pytest.mark.parametrize("codec", CODECS)
def test_apack_roundtrip(made: Made, tmp_path: Path, codec: str) -> None:
    """PEFT → .apack (each codec) → PEFT is bit-exact; the .apack's ΔW equals the PEFT one."""
    ad = read_peft(made.folder)
    res = adapterpack.save(ad, tmp_path / "a.apack", codec=codec)
    assert res.file_size == (tmp_path / "a.apack").stat().st_size
    with adapterpack.open(tmp_path / "a.apack") as back:
        assert back.source == ad.source
        for name in ad.modules:
            assert bits(back.delta(name)) == bits(ad.delta(name))
        out = write_peft(back, tmp_path / "out")
    assert_same_folder(made.folder, out)


@pytest.mark.parametrize("name", [c.name for c in CASES if c.synth_ok])
def test_synthesized_config_loads_in_peft(make: Callable[[str], Made], tmp_path: Path, name: str) -> None:
    """Without the original config, the rebuilt one (rank/alpha patterns, flags) gives PEFT the same model."""
    made = make(name)
    ad = read_peft(made.folder)
    ad.source = {}
    out = write_peft(ad, tmp_path / "synth")
    cfg = json.loads((out / "adapter_config.json").read_text())
    orig = json.loads((made.folder / "adapter_config.json").read_text())
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        assert cfg[key] == orig[key]
    back = read_peft(out)
    for name, m in ad.modules.items():
        assert back.modules[name].params == m.params
        assert bits(back.modules[name].array("A")) == bits(m.array("A"))
    assert torch.equal(forward(load_peft(made.base, out), made.ids), made.reference())


def test_dtype_cast_on_write(make: Callable[[str], Made], tmp_path: Path) -> None:
    made = make("plain")
    ad = read_peft(made.folder)
    out = write_peft(ad, tmp_path / "bf16", dtype="bf16")
    st, _ = load_st(out / "adapter_model.safetensors")
    for m in ad:
        key = f"base_model.model.{m.name}.lora_A.weight"
        assert bits(st[key]) == bits(m.array("A").astype(ml_dtypes.bfloat16))


# --- conv layers and DoRA magnitudes of other shapes ------------------------------------------


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.conv1d = torch.nn.Conv1d(4, 6, 5)
        self.emb = torch.nn.Embedding(20, 16)
        self.lin = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("dora", [False, True])
def test_conv_layers(tmp_path: Path, dora: bool) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(
            ConvNet(),
            LoraConfig(r=2, lora_alpha=3, target_modules=["conv", "conv1d", "emb", "lin"], use_dora=dora, init_lora_weights=False),
        )
        pm.save_pretrained(tmp_path / "peft")
    ad = read_peft(tmp_path / "peft")
    assert "magnitude_shapes" not in ad.source and "key_overrides" not in ad.source  # PEFT 0.21's own names and shapes
    assert ad.modules["conv"].params["layout"] == "conv" and ad.modules["conv"].base_shape == (8, 3, 3, 3)
    assert ad.modules["conv1d"].params["layout"] == "conv" and ad.modules["conv1d"].base_shape == (6, 4, 5)
    for name, layer in lora_layers(pm).items():
        ref = layer.get_delta_weight("default").detach().numpy()
        np.testing.assert_allclose(ad.delta(name), ref, rtol=1e-5, atol=1e-6)
        if dora:
            mag = layer.lora_magnitude_vector["default"].weight.detach().numpy()
            assert bits(ad.modules[name].array("magnitude")) == bits(mag.reshape(-1))
    adapterpack.save(ad, tmp_path / "c.apack")
    with adapterpack.open(tmp_path / "c.apack") as back:
        out = write_peft(back, tmp_path / "out")
    assert_same_folder(tmp_path / "peft", out)
    if dora:  # PEFT saves conv magnitudes as [1, out, 1, ...]
        st, _ = load_st(out / "adapter_model.safetensors")
        assert st["base_model.model.conv.lora_magnitude_vector"].shape == (1, 8, 1, 1)
        assert st["base_model.model.conv1d.lora_magnitude_vector"].shape == (1, 6, 1)


# --- adapter_model.bin ----------------------------------------------------------------------


def test_bin_weights(tmp_path: Path) -> None:
    made = make_peft(
        Case("bf16", lambda: tiny_llama(torch.bfloat16), dict(r=4, lora_alpha=8, target_modules=["q_proj"])), tmp_path / "p"
    )
    ref = read_peft(made.folder)
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((made.folder / "adapter_config.json").read_bytes())
    from safetensors.torch import load_file

    torch.save(load_file(made.folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    ad = read_peft(folder)
    assert ad.source["weights_file"] == "adapter_model.bin"
    assert sorted(ad.modules) == sorted(ref.modules)
    for name, m in ref.modules.items():
        for slot in ("A", "B"):
            assert bits(ad.modules[name].array(slot)) == bits(m.array(slot))
    out = write_peft(ad, tmp_path / "out")
    st, _ = load_st(out / "adapter_model.safetensors")
    st_ref, _ = load_st(made.folder / "adapter_model.safetensors")
    assert sorted(st) == sorted(st_ref) and all(bits(st[k]) == bits(st_ref[k]) for k in st)


class NotATensor:
    pass


def test_bin_with_objects_is_unsafe(tmp_path: Path) -> None:
    made = make_peft(CASES[0], tmp_path / "p")
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((made.folder / "adapter_config.json").read_bytes())
    torch.save({"x": NotATensor()}, folder / "adapter_model.bin")
    with pytest.raises(UnsafeInputError, match="weights_only"):
        read_peft(folder)


def test_bin_needs_torch_2_6(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before torch 2.6, torch.load(weights_only=True) can be made to run code (CVE-2025-32434)."""
    made = make_peft(CASES[0], tmp_path / "p")
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((made.folder / "adapter_config.json").read_bytes())
    from safetensors.torch import load_file

    torch.save(load_file(made.folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(UnsafeInputError, match="CVE-2025-32434") as e:
        read_peft(folder)
    assert e.type is UnsafeInputError
    monkeypatch.setattr(torch, "__version__", "2.6.0+cpu")
    assert sorted(read_peft(folder).modules) == sorted(read_peft(made.folder).modules)


@pytest.mark.parametrize(
    ("version", "parsed"),
    [("2.13.0+cpu", (2, 13, 0)), ("2.5.1", (2, 5, 1)), ("2.6.0a0+git1234", (2, 6, 0)), ("2.6", (2, 6)), ("x", (0,))],
)
def test_torch_version(version: str, parsed: tuple[int, ...]) -> None:
    from adapterpack.formats.peft import torch_version

    assert torch_version(version) == parsed


# --- lora_bias, grouped convolutions, mixed key prefixes ---------------------------------------------


def test_lora_bias_is_carried_with_a_note(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], lora_bias=True, init_lora_weights=False)
        pm = get_peft_model(ConvNet(), cfg)
        pm.save_pretrained(tmp_path / "peft")
    ad = read_peft(tmp_path / "peft")
    assert list(ad.tensors) == ["base_model.model.lin.lora_B.bias"]
    (note,) = [n for n in ad.source["notes"] if "lora_bias" in n]
    assert "delta() covers the weight only" in note
    layer = lora_layers(pm)["lin"]
    np.testing.assert_allclose(ad.delta("lin"), layer.get_delta_weight("default").detach().numpy(), rtol=1e-6, atol=1e-7)
    adapterpack.save(ad, tmp_path / "b.apack")
    with adapterpack.open(tmp_path / "b.apack") as back:
        out = write_peft(back, tmp_path / "out")
    assert_same_folder(tmp_path / "peft", out)


class GroupedConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 16, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_grouped_conv_is_refused_as_such(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(GroupedConv(), LoraConfig(r=4, lora_alpha=4, target_modules=["conv"], init_lora_weights=False))
        pm.save_pretrained(tmp_path / "peft")
    with pytest.raises(InputError, match=r"grouped convolution \(groups = 2\)") as e:
        read_peft(tmp_path / "peft")
    assert e.type is InputError


def test_mixed_key_prefixes_are_refused(plain: Path) -> None:
    st, meta = load_st(plain / "adapter_model.safetensors")
    st = {(k[len("base_model.model.") :] if ".layers.0." in k else k): v for k, v in st.items()}
    save_file(st, plain / "adapter_model.safetensors", metadata=meta)
    with pytest.raises(InputError, match=r"some LoRA keys start with 'base_model\.model\.' and some do not") as e:
        read_peft(plain)
    assert e.type is InputError


# --- bad input ----------------------------------------------------------------------------------


@pytest.fixture()
def plain(tmp_path: Path) -> Path:
    return make_peft(CASES[0], tmp_path / "plain").folder


def edit_config(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def test_errors_config(plain: Path) -> None:
    (plain / "adapter_config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON") as e:
        read_peft(plain)
    assert e.type is InputError
    (plain / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="not valid JSON") as e:
        read_peft(plain)
    assert e.type is InputError
    (plain / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="JSON object"):
        read_peft(plain)
    (plain / "adapter_config.json").unlink()
    with pytest.raises(InputError, match=r"no adapter_config\.json") as e:
        read_peft(plain)
    assert e.type is InputError
    with pytest.raises(UnrecognizedInputError):
        adapterpack.open(plain)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft_type": "IA3"}, "only LoRA"),
        ({"r": "8"}, "r must be a positive integer"),
        ({"lora_alpha": None}, "lora_alpha must be a finite number"),
        ({"rank_pattern": [1]}, "rank_pattern must be an object"),
        ({"rank_pattern": {"q_proj": 0}}, "positive integer"),
        ({"alpha_pattern": {"(": 2}}, "not a valid regular expression"),
        ({"use_dora": "yes"}, "use_dora must be true or false"),
        ({"target_modules": [1]}, "target_modules must be a string, a list of strings or null"),
        ({"r": 5}, r"module 'model\.layers\.0\.self_attn\.q_proj'.*rank 4.*r=5"),
        ({"rank_pattern": {"layers.1.self_attn.v_proj": 2}}, r"module 'model\.layers\.1\.self_attn\.v_proj'.*rank 4.*r=2"),
        ({"use_dora": True}, "no lora_magnitude_vector"),
    ],
)
def test_errors_config_values(plain: Path, changes: dict[str, Any], message: str) -> None:
    edit_config(plain, **changes)
    with pytest.raises(InputError, match=message) as e:
        read_peft(plain)
    assert e.type is InputError


def test_errors_weights(plain: Path) -> None:
    st, meta = load_st(plain / "adapter_model.safetensors")
    del st["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(st, plain / "adapter_model.safetensors", metadata=meta)
    with pytest.raises(InputError, match=r"'model\.layers\.0\.self_attn\.q_proj' needs both LoRA factors") as e:
        read_peft(plain)
    assert e.type is InputError
    st = {
        "base_model.model.x.lora_A.weight": np.zeros((4, 8), np.float32),
        "base_model.model.x.lora_B.weight": np.zeros((8, 3), np.float32),
    }
    save_file(st, plain / "adapter_model.safetensors")
    with pytest.raises(InputError, match="disagree on the rank"):
        read_peft(plain)
    st = {
        "base_model.model.x.lora_A.weight": np.zeros((4, 8), np.float32),
        "base_model.model.x.lora_B.weight": np.zeros((8, 4), np.int8),  # two float dtypes are widened to one
    }
    save_file(st, plain / "adapter_model.safetensors")
    with pytest.raises(InputError, match="share one float dtype"):
        read_peft(plain)
    save_file({"other": np.zeros(3, np.float32)}, plain / "adapter_model.safetensors")
    with pytest.raises(InputError, match="no LoRA tensors"):
        read_peft(plain)
    (plain / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    with pytest.raises(InputError, match="cannot read safetensors") as e:
        read_peft(plain)
    assert e.type is InputError
    (plain / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError, match=r"no adapter_model\.safetensors or adapter_model\.bin") as e:
        read_peft(plain)
    assert e.type is InputError


def test_write_refusals(plain: Path, tmp_path: Path) -> None:
    ad = read_peft(plain)
    names = list(ad.modules)
    m = ad.modules[names[0]]
    m.tensors["magnitude"] = np.ones(m.base_shape[0], np.float32)
    m.params["dora"] = True
    with pytest.raises(ConversionError, match="use_dora"):
        write_peft(ad, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    ad = read_peft(plain)
    ad.source = {"format": "kohya"}
    ad.tensors["lora_unet_x.hada_w1_a"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match="drop_tensors"):
        write_peft(ad, tmp_path / "x")
    out = write_peft(ad, tmp_path / "x", drop_tensors=True)
    st, _ = load_st(out / "adapter_model.safetensors")
    assert "lora_unet_x.hada_w1_a" not in st and len(st) == 2 * len(ad.modules)
    with pytest.raises(ConversionError, match="float dtype"):
        write_peft(ad, tmp_path / "y", dtype="int8")


def test_changed_modules_rebuild_config(plain: Path, tmp_path: Path) -> None:
    """An edited adapter keeps the original config's other fields but gets r/alpha patterns that fit."""
    ad = read_peft(plain)
    orig = dict(ad.source["config"])
    assert peft_config(ad) == orig
    name = "model.layers.1.self_attn.q_proj"
    ad.modules[name].params["alpha"] = 2.5
    cfg = peft_config(ad)
    assert cfg["alpha_pattern"] == {name: 2.5} and cfg["lora_alpha"] == orig["lora_alpha"]
    assert {k: v for k, v in cfg.items() if k != "alpha_pattern"} == {k: v for k, v in orig.items() if k != "alpha_pattern"}
    out = write_peft(ad, tmp_path / "o")
    assert read_peft(out).modules[name].params["alpha"] == 2.5


# --- pattern rule ------------------------------------------------------------------------------

PATTERN_KEYS = [
    ["q_proj"],
    ["layers.0.self_attn.q_proj", "q_proj"],
    ["q_proj", "layers.0.self_attn.q_proj"],
    ["model.layers.1.self_attn.v_proj", "v_proj"],
    [r"layers\.\d+\.mlp\..*", "proj"],
    ["self_attn.q", "attn.q_proj"],
    ["^model\\.layers\\.0\\.self_attn\\.q_proj"],
    ["layers.1"],
]
MODULE_NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.10.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.0.mlp.gate_proj",
    "xmodel.layers.0.self_attn.q_proj",
    "q_proj",
    "model.layers.1",
]


@pytest.mark.parametrize("keys", PATTERN_KEYS)
def test_pattern_rule_matches_peft(keys: list[str]) -> None:
    for name in MODULE_NAMES:
        assert get_pattern_key(keys, name) == peft_get_pattern_key(keys, name), (keys, name)


def test_build_patterns_resolves_back() -> None:
    values = {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.self_attn.q_proj": 4, "model.layers.10.self_attn.q_proj": 2}
    pats = build_patterns(values, 4)
    assert pats == {"model.layers.0.self_attn.q_proj": 8, "model.layers.10.self_attn.q_proj": 2}
    # a module whose name ends with another's: plain names would over-match, so anchored escaped names are used
    values = {"a.b": 3, "x.a.b": 4}
    pats = build_patterns(values, 4)
    assert pats == {"^" + re.escape("a.b"): 3}
    for name, v in values.items():
        assert resolve(pats, 4, name) == v
        key = peft_get_pattern_key(pats.keys(), name)
        assert pats.get(key, 4) == v


# --- the bundled example ---------------------------------------------------------------------


@pytest.mark.skipif(not (EXAMPLE / "adapter_model.safetensors").is_file(), reason="bundled example not built")
@pytest.mark.parametrize("codec", CODECS)
def test_bundled_example(tmp_path: Path, codec: str) -> None:
    ad = adapterpack.open(EXAMPLE)
    assert len(ad) == 120 and ad.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {m.summary()["scale"] for m in ad} == {2.0}
    res = adapterpack.save(ad, tmp_path / "ex.apack", codec=codec)
    st_size = (EXAMPLE / "adapter_model.safetensors").stat().st_size
    if codec != "raw":
        assert res.file_size < st_size
    with adapterpack.open(tmp_path / "ex.apack") as back:
        out = write_peft(back, tmp_path / "out")
    assert_same_folder(EXAMPLE, out)


def test_detect_and_open(plain: Path) -> None:
    assert detect_format(plain) == "peft"
    assert detect_format(plain / "adapter_model.safetensors") == "peft"
    ad = adapterpack.open(plain / "adapter_config.json")
    assert isinstance(ad, Adapter) and all(isinstance(m, Module) for m in ad)


def test_old_dora_key_name_is_kept(make: Callable[[str], Made], tmp_path: Path) -> None:
    """PEFT < 0.12 saved ``lora_magnitude_vector.weight``; the key survives a round trip."""
    made = make("dora")
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((made.folder / "adapter_config.json").read_bytes())
    st, meta = load_st(made.folder / "adapter_model.safetensors")
    old = {k + ".weight" if k.endswith("lora_magnitude_vector") else k: v for k, v in st.items()}
    save_file(old, folder / "adapter_model.safetensors", metadata=meta)
    ad = read_peft(folder)
    assert all(m.params["dora"] for m in ad)
    assert set(ad.source["key_overrides"]) == set(ad.modules)
    adapterpack.save(ad, tmp_path / "o.apack")
    with adapterpack.open(tmp_path / "o.apack") as back:
        out = write_peft(back, tmp_path / "out")
    assert_same_folder(folder, out)
