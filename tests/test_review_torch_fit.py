"""Review (round 2): the Fisher measurement on the real SmolLM2-135M refuses calibration batches the model cannot
take with a ConversionError (torch's IndexError / dtype error from inside the model before), and leaves the model
bit-exact; the torch Philox known-answer check fails with an adapterpack error."""

from __future__ import annotations

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
