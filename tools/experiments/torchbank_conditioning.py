"""TorchBank on an ill-conditioned diagonal bank: ΔW errors with the bases as stored and re-factored at load.

Builds a diagonal bank of the four fixture LoRAs (``tests/data/bank_loras.apack``, lora00–lora03) at ``--rank``
(64: the fit holds nearly collinear bases), then for float32 and bfloat16 serves it through
:class:`adapterpack.torch.bank.TorchBank` twice: with its re-factoring switched off (``REFACTOR_COND`` infinite:
the bases as stored) and on (the default). Prints the worst relative error over 2 modules × 4 members of
``materialize`` (dense ΔW) and of ``delta(x)`` against the member's float64 ΔW. Run from the repository root::

    python -m tools.experiments.torchbank_conditioning --rank 64
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

import adapterpack
from adapterpack.bank import build_bank
from adapterpack.container.writer import write_apack
from adapterpack.formats import open_adapters
from adapterpack.torch import bank as tbank

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "bank_loras.apack"
NAMES = ["lora00", "lora01", "lora02", "lora03"]
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def worst_errors(bank: Path, dtype: torch.dtype) -> tuple[float, float]:
    """(materialize, delta) worst relative errors against each member's float64 ΔW."""
    x = torch.randn(1, 3, 576, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dense, applied = 0.0, 0.0
    with tbank.TorchBank(bank, dtype=dtype) as tb:
        tb.use(NAMES)
        for module in MODULES:
            for i, name in enumerate(NAMES):
                with adapterpack.open(bank, adapter=name) as a:
                    ref = a.module(module).delta().astype(np.float64)
                got = tb.materialize(name, module).double().numpy()
                dense = max(dense, float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))
                y = tb.delta(module, x.to(dtype), torch.tensor([i])).double().numpy()[0]
                want = x[0].numpy() @ ref.T
                applied = max(applied, float(np.linalg.norm(y - want) / np.linalg.norm(want)))
    return dense, applied


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=64)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        src, bank = Path(tmp) / "src.apack", Path(tmp) / "bank.apack"
        with open_adapters(DATA) as opened:
            write_apack(src, [a for a in opened.adapters if a.name in NAMES])
        build_bank(bank, [src], rank=args.rank, form="diagonal")
        with adapterpack.open(bank, adapter=NAMES[0]) as a:
            m = a.module(MODULES[0])
            conds = [np.linalg.cond(np.asarray(m.array(s), np.float64)) for s in ("U", "V")]
        print(f"diagonal bank, rank {args.rank}: condition numbers of U and V on {MODULES[0]}: {conds[0]:.2g}, {conds[1]:.2g}")
        print("| dtype | bases as stored: materialize / delta | re-factored at load: materialize / delta |")
        print("|---|---|---|")
        default = tbank.REFACTOR_COND
        for dtype in (torch.float32, torch.bfloat16):
            tbank.REFACTOR_COND = math.inf
            try:
                before = worst_errors(bank, dtype)
            finally:
                tbank.REFACTOR_COND = default
            after = worst_errors(bank, dtype)
            print(f"| {str(dtype).removeprefix('torch.')} | {before[0]:.2g} / {before[1]:.2g} | {after[0]:.2g} / {after[1]:.2g} |")


if __name__ == "__main__":
    main()
