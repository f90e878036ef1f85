"""``adapterpack convert SRC DST``: any format to any format (convert.py does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterpack.cli import output as out
from adapterpack.codecs import codec_ids
from adapterpack.ops.convert import DTYPE_CHOICES, TARGETS, infer_target, target_conflict
from adapterpack.ops.convert import convert as run

#: Printed after writing a compressed .apack: how to get the fastest loading instead.
RAW_HINT = "hint     --codec raw gives zero-copy mmap loading (adapterpack.torch.load) for serving; compressed blobs decode on load"


def cast_lines(c: dict[str, Any]) -> list[str]:
    """What a dtype cast cost one adapter."""
    worst = f" (worst module {c['worst_module']}: {out.sci(c['worst_module_rel_error'])})" if c["worst_module"] else ""
    return [
        f"cast     {c['adapter']!r} to {c['dtype']}: {c['tensors_cast']} tensors, max |value change| {out.sci(c['max_abs_error'])}",
        f"         relative Frobenius error of ΔW {out.sci(c['delta_rel_error'])}{worst}",
    ]


def result_lines(r: dict[str, Any]) -> list[str]:
    """Summary of a :class:`~adapterpack.ops.convert.ConvertResult` (as_dict form)."""
    how = f", {r['codec']}" + (f" level {r['level']}" if r["level"] is not None else "") if r["codec"] else ""
    lines = [
        f"wrote    {r['dst']} ({r['dst_format']}{how}) from {r['src']} ({r['src_format']}) in {r['seconds']:.2f} s",
        f"size     {out.size(r['src_bytes'])} -> {out.size(r['dst_bytes'])}, ratio {out.ratio(r['ratio'])}",
    ]
    for c in r["casts"]:
        lines += cast_lines(c)
    lines += [f"note     {n}" for n in r["notes"]]
    lines += [f"skipped  {s}" for s in r["skipped"]]
    if r["codec"] not in (None, "raw"):
        lines.append(RAW_HINT)
    return lines


@click.command("convert", short_help="Convert between .apack, PEFT, kohya, diffusers and gguf.")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option(
    "--to",
    "to",
    type=click.Choice(TARGETS),
    help="Output format (default: from DST: .apack, pytorch_lora_weights.safetensors = diffusers, other .safetensors = kohya, "
    ".gguf, else a PEFT folder).",
)
@click.option("--codec", type=click.Choice(codec_ids()), help="Blob codec for .apack output (default byteplanes).")
@click.option("--level", type=click.IntRange(1, 22), help="Zstandard level (default: 1 for byteplanes, 3 for zstd).")
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_CHOICES),
    default="keep",
    show_default=True,
    help="Cast float tensors (lossy when narrowing).",
)
@click.option(
    "--rank",
    type=click.IntRange(min=0),
    help="Cap every module at this rank: a prefix of svd records, an exact SVD truncation of others (lossy).",
)
@click.option("--adapter", "adapter_name", metavar="NAME", help="Only this adapter of a multi-adapter .apack file.")
@click.option(
    "--drop-tensors",
    is_flag=True,
    help="PEFT/kohya output: leave out pass-through tensors (e.g. PEFT modules_to_save) the output format cannot carry.",
)
@click.option(
    "--target",
    "serve_for",
    type=click.Choice(["vllm"]),
    help="PEFT output shaped for a serving stack: vllm = one allowed rank (zero-padded), per-module scales baked into B.",
)
@click.option(
    "--max-lora-rank", type=click.IntRange(1), help="--target vllm: the server's --max-lora-rank (higher ranks are re-ranked down)."
)
@click.option(
    "--base",
    type=click.Path(exists=True, path_type=Path),
    help="gguf input/output: the base model's GGUF file or config.json (llama.cpp's q/k row order); "
    "diffusers output: its pipeline folder (exact kohya names).",
)
@click.option(
    "--component",
    help="diffusers output: the pipeline component (unet, transformer, text_encoder, ...) for modules whose names carry none.",
)
@click.option("--k", "nola_k", type=click.IntRange(min=0), help="--to nola: coefficients per factor (k_A = k_B = K).")
@click.option(
    "--target-error",
    "nola_target_error",
    type=click.FloatRange(0, 1, max_open=True),
    help="--to nola: smallest k (doubling from 16) whose relative Frobenius error of ΔW is at most E, per module.",
)
@click.option("--force", is_flag=True, help="Overwrite DST if it exists (a PEFT folder keeps its other files).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert(
    src: Path,
    dst: Path,
    to: str | None,
    codec: str | None,
    level: int | None,
    dtype: str,
    rank: int | None,
    adapter_name: str | None,
    drop_tensors: bool,
    serve_for: str | None,
    max_lora_rank: int | None,
    base: Path | None,
    component: str | None,
    nola_k: int | None,
    nola_target_error: float | None,
    force: bool,
    as_json: bool,
) -> None:
    """Convert SRC (.apack, PEFT folder, kohya or diffusers file) to DST; lossless unless --dtype narrows,
    --rank cuts or --to nola fits."""
    target = to or infer_target(dst)
    if to is not None and (why := target_conflict(dst, to)):
        raise click.BadParameter(why, param_hint="'--to'")
    result = run(
        src,
        dst,
        to=target,
        codec=codec,
        level=level,
        dtype=dtype,
        force=force,
        adapter=adapter_name,
        drop_tensors=drop_tensors,
        rank=rank,
        serve_for=serve_for,
        max_lora_rank=max_lora_rank,
        base=base,
        component=component,
        nola_k=nola_k,
        nola_target_error=nola_target_error,
        progress=None if as_json else out.progress_factory("writing"),
    )
    if as_json:
        out.echo_json(result.as_dict())
    else:
        out.echo_lines(result_lines(result.as_dict()))
