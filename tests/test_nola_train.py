"""NOLA training in torch: injection by PEFT-style names, ΔW = 0 at the start, only α and β train,
cached and regenerated bases give the same gradients, save → .apack → apply (merged / unmerged) / load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import adapterpack
import adapterpack.torch as apt
from adapterpack import errors
from adapterpack.torch import nola as tn
from tests.test_peft import tiny_llama

TARGETS = ["q_proj", "v_proj"]


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


def _train(model: torch.nn.Module, steps: int = 3, lr: float = 0.05) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        ids = _ids(step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_llama()


def test_inject_starts_at_zero_and_trains_only_coefficients() -> None:
    model = _model()
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layers = tn.inject(model, TARGETS, rank=4, k=32, k_B=16, seed=1)
    assert sorted(layers) == [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS]
    assert [layer.stream for layer in layers.values()] == [0, 1, 2, 3]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # α = β = 0, B0 = 0: ΔW = 0 exactly
    assert tn.trainable_parameters(model) == 4 * (32 + 16)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"alpha", "beta"}
    losses = _train(model, steps=4)
    assert losses[-1] < losses[0]
    assert all(layer.beta.abs().sum() > 0 for layer in layers.values())


def test_regenerated_bases_give_the_cached_gradients() -> None:
    grads = []
    for cache in (True, False):
        model = _model()
        layers = tn.inject(model, TARGETS, rank=2, k=24, seed=3, cache_bases=cache, budget=28 * 2 * 64 * 5)  # chunks of 5 bases
        with torch.no_grad():
            for i, layer in enumerate(layers.values()):
                layer.alpha.copy_(torch.linspace(-1, 1, 24) * (i + 1))
                layer.beta.copy_(torch.linspace(1, -1, 24))
        ids = _ids()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([torch.cat([layer.alpha.grad, layer.beta.grad]) for layer in layers.values()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_layer_factors_equal_the_saved_records_decoded(tmp_path: Path) -> None:
    model = _model()
    layers = tn.inject(model, TARGETS, rank=4, k=16, seed=2)
    _train(model, steps=2)
    path = tmp_path / "nola.apack"
    tn.save(model, path, base_model="test/tiny-llama")
    with adapterpack.open(path) as ad:
        assert ad.base_model == "test/tiny-llama" and list(ad.modules) == list(layers)
        for name, layer in layers.items():
            m = ad.module(name)
            assert m.encoding == "nola" and m.params["k_A"] == 16 and m.num_params == 32
            a, b = layer.factors()
            want = (layer.scale * b.double() @ a.double()).detach().numpy()
            np.testing.assert_allclose(m.delta(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("merge", [True, False])
def test_saved_file_applies_for_inference(tmp_path: Path, merge: bool) -> None:
    model = _model()
    tn.inject(model, TARGETS, rank=4, k=16, seed=4, shared_basis=True)
    _train(model, steps=3)
    ids = _ids(9)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    path = tmp_path / "nola.apack"
    tn.save(model, path)
    fresh = _model()
    with torch.no_grad():
        base = fresh(input_ids=ids).logits
    applied = apt.apply(fresh, path, merge=merge)
    with torch.no_grad():
        got = fresh(input_ids=ids).logits
    torch.testing.assert_close(got, trained, rtol=1e-4, atol=1e-4)
    assert (got - base).abs().max() > 1e-3  # the adapter does something
    applied.unapply()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, base)


def test_load_reinjects_and_merges(tmp_path: Path) -> None:
    model = _model()
    tn.inject(model, TARGETS, rank=4, k=16, seed=5)
    _train(model, steps=2)
    path = tmp_path / "nola.apack"
    tn.save(model, path)
    ids = _ids(7)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    fresh = _model()
    layers = tn.load(fresh, path)
    assert all(layer.alpha.requires_grad for layer in layers.values())
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    tn.merged_from_layers(fresh)
    assert not any(isinstance(m, tn.NolaLinear) for m in fresh.modules())
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_bad_targets_are_refused() -> None:
    model = _model()
    with pytest.raises(errors.ApplyError, match="matches"):
        tn.inject(model, ["nonexistent"])
    with pytest.raises(errors.ApplyError, match=r"nn\.Linear only"):
        tn.inject(model, ["embed_tokens"])
    with pytest.raises(errors.ApplyError, match="no NOLA layers"):
        tn.to_adapter(model)


@pytest.mark.slow
def test_smollm2_trains_saves_and_applies(tmp_path: Path) -> None:
    """SmolLM2-135M, q/v NOLA (rank 8, k = 256, shared basis): the loss falls in 4 steps on pydoc text;
    the saved file (a few KB) applied unmerged to a fresh model reproduces the trained model's logits."""
    from tools.fixtures import smollm2

    torch.manual_seed(0)
    model = smollm2.load_model()
    blocks = smollm2.pydoc_blocks("train")[:16]
    held = smollm2.pydoc_blocks("heldout")[:2]
    layers = tn.inject(model, TARGETS, rank=8, k=256, seed=0, shared_basis=True)
    assert len(layers) == 60 and tn.trainable_parameters(model) == 60 * 512
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for step in range(4):
        ids = blocks[4 * step : 4 * step + 4]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=held).logits
        ids = blocks[:4]
        after = float(model(input_ids=ids, labels=ids).loss)
    assert after < losses[0]
    path = tmp_path / "smollm2-nola.apack"
    result = tn.save(model, path)
    assert result.file_size < 300_000  # 60 × 512 float32 coefficients + index
    fresh = smollm2.load_model()
    apt.apply(fresh, path, merge=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=held).logits, want, rtol=1e-3, atol=1e-3)
