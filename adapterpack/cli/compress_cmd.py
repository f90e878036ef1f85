"""``adapterpack compress SRC DST``: rank and bits per component under one whole-file budget (ops/compress.py does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterpack.cli import output as out
from adapterpack.cli.rerank_cmd import parse_bytes
from adapterpack.codecs import codec_ids
from adapterpack.ops.compress import WEIGHTINGS, compress_file
from adapterpack.ops.importance import load_importance

HEADERS = ("module", "old rank", "rank", "bits per component", "bytes", "rel. error", "note")
ALIGN = "<>><>><"


def parse_bits(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    """``2,3,4,16`` → (2, 3, 4, 16); click's error for anything else (the encoding checks the widths)."""
    if value is None:
        return None
    bits = out.comma_ints(value, "bit widths")
    if not bits:
        raise click.BadParameter(f"{value!r}: give at least one bit width")
    return bits


def bits_text(bits: list[int]) -> str:
    """Runs collapsed: ``[8, 4, 4, 4, 2]`` → ``8 4×3 2``; float components show as ``f16``."""
    parts: list[str] = []
    i = 0
    while i < len(bits):
        j = i
        while j < len(bits) and bits[j] == bits[i]:
            j += 1
        b = "f16" if bits[i] == 16 else str(bits[i])
        parts.append(b if j - i == 1 else f"{b}×{j - i}")
        i = j
    return " ".join(parts) or "-"


def report_lines(r: dict[str, Any], per_module: bool) -> list[str]:
    """The per-module table (when asked) and the totals of a compress result (as_dict form)."""
    lines: list[str] = []
    if per_module:
        rows = [
            (
                m["name"],
                m["old_rank"],
                m["rank"],
                bits_text(m["bits"]) if m["selected"] else "-",
                out.count(m["bytes"]),
                out.sci(m["rel_error"]) if m["selected"] else "-",
                "; ".join(m["notes"]) if m["selected"] else "kept as is",
            )
            for m in r["modules"]
        ]
        lines += [*out.table(HEADERS, rows, ALIGN), ""]
    t = r["total"]
    mean = "-" if t["mean_bits"] is None else f"{t['mean_bits']:.2f}"
    lines.append(
        f"total    {t['compressed']} of {t['modules']} modules compressed ({r['objective']}, {r['weighting']}): whole file "
        f"{out.size(t['file_bytes'])} within the budget {out.size(t['budget'])}; fp16 factors {out.size(t['fp16_bytes'])}, "
        f"ratio {out.ratio(t['ratio_fp16'])}"
    )
    lines.append(
        f"error    relative Frobenius error of ΔW {out.sci(t['rel_error'])} overall, worst module {out.sci(t['max_rel_error'])};"
        f" mean bits per kept component {mean}"
    )
    if r["dst"] is not None:
        lines.append(f"wrote    {r['dst']}: {out.size(r['src_bytes'])} -> {out.size(r['dst_bytes'])} in {r['seconds']:.2f} s")
    lines += [f"note     {n}" for n in r["notes"]]
    return lines


@click.command("compress", short_help="Choose rank and bits per component under one whole-file byte budget.")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path), required=False)
@click.option("--budget", callback=parse_bytes, metavar="SIZE", help="Bytes of the whole output file (e.g. 230KB, 1.5MB).")
@click.option(
    "--budget-ratio",
    type=click.FloatRange(0, 1, min_open=True),
    help="Budget as a fraction of the adapter's fp16 factor size (2 bytes per factor parameter, its fp16 PEFT "
    "file without the header): 0.125 makes the whole file at most 1/8 of that.",
)
@click.option(
    "--importance",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Weigh cuts and quantization noise by measured Fisher information (a file from `adapterpack importance`).",
)
@click.option("--bits", callback=parse_bits, metavar="LIST", help="Bit widths offered per component, e.g. 2,3,4,16 (16: float).")
@click.option("--group-size", type=click.IntRange(min=1), help="Values per quantization scale (default: the encoding's).")
@click.option(
    "--weighting",
    type=click.Choice(WEIGHTINGS),
    help="balanced (default without --importance): least Σ‖error‖^1.5 with every module at >= 3/4 of a uniform share; "
    "absolute: least Σ‖error‖² (the default with --importance: least second-order KL).",
)
@click.option("--min-rank", type=click.IntRange(min=0), default=1, show_default=True, help="No module below this rank.")
@click.option("--max-rank", type=click.IntRange(min=0), help="No module above this rank.")
@click.option("--modules", metavar="REGEX", help="Only modules whose name matches (re.search); others are kept, inside the budget.")
@click.option(
    "--codec", type=click.Choice(codec_ids()), default="raw", show_default=True, help="Blob codec (the budget counts its bytes)."
)
@click.option(
    "--base",
    type=click.Path(exists=True, path_type=Path),
    help="GGUF input: the base model's GGUF file or config.json (llama.cpp's q/k row order).",
)
@click.option("--force", is_flag=True, help="Overwrite DST if it exists.")
@out.report_options
def compress(
    src: Path,
    dst: Path | None,
    budget: int | None,
    budget_ratio: float | None,
    importance: Path | None,
    bits: tuple[int, ...] | None,
    group_size: int | None,
    weighting: str | None,
    min_rank: int,
    max_rank: int | None,
    modules: str | None,
    codec: str,
    base: Path | None,
    adapter_name: str | None,
    force: bool,
    dry_run: bool,
    summary: bool,
    as_json: bool,
) -> None:
    """Compress SRC (.apack, PEFT folder, kohya, diffusers or GGUF file) into the .apack DST: each module keeps a
    prefix of its exact singular components, each stored at its own bit width (qsvd records), chosen so
    that the whole file fits the budget, index and padding included, with the least error.

    The report gives every module's rank, bits per component, bytes and exact relative error of ΔW.
    """
    if (budget is None) == (budget_ratio is None):
        raise click.UsageError("give exactly one of --budget and --budget-ratio")
    if dst is None and not dry_run:
        raise click.UsageError("DST is required unless --dry-run")
    result = compress_file(
        src,
        None if dry_run else dst,
        force=force,
        adapter=adapter_name,
        base=base,
        budget=budget,
        budget_ratio=budget_ratio,
        importance=None if importance is None else load_importance(importance),
        bits=bits,
        group_size=group_size,
        weighting=weighting,
        min_rank=min_rank,
        max_rank=max_rank,
        modules=modules,
        codec=codec,
    )
    data = result.as_dict()
    if as_json:
        out.echo_json(data)
    else:
        out.echo_lines(report_lines(data, per_module=not summary))
