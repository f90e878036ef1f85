"""Review (round 2): apply()/unapply() against the dense ΔW applied by hand — records naming one module twice, tied
weights, convolutions with a padding mode, rank= with loaded factors, an error midway leaves nothing patched."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import adapterpack.torch as apt  # noqa: E402
from adapterpack.adapter import Adapter, Module  # noqa: E402
from adapterpack.errors import ApplyError, ConversionError  # noqa: E402
from adapterpack.torch.apply import apply  # noqa: E402

apply_mod = importlib.import_module("adapterpack.torch.apply")  # the package's `apply` attribute is the function


def _f32(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, *shape]).standard_normal(shape).astype(np.float32)


def _lora(name: str, out: int, inp: int, r: int = 2, seed: int = 0, **params: object) -> Module:
    tensors = {"A": _f32(r, inp, seed=seed), "B": _f32(out, r, seed=seed)}
    return Module(name, "lora", (out, inp), {"rank": r, "alpha": 2.0 * r, **params}, tensors)


def _adapter(*mods: Module) -> Adapter:
    return Adapter(modules={m.name: m for m in mods})


def _bytes(model: nn.Module) -> dict[str, bytes]:
    return {k: p.detach().contiguous().view(torch.uint8).numpy().tobytes() for k, p in model.named_parameters()}


class _One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class _Tied(nn.Module):
    """An LM head tied to the input embedding (SmolLM2, GPT-2, LLaMA-small do this)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


@pytest.mark.parametrize("merge", [True, False])
def test_two_records_resolving_to_one_module_are_refused(merge: bool) -> None:
    """Before: merged, the second record's weight was computed from the original and replaced the first's (ΔW₁ lost);
    unmerged, both were added: the two modes disagreed by 3.2 on this model."""
    torch.manual_seed(0)
    model = _One()
    before = _bytes(model)
    ad = _adapter(_lora("lin", 3, 4), _lora("base_model.model.lin", 3, 4, seed=1))
    with pytest.raises(ApplyError, match="are the same module"):
        apply(model, ad, merge=merge)
    assert _bytes(model) == before and not model.lin._forward_hooks


def test_merging_into_a_tied_weight_is_refused_and_hooks_equal_the_dense_delta() -> None:
    """Before: merging into lm_head changed the tied input embedding too (outputs off by 21 against merge=False)."""
    torch.manual_seed(0)
    model = _Tied()
    ids = torch.tensor([[1, 2, 3]])
    before = _bytes(model)
    ad = _adapter(_lora("head", 10, 4))
    with pytest.raises(ApplyError, match="tied to 'emb'"):
        apply(model, ad, merge=True)
    assert _bytes(model) == before
    with torch.no_grad():
        h = apply(model, ad, merge=False)
        got = model(ids)
        h.unapply()
        delta = torch.from_numpy(ad.modules["head"].delta())
        want = model.emb(ids) @ (model.head.weight + delta).T  # only the head changes
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert _bytes(model) == before


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_unmerged_conv_with_a_padding_mode_equals_the_dense_delta(mode: str) -> None:
    """Before: the hook raised ApplyError on the first forward (after apply had returned, hooks in place)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode)
    model = nn.Sequential()
    model.add_module("conv", conv)
    m = Module("conv", "lora", (3, 2, 3, 3), {"rank": 2, "alpha": 2.0, "layout": "conv"},
               {"A": _f32(2, 2, 3, 3), "B": _f32(3, 2, 1, 1)})
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        ref = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode)
        ref.load_state_dict(conv.state_dict())
        ref.weight += torch.from_numpy(m.delta())
        want = ref(x)
        for merge in (True, False):
            h = apply(model, _adapter(m), merge=merge)
            torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
            h.unapply()


def test_rank_with_loaded_factors_is_refused_not_ignored() -> None:
    """Before: apply(model, apt.load(...), rank=1) applied the full rank-3 factors, rank silently ignored."""
    model = _One()
    loaded = apt.load(_adapter(_lora("lin", 3, 4, r=3)))
    with pytest.raises(ConversionError, match="rank="):
        apply(model, loaded, rank=1)


@pytest.mark.parametrize("merge", [True, False])
def test_an_error_midway_leaves_nothing_patched(merge: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error while patching the second module: the first is put back (weights bit-exact, no hook left)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 4))
    before = _bytes(model)
    ad = _adapter(_lora("0", 3, 4), _lora("1", 4, 3))
    calls = {"n": 0}
    if merge:
        real = apply_mod._merged_weight

        def boom(p: object, scale: float) -> torch.Tensor:
            calls["n"] += 1
            if calls["n"] == 2:
                raise MemoryError("injected")
            return real(p, scale)  # type: ignore[arg-type]

        monkeypatch.setattr(apply_mod, "_merged_weight", boom)
    else:
        real_reg = nn.Module.register_forward_hook

        def reg(self: nn.Module, hook: object, *a: object, **k: object) -> object:
            calls["n"] += 1
            if calls["n"] == 2:
                raise MemoryError("injected")
            return real_reg(self, hook, *a, **k)  # type: ignore[arg-type]

        monkeypatch.setattr(nn.Module, "register_forward_hook", reg)
    with pytest.raises(MemoryError):
        apply(model, ad, merge=merge)
    monkeypatch.undo()
    assert _bytes(model) == before
    assert not any(m._forward_hooks for m in model.modules())
    h = apply(model, ad, merge=merge)  # and the model takes the adapter afterwards
    h.unapply()
    assert _bytes(model) == before


def test_a_model_cast_after_apply_unapplies_to_the_cast_original_and_hooks_follow_it() -> None:
    """Before: unapply after ``model.half()`` put the float32 original back into the half model (a mixed model),
    and hooks kept their float32 factors (torch's dtype RuntimeError on the next forward). A move to another device
    (``model.to("cuda")``) takes the same path; only the dtype is exercised here (no GPU in CI)."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    model = nn.Sequential(emb, nn.Linear(4, 3))
    x = torch.tensor([[1, 2, 3]])
    mods = [Module("0", "lora", (10, 4), {"rank": 2, "alpha": 2.0, "layout": "embedding"}, {"A": _f32(2, 10), "B": _f32(4, 2)}),
            _lora("1", 3, 4)]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    h = apply(model, _adapter(*mods))
    model.double()
    h.unapply()
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float64 and torch.equal(v, original[k].double()), k
    with torch.no_grad():
        h = apply(model, _adapter(*mods), merge=False)
        model.float()
        got = model(x)
        h.unapply()
        ref = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
        ref.load_state_dict(original)
        ref[0].weight += torch.from_numpy(mods[0].delta())
        ref[1].weight += torch.from_numpy(mods[1].delta())
        torch.testing.assert_close(got, ref(x), rtol=1e-5, atol=1e-5)


def test_factors_that_disagree_are_refused_before_anything_changes() -> None:
    """Loaded factors edited by hand (or built by a caller) whose A and B do not fit: an ApplyError, not torch's reshape
    or matmul RuntimeError; 2-D conv factors (a decoder's output) work unmerged too."""
    model = _One()
    before = _bytes(model)
    good = apt.load(_adapter(_lora("lin", 3, 4, r=2)))["lin"]
    for a, b in ((good.A[:1], good.B), (good.A, good.B[:, :1]), (good.A[:, :3], good.B)):
        bad = type(good)(a, b, good.scale, good.base_shape, good.transpose, good.layout)
        for merge in (True, False):
            with pytest.raises(ApplyError, match="module 'lin'"):
                apply(model, {"lin": bad}, merge=merge)
            with pytest.raises(ConversionError):
                apt.materialize(bad)
    assert _bytes(model) == before and not model.lin._forward_hooks
    conv = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1))
    m = Module("0", "lora", (3, 2, 3), {"rank": 2, "alpha": 2.0, "layout": "conv"}, {"A": _f32(2, 2, 3), "B": _f32(3, 2, 1)})
    f = apt.load(_adapter(m))["0"]
    flat = type(f)(f.A.reshape(2, 6), f.B.reshape(3, 2), f.scale, f.base_shape, f.transpose, f.layout)
    x = torch.randn(1, 2, 7)
    with torch.no_grad():
        outs = []
        for merge in (True, False):
            h = apply(conv, {"0": flat}, merge=merge)
            outs.append(conv(x))
            h.unapply()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_materialize_refuses_a_delta_over_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Module.delta refuses a ΔW over MAX_DELTA_ELEMENTS before allocating; materialize allocated it (a 512 KiB pair of
    rank-1 factors on a 65536² weight asks for 16 GiB). The limit is lowered here so the old code does not allocate."""
    from adapterpack.errors import SizeLimitError

    monkeypatch.setattr("adapterpack.torch.tensors.MAX_DELTA_ELEMENTS", 100, raising=False)
    f = apt.load(_adapter(_lora("lin", 11, 10, r=1)))["lin"]
    with pytest.raises(SizeLimitError, match="over the limit"):
        apt.materialize(f)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "x"])
def test_a_scale_that_is_not_a_finite_number_is_refused(scale: object) -> None:
    """Before: NaN/inf scale merged NaN/inf into every weight silently; a string failed in torch's multiply."""
    model = _One()
    before = _bytes(model)
    for merge in (True, False):
        with pytest.raises(ApplyError, match="scale must be"):
            apply(model, _adapter(_lora("lin", 3, 4)), scale=scale, merge=merge)  # type: ignore[arg-type]
    assert _bytes(model) == before


def test_unapply_order_holds_between_a_submodule_and_the_whole_model() -> None:
    """Before: the last-in-first-out order was kept per model object, so applying to ``model.block`` and then to
    ``model`` and undoing the first one first was allowed: the weight ended as W0 + ΔW₁ for good."""
    torch.manual_seed(0)
    model = nn.Module()
    model.block = _One()
    before = _bytes(model)
    first = apply(model.block, _adapter(_lora("lin", 3, 4)))
    second = apply(model, _adapter(_lora("block.lin", 3, 4, seed=1)))
    with pytest.raises(ApplyError, match="last in, first out"):
        first.unapply()
    second.unapply()
    first.unapply()
    assert _bytes(model) == before
    other = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 4))  # adapters on different modules: any order
    snap = _bytes(other)
    h0, h1 = apply(other, _adapter(_lora("0", 3, 4))), apply(other, _adapter(_lora("1", 4, 3)))
    h0.unapply()
    h1.unapply()
    assert _bytes(other) == snap
