"""Activated LoRA (aLoRA: applies only from its invocation tokens on; PEFT's alora_invocation_tokens, llama.cpp's
adapter.alora.invocation_tokens): carried between PEFT and GGUF, refused where the target would apply it to every token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import adapterpack
from adapterpack.errors import ConversionError
from adapterpack.ops.convert import convert
from tests.apack_builders import lora_gguf

TOKENS = [5, 17, 3]


def _gguf(path: Path, tokens: list[int] | None) -> Path:
    import gguf

    def alora(w: gguf.GGUFWriter) -> None:
        if tokens is not None:
            w.add_key_value(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, tokens, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 16)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32)
    return lora_gguf(path, {"blk.0.attn_v.weight.lora_a": a, "blk.0.attn_v.weight.lora_b": b}, extra=alora)


def _gguf_tokens(path: Path) -> tuple[list[int] | None, str | None]:
    import gguf

    f = gguf.GGUFReader(str(path)).fields.get(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS)
    if f is None:
        return None, None
    return [int(f.parts[i][0]) for i in f.data], f.types[-1].name


def _peft(folder: Path, tokens: list[int] | None) -> Path:
    folder.mkdir()
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["v_proj"], "alora_invocation_tokens": tokens}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(1)
    pre = "base_model.model.model.layers.0.self_attn.v_proj"
    a, b = rng.standard_normal((2, 16)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32)
    save_file({f"{pre}.lora_A.weight": a, f"{pre}.lora_B.weight": b}, folder / "adapter_model.safetensors")
    return folder


def test_gguf_alora_is_read_with_a_note_and_written_back(tmp_path: Path) -> None:
    src = _gguf(tmp_path / "a.gguf", TOKENS)
    ad = adapterpack.open(src)
    assert any("aLoRA" in n for n in ad.source["notes"])
    convert(src, tmp_path / "b.gguf")
    assert _gguf_tokens(tmp_path / "b.gguf") == (TOKENS, "UINT32")
    convert(src, tmp_path / "a.apack")  # through an .apack too
    convert(tmp_path / "a.apack", tmp_path / "c.gguf")
    assert _gguf_tokens(tmp_path / "c.gguf") == (TOKENS, "UINT32")


def test_gguf_alora_to_peft_sets_alora_invocation_tokens(tmp_path: Path) -> None:
    from peft import LoraConfig

    convert(_gguf(tmp_path / "a.gguf", TOKENS), tmp_path / "peft", to="peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["alora_invocation_tokens"] == TOKENS
    assert LoraConfig.from_pretrained(str(tmp_path / "peft")).alora_invocation_tokens == TOKENS


def test_peft_alora_to_gguf_writes_the_tokens(tmp_path: Path) -> None:
    convert(_peft(tmp_path / "p", TOKENS), tmp_path / "a.gguf")
    assert _gguf_tokens(tmp_path / "a.gguf") == (TOKENS, "UINT32")


def test_a_plain_lora_gets_no_alora_key(tmp_path: Path) -> None:
    convert(_gguf(tmp_path / "a.gguf", None), tmp_path / "b.gguf")
    convert(_peft(tmp_path / "p", None), tmp_path / "c.gguf")
    assert _gguf_tokens(tmp_path / "b.gguf") == (None, None) == _gguf_tokens(tmp_path / "c.gguf")


@pytest.mark.parametrize(("to", "name"), [("kohya", "k.safetensors"), ("diffusers", "pytorch_lora_weights.safetensors")])
def test_alora_to_a_format_without_invocation_tokens_is_refused(tmp_path: Path, to: str, name: str) -> None:
    extra = {"component": "transformer"} if to == "diffusers" else {}
    for i, src in enumerate((_gguf(tmp_path / "a.gguf", TOKENS), _peft(tmp_path / "p", TOKENS))):
        with pytest.raises(ConversionError, match="aLoRA"):
            convert(src, tmp_path / f"{i}{name}", to=to, **extra)  # type: ignore[arg-type]
        assert not (tmp_path / f"{i}{name}").exists()


def test_merging_an_alora_is_refused(tmp_path: Path) -> None:
    from adapterpack.ops.merge import merge

    base = tmp_path / "base"
    base.mkdir()
    save_file({"model.layers.0.self_attn.v_proj.weight": np.zeros((8, 16), np.float32)}, base / "model.safetensors")
    with pytest.raises(ConversionError, match="aLoRA"):
        merge(_peft(tmp_path / "p", TOKENS), base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tokens", [[], ["x"], [-1], [True], [2**40]])
def test_peft_alora_tokens_of_the_wrong_kind_are_refused(tmp_path: Path, tokens: list[object]) -> None:
    from adapterpack.errors import InputError

    with pytest.raises(InputError, match="alora_invocation_tokens"):
        adapterpack.open(_peft(tmp_path / "p", tokens))  # type: ignore[arg-type]


def test_vllm_export_keeps_the_invocation_tokens(tmp_path: Path) -> None:
    """The vLLM export rebuilds the adapter (scales baked): it stays an activated LoRA."""
    for name, src in (("v1", _peft(tmp_path / "p", TOKENS)), ("v2", _gguf(tmp_path / "a.gguf", TOKENS))):
        convert(src, tmp_path / name, to="peft", serve_for="vllm")
        assert json.loads((tmp_path / name / "adapter_config.json").read_text())["alora_invocation_tokens"] == TOKENS


def test_check_kohya_lists_the_alora_refusal(tmp_path: Path) -> None:
    from adapterpack.formats.serving import check

    ad = adapterpack.open(_peft(tmp_path / "p", TOKENS))
    assert any(f.severity == "refuse" and "aLoRA" in f.problem for f in check(ad, "kohya"))
    assert not any("aLoRA" in f.problem for t in ("peft", "vllm", "llama.cpp") for f in check(ad, t))


def test_peft_alora_is_read_with_a_note(tmp_path: Path) -> None:
    ad = adapterpack.open(_peft(tmp_path / "p", TOKENS))
    assert any("aLoRA" in n for n in ad.source["notes"])
    assert not any("aLoRA" in n for n in adapterpack.open(_peft(tmp_path / "q", None)).source.get("notes", []))


@pytest.mark.parametrize("as_adapter", [False, True])
def test_torch_apply_refuses_an_alora(tmp_path: Path, as_adapter: bool) -> None:
    """apply() patches weights or hooks a forward: it has no notion of invocation tokens, so an aLoRA is refused
    (the model left as it was) rather than applied to every token; the same adapter without tokens applies."""
    torch = pytest.importorskip("torch")
    from adapterpack.errors import ApplyError
    from adapterpack.torch import apply

    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.v_proj = torch.nn.Linear(16, 8, bias=False)

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = Attn()

    class Inner(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer()])

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Inner()

    model = Model()
    before = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    for tokens, folder in ((TOKENS, "alora"), (None, "plain")):
        src = _peft(tmp_path / folder, tokens)
        source = adapterpack.open(src) if as_adapter else src
        if tokens is not None:
            with pytest.raises(ApplyError, match="activated LoRA"):
                apply(model, source)
            assert torch.equal(model.model.layers[0].self_attn.v_proj.weight, before)
        else:
            applied = apply(model, source)
            assert not torch.equal(model.model.layers[0].self_attn.v_proj.weight, before)
            applied.unapply()
            assert torch.equal(model.model.layers[0].self_attn.v_proj.weight, before)
