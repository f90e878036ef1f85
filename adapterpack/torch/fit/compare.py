"""KL and top-1 agreement of two adapters on a causal LM over held-out text (what ``adapterpack diff
--base MODEL --text FILE`` reports): the measurement the compression experiments in tools/ make by hand.

Each batch of text blocks runs through the model with A merged, then with B merged (the model is restored
bit-exactly in between, :func:`adapterpack.torch.apply`); per next-token position, KL(p_A ‖ p_B) in nats
and whether the two most likely tokens agree. Float64 log-softmax, so a tiny KL is not float32 noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adapterpack import progress
from adapterpack.adapter import Adapter
from adapterpack.errors import ConversionError
from adapterpack.torch.apply import apply
from adapterpack.torch.fit.fisher import load_causal_lm, text_blocks


def _logits(model: torch.nn.Module, adapter: Adapter, ids: torch.Tensor) -> torch.Tensor:
    h = apply(model, adapter, merge=True)
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits.to(torch.float64)
    finally:
        h.unapply()


def compare_on_model(
    model: torch.nn.Module, a: Adapter, b: Adapter, blocks: torch.Tensor, *, batch: int = 4
) -> dict[str, Any]:
    """Mean KL(A ‖ B) per token (nats), its largest per-block mean, and top-1 agreement, over ``blocks`` ([n, t] ids)."""
    if batch < 1:
        raise ConversionError(f"batch must be >= 1, got {batch}")
    if not isinstance(blocks, torch.Tensor) or blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] == 0:
        raise ConversionError(f"blocks must be token ids [n >= 1, t >= 1], got {list(getattr(blocks, 'shape', []))}")
    kl_sum, agree, tokens, worst = 0.0, 0, 0, 0.0
    with progress.task("comparing on text", total=int(blocks.shape[0]), unit="blocks") as bar:
        for i in range(0, blocks.shape[0], batch):
            ids = blocks[i : i + batch]
            la, lb = _logits(model, a, ids), _logits(model, b, ids)
            pa, pb = torch.log_softmax(la, -1), torch.log_softmax(lb, -1)
            kl = (pa.exp() * (pa - pb)).sum(-1)  # [b, t]
            kl_sum += float(kl.sum())
            worst = max(worst, float(kl.mean(-1).max()))
            agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
            tokens += kl.numel()
            bar.advance(ids.shape[0], note=f"KL {kl_sum / tokens:.3g}")
    return {"tokens": tokens, "blocks": int(blocks.shape[0]), "kl": kl_sum / tokens, "kl_worst_block": worst,
            "top1_agreement": agree / tokens}  # fmt: skip


def compare_causal_lm(
    a: Adapter, b: Adapter, model_dir: str | Path, text: str, *, blocks: int = 64, block_tokens: int = 128,
    batch: int = 4, device: str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """:func:`compare_on_model` on a local Hugging Face causal LM folder (nothing is downloaded) over ``blocks``
    evenly spaced blocks of ``text``."""
    folder = Path(model_dir)
    tok, model = load_causal_lm(folder, device, "diff on a model")
    ids = text_blocks(tok(text)["input_ids"], blocks, block_tokens).to(torch.device(device))
    return compare_on_model(model, a, b, ids, batch=batch) | {"base": str(folder), "block_tokens": block_tokens}


__all__ = ["compare_causal_lm", "compare_on_model"]
