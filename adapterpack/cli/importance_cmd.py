"""``adapterpack importance ADAPTER MODEL OUT --text FILE``: measure what each singular component is worth.

Presentation only: :func:`adapterpack.torch.fit.fisher.causal_lm_importance` measures (torch and
transformers are imported when the command runs, never at CLI start-up); ``rerank --importance OUT``
uses the file.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from adapterpack.cli import output as out
from adapterpack.errors import InputError, OutputExistsError
from adapterpack.ops.files import open as open_adapter
from adapterpack.ops.importance import LABELS


@click.command("importance", short_help="Measure each singular component's Fisher information (for rerank --importance).")
@click.argument("adapter_path", metavar="ADAPTER", type=click.Path(exists=True, path_type=Path))
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="UTF-8 calibration text (representative of what the adapter will see).")
@click.option(
    "--blocks", type=click.IntRange(min=1), default=256, show_default=True,
    help="Blocks of text to use (evenly spaced; fewer make a noisier estimate).",
)  # fmt: skip
@click.option("--block-tokens", type=click.IntRange(min=2), default=128, show_default=True, help="Tokens per block.")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True, help="Blocks per forward/backward pass.")
@click.option("--labels", type=click.Choice(LABELS), default="sample", show_default=True,
              help="Next tokens drawn from the adapted model (Fisher of the KL re-ranking costs) or the text's own.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled labels.")
@click.option("--device", default="cpu", show_default=True, help="torch device for the model.")
@click.option("--adapter", "adapter_name", metavar="NAME", help="Which adapter of a multi-adapter .apack file.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@out.progress_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def importance(
    adapter_path: Path,
    model: Path,
    dst: Path,
    text_file: Path,
    blocks: int,
    block_tokens: int,
    batch: int,
    labels: str,
    seed: int,
    device: str,
    adapter_name: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Measure, on MODEL (a local Hugging Face causal-LM folder) and calibration text, the Fisher
    information of every singular component of ADAPTER's modules, and write it to OUT.

    `adapterpack rerank ADAPTER DST --budget B --importance OUT` then spends the bytes where cutting
    would cost the model the most (second-order KL), instead of where ΔW has the most energy.
    """
    from adapterpack.torch.fit.fisher import causal_lm_importance  # torch, transformers (the peft extra): only when it runs

    if dst.exists() and not force:
        raise OutputExistsError(f"{dst} exists (pass --force to overwrite)")
    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{text_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    start = time.perf_counter()
    heads = model if (model / "config.json").is_file() else None  # a GGUF adapter's q/k row order, as merge reads it
    with open_adapter(adapter_path, adapter=adapter_name, base=heads) as ad:
        imp = causal_lm_importance(
            ad, model, text, blocks=blocks, block_tokens=block_tokens,
            batch=batch, labels=labels, seed=seed, device=device,
        )  # fmt: skip
    imp.save(dst, overwrite=force)
    summary = {"src": str(adapter_path), "dst": str(dst), "modules": len(imp.fisher), "seconds": time.perf_counter() - start,
               **imp.info}  # fmt: skip
    if as_json:
        out.echo_json(summary)
    else:
        out.echo_lines([
            f"wrote    {dst} ({summary['modules']} modules)",
            f"from     {imp.info['sequences']} blocks, {imp.info['tokens']} tokens, labels {labels}, in {summary['seconds']:.1f} s",
            f"use      adapterpack rerank {adapter_path} DST --budget BYTES --importance {dst}",
        ])  # fmt: skip
