"""adapterpack.torch.apply: outputs equal PEFT's (merged and unmerged, every layout, DoRA), unapply is bit-exact,
bad requests are refused before anything changes; and the real SmolLM2-135M model with the bundled adapter."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import adapterpack
import adapterpack.torch as apt
from adapterpack.errors import ApplyError
from adapterpack.examples import example_path
from adapterpack.torch.apply import apply


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 24)
        self.v_proj = nn.Linear(24, 16, bias=False)


class _Tiny(nn.Module):
    """Embedding, two linear layers per block, and a conv head: every PEFT layout but fan_in_fan_out."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(50, 16, padding_idx=0)
        self.model.layers = nn.ModuleList([_Block(), _Block()])
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model.embed_tokens(ids)
        for blk in self.model.layers:
            h = blk.v_proj(torch.tanh(blk.q_proj(h)))
        return h, self.conv(img)


class _Gpt2ish(nn.Module):
    """GPT-2 style Conv1D layers (weight [in, out]): PEFT's fan_in_fan_out."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_attn = Conv1D(24, 16)
        self.c_proj = Conv1D(16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.tanh(self.c_attn(x)))


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 50, (3, 5), generator=g), torch.randn(2, 3, 6, 6, generator=g)


def _snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, bytes]]:
    """Every parameter: the tensor object behind it and its exact bytes."""
    return {k: (p.data, p.data.detach().contiguous().view(torch.uint8).numpy().tobytes()) for k, p in model.named_parameters()}


def _assert_restored(model: nn.Module, snap: dict[str, tuple[torch.Tensor, bytes]]) -> None:
    now = _snapshot(model)
    assert list(now) == list(snap)
    for k, (t, b) in snap.items():
        assert now[k][1] == b, k  # bit-identical bytes
        assert now[k][0].untyped_storage().data_ptr() == t.untyped_storage().data_ptr(), k  # the very memory it was


def _peft_folder(base: nn.Module, tmp: Path, **cfg: object) -> tuple[Path, nn.Module]:
    """A PEFT adapter with random (non-zero) B made by PEFT itself on a copy of ``base``; (folder, peft model)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **cfg))  # type: ignore[arg-type]
    pm.eval()
    folder = tmp / "peft"
    pm.save_pretrained(folder)
    return folder, pm


def _check_against_peft(base: nn.Module, pm: nn.Module, folder: Path, inputs: tuple[torch.Tensor, ...], atol: float) -> None:
    snap = _snapshot(base)
    with torch.no_grad():
        want = pm(*inputs)
        plain = base(*inputs)
        for merge in (True, False):
            h = apply(base, folder, merge=merge)
            got = base(*inputs)
            assert any(not torch.equal(w, p) for w, p in zip(_tuple(want), _tuple(plain), strict=True))  # the adapter matters
            for g, w in zip(_tuple(got), _tuple(want), strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=atol)
            h.unapply()
            _assert_restored(base, snap)
            for g, p in zip(_tuple(base(*inputs)), _tuple(plain), strict=True):
                assert torch.equal(g, p)


def _tuple(x: object) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)  # type: ignore[return-value]


def test_every_layout_matches_peft(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = _Tiny().eval()
    folder, pm = _peft_folder(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens", "conv"])
    ad = adapterpack.open(folder)
    assert {m.params["layout"] for m in ad} == {"linear", "embedding", "conv"}
    _check_against_peft(base, pm, folder, _inputs(), atol=1e-5)


def test_rslora_and_scale(tmp_path: Path) -> None:
    torch.manual_seed(1)
    base = _Tiny().eval()
    folder, pm = _peft_folder(base, tmp_path, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])
    _check_against_peft(base, pm, folder, _inputs(), atol=1e-5)
    # scale=0.5 halves the update: merged weight = W + 0.5·s·ΔW
    q = base.model.layers[0].q_proj
    w0 = q.weight.detach().clone()
    delta = torch.from_numpy(adapterpack.open(folder).delta("model.layers.0.q_proj"))
    h = apply(base, folder, scale=0.5)
    torch.testing.assert_close(q.weight.detach(), w0 + 0.5 * delta, rtol=0, atol=1e-6)
    h.unapply()


def test_fan_in_fan_out_matches_peft(tmp_path: Path) -> None:
    torch.manual_seed(2)
    base = _Gpt2ish().eval()
    folder, pm = _peft_folder(base, tmp_path, r=4, lora_alpha=4, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"])
    assert all(m.params["fan_in_fan_out"] for m in adapterpack.open(folder))
    _check_against_peft(base, pm, folder, (torch.randn(3, 4, 16),), atol=1e-5)


def test_dora_matches_peft_merged_and_unmerged(tmp_path: Path) -> None:
    torch.manual_seed(4)
    base = _Tiny().eval()
    folder, pm = _peft_folder(base, tmp_path, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])
    assert all(m.params["dora"] for m in adapterpack.open(folder))
    _check_against_peft(base, pm, folder, _inputs(), atol=1e-5)


def test_refusals_leave_the_model_unchanged(tmp_path: Path) -> None:
    torch.manual_seed(5)
    base = _Tiny().eval()
    folder, _ = _peft_folder(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    snap = _snapshot(base)
    hooks = sum(len(m._forward_hooks) for m in base.modules())

    other = _Tiny()
    del other.model.layers[1]  # layer 1's modules are missing
    with pytest.raises(ApplyError, match=r"2 module\(s\) of the adapter are not in the model: model.layers.1"):
        apply(other, folder)
    wrong = _Tiny()
    wrong.model.layers[1].v_proj = nn.Linear(24, 17, bias=False)  # shape differs, and it is the last module
    snap_w = _snapshot(wrong)
    for merge in (True, False):
        with pytest.raises(ApplyError, match=r"model.layers.1.v_proj.*\[17, 24\] differs from the adapter's \[16, 24\]"):
            apply(wrong, folder, merge=merge)
    _assert_restored(wrong, snap_w)
    assert sum(len(m._forward_hooks) for m in wrong.modules()) == 0
    full = adapterpack.open(folder)
    full.tensors["base_model.model.conv.weight"] = full.modules["model.layers.0.q_proj"].array("A")
    path = tmp_path / "full.apack"
    adapterpack.save(full, path)
    for src in (full, path):
        with pytest.raises(ApplyError, match="modules_to_save"):
            apply(base, src)
    kind = _Tiny()
    kind.model.layers[0].q_proj = nn.Conv1d(16, 24, 1)
    with pytest.raises(ApplyError, match="is a Conv1d; a linear record needs linear"):
        apply(kind, folder)
    _assert_restored(base, snap)
    assert sum(len(m._forward_hooks) for m in base.modules()) == hooks


def test_unapply_order_and_twice(tmp_path: Path) -> None:
    torch.manual_seed(6)
    base = _Tiny().eval()
    folder, _ = _peft_folder(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    snap = _snapshot(base)
    first = apply(base, folder)
    second = apply(base, folder, merge=False)
    with pytest.raises(ApplyError, match="last in, first out"):
        first.unapply()
    second.unapply()
    first.unapply()
    with pytest.raises(ApplyError, match="already unapplied"):
        first.unapply()
    _assert_restored(base, snap)


def test_peft_prefixed_module_names_match(tmp_path: Path) -> None:
    """A model whose modules carry PEFT's base_model.model. prefix takes the adapter by its base names."""
    torch.manual_seed(8)
    inner = _Tiny().eval()
    folder, _ = _peft_folder(inner, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    wrapper = nn.Module()
    wrapper.base_model = nn.Module()
    wrapper.base_model.model = inner
    h = apply(wrapper, folder)
    assert h.modules == ["model.layers.0.q_proj", "model.layers.1.q_proj"]
    h.unapply()


def test_apply_from_apack_and_loaded_tensors(tmp_path: Path) -> None:
    torch.manual_seed(9)
    base = _Tiny().eval()
    folder, pm = _peft_folder(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    path = tmp_path / "a.apack"
    adapterpack.save(adapterpack.open(folder), path, codec="byteplanes")
    ids, img = _inputs()
    with torch.no_grad():
        want = pm(ids, img)[0]
        for src in (path, apt.load(path), adapterpack.open(path)):
            h = apply(base, src)
            torch.testing.assert_close(base(ids, img)[0], want, rtol=1e-5, atol=1e-5)
            h.unapply()


@pytest.mark.slow
def test_smollm2_logits_equal_peft_and_unapply_is_bit_exact(tmp_path: Path) -> None:
    from peft import PeftModel

    from tools.fixtures import smollm2

    model = smollm2.load_model()
    tok = smollm2.load_tokenizer()
    ids = tok(["def f(x):\n    return sorted(x, key=len)", "The with statement wraps a block"], return_tensors="pt", padding=True)
    folder = example_path()
    path = tmp_path / "ex.apack"
    adapterpack.save(adapterpack.open(folder), path, codec="raw")
    snap = _snapshot(model)
    with torch.no_grad():
        base_logits = model(**ids).logits
        got = {}
        for merge in (True, False):
            h = apply(model, path, merge=merge)
            assert len(h.patches) == 120
            got[merge] = model(**ids).logits
            h.unapply()
            _assert_restored(model, snap)
        assert torch.equal(model(**ids).logits, base_logits)
        pm = PeftModel.from_pretrained(model, folder).eval()  # wraps the same model: done last
        want = pm(**ids).logits
    scale = want.abs().max().item()
    assert (want - base_logits).abs().max().item() > 1e-2 * scale  # the adapter matters
    for merge, logits in got.items():
        err = (logits - want).abs().max().item()
        assert err <= 1e-4 * scale, (merge, err, scale)
