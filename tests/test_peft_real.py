"""The bundled SmolLM2 adapter through PEFT → .apack → PEFT gives PEFT the very same model (slow)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import adapterpack
from adapterpack.formats.peft import write_peft

EXAMPLE = Path(__file__).resolve().parent.parent / "adapterpack" / "examples" / "smollm2-pydoc-lora"
N_BLOCKS = 4


def adapted_logits(folder: Path, blocks: torch.Tensor) -> torch.Tensor:
    """Logits of a fresh base model with the PEFT adapter in ``folder`` (PeftModel patches in place)."""
    from peft import PeftModel

    from tools.fixtures import smollm2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(smollm2.load_model(), folder).eval()
    with torch.no_grad():
        return model(input_ids=blocks).logits


@pytest.mark.slow
def test_roundtrip_gives_identical_logits(tmp_path: Path) -> None:
    from tools.fixtures import smollm2

    blocks = smollm2.pydoc_blocks("heldout")[:N_BLOCKS]
    res = adapterpack.save(adapterpack.open(EXAMPLE), tmp_path / "ex.apack", codec="byteplanes")
    assert res.file_size < (EXAMPLE / "adapter_model.safetensors").stat().st_size
    with adapterpack.open(tmp_path / "ex.apack") as ad:
        folder = write_peft(ad, tmp_path / "peft")
    original = adapted_logits(EXAMPLE, blocks)
    roundtrip = adapted_logits(folder, blocks)
    assert torch.equal(original, roundtrip)
    with torch.no_grad():
        base = smollm2.load_model()(input_ids=blocks).logits
    assert not torch.equal(original, base)  # the adapter is applied at all
