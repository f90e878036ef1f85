"""Review (round 2): the Fisher measurement on the real SmolLM2-135M refuses calibration batches the model cannot
take with a ConversionError (torch's IndexError / dtype error from inside the model before), and leaves the model
bit-exact; the torch Philox known-answer check fails with an adapterpack error."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import adapterpack  # noqa: E402
from adapterpack.errors import ConversionError, GeneratorError  # noqa: E402
from adapterpack.examples import example_path  # noqa: E402
from adapterpack.torch import rng as torch_rng  # noqa: E402
from adapterpack.torch.fit.fisher import component_fisher  # noqa: E402


@pytest.fixture(scope="module")
def smollm2() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from tools.fixtures.smollm2 import model_dir

    return AutoModelForCausalLM.from_pretrained(model_dir(), local_files_only=True, dtype=torch.float32).eval()


@pytest.mark.slow
def test_calibration_batches_the_model_cannot_take_are_refused(smollm2: torch.nn.Module) -> None:
    ad = adapterpack.open(example_path())
    before = {k: v.clone() for k, v in smollm2.state_dict().items()}
    vocab = smollm2.get_input_embeddings().num_embeddings
    bad = [
        (torch.tensor([[1, 2, vocab, 3]]), "token ids must be in"),
        (torch.tensor([[1, -2, 3]]), "token ids must be in"),
        (torch.rand(1, 4) * 100, "integer token ids"),
        (torch.tensor([[1]]), "tokens >= 2"),
    ]
    for ids, match in bad:
        with pytest.raises(ConversionError, match=match):
            component_fisher(smollm2, ad, [torch.tensor([[5, 6, 7]]), ids])  # the bad batch comes second
    after = smollm2.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    imp = component_fisher(smollm2, ad, [torch.tensor([[5, 6, 7, 8]])])
    assert set(imp.fisher) == set(ad.modules) and any(f.any() for f in imp.fisher.values())


def test_a_failed_known_answer_check_is_a_generator_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_rng, "_VERIFIED", set())
    monkeypatch.setattr(torch_rng, "KAT", [((0, 0, 0, 0), (0, 0), (1, 2, 3, 4))])
    with pytest.raises(GeneratorError, match="known-answer"):
        torch_rng.verify_device(torch.device("cpu"))


def test_compare_on_no_blocks_is_a_conversion_error() -> None:
    """Before: ZeroDivisionError (KL per token over 0 tokens); the model is never run."""
    from adapterpack.adapter import Adapter
    from adapterpack.torch.fit.compare import compare_on_model

    for blocks in (torch.zeros((0, 8), dtype=torch.long), torch.zeros((2, 0), dtype=torch.long)):
        with pytest.raises(ConversionError, match="blocks must be"):
            compare_on_model(torch.nn.Linear(1, 1), Adapter(), Adapter(), blocks)


class _Two(torch.nn.Module):
    def __init__(self, second: tuple[int, int] = (6, 6)) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 6)
        self.b = torch.nn.Linear(second[1], second[0])


def _nola_file(tmp_path: Path, **record: object) -> Path:
    from adapterpack.torch.fit import nola as fit_nola

    model = _Two()
    fit_nola.inject(model, ["a", "b"], rank=2, k=4, seed=1)
    with torch.no_grad():
        for layer in fit_nola._layers(model).values():
            layer.alpha.uniform_(-1, 1)
            layer.beta.uniform_(-1, 1)
    ad = fit_nola.to_adapter(model)
    ad.modules["b"].params.update(record)
    path = tmp_path / f"n{len(list(tmp_path.iterdir()))}.apack"
    adapterpack.save(ad, path)
    return path


def test_nola_load_checks_every_record_before_changing_the_model(tmp_path: Path) -> None:
    """Before: "a" was already a NolaLinear when "b"'s shape mismatch (or fan_in_fan_out) was refused; a square
    fan_in_fan_out record was loaded with ΔWᵀ silently."""
    from adapterpack.errors import ApplyError
    from adapterpack.torch.fit import nola as fit_nola

    path = _nola_file(tmp_path)
    model = _Two(second=(6, 5))
    with pytest.raises(ApplyError, match="'b'"):
        fit_nola.load(model, path)
    assert type(model.a) is torch.nn.Linear and type(model.b) is torch.nn.Linear
    fifo = _nola_file(tmp_path, fan_in_fan_out=True)
    model = _Two()
    with pytest.raises(ApplyError, match="fan_in_fan_out"):
        fit_nola.load(model, fifo)
    assert type(model.a) is torch.nn.Linear and type(model.b) is torch.nn.Linear
    assert set(fit_nola.load(model, path)) == {"a", "b"}


def test_nola_inject_refuses_bad_sizes_before_freezing_anything() -> None:
    """Before: rank 0 froze every parameter, then failed with ZeroDivisionError; rank 7 > 6 was injected (and refused
    only when saving)."""
    from adapterpack.errors import ApplyError
    from adapterpack.torch.fit import nola as fit_nola

    for kw, match in (({"rank": 0}, "rank must be"), ({"rank": 7}, "exceeds"), ({"k": -1}, "k must be")):
        model = _Two()
        with pytest.raises(ApplyError, match=match):
            fit_nola.inject(model, ["a", "b"], **kw)
        assert all(p.requires_grad for p in model.parameters())
        assert type(model.a) is torch.nn.Linear
