"""``adapterpack convert SRC DST``: any format to any format (convert.py does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterpack.cli import output as out
from adapterpack.cli.write_options import write_options
from adapterpack.formats.write import WriteOptions
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
@write_options(TARGETS)
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
@click.option("--k", "nola_k", type=click.IntRange(min=0), help="--to nola: coefficients per factor (k_A = k_B = K).")
@click.option(
    "--target-error",
    "nola_target_error",
    type=click.FloatRange(0, 1, max_open=True),
    help="--to nola: smallest k (doubling from 16) whose relative Frobenius error of ΔW is at most E, per module.",
)
@click.option(
    "--k-max", "nola_k_max", type=click.IntRange(min=1), default=1024, show_default=True,
    help="--target-error: the largest k tried per module.",
)  # fmt: skip
@click.option(
    "--max-seconds", "nola_max_seconds", type=click.FloatRange(min=0), default=600.0, show_default=True,
    help="--target-error: stop raising k after this long; the modules left keep the best error reached (a note says so).",
)  # fmt: skip
@out.progress_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert(
    src: Path,
    dst: Path,
    opts: WriteOptions,
    dtype: str,
    rank: int | None,
    adapter_name: str | None,
    nola_k: int | None,
    nola_target_error: float | None,
    nola_k_max: int,
    nola_max_seconds: float,
    as_json: bool,
) -> None:
    """Convert SRC (.apack, PEFT folder, kohya or diffusers file) to DST; lossless unless --dtype narrows,
    --rank cuts or --to nola fits."""
    target = opts.to or infer_target(dst)
    if opts.to is not None and (why := target_conflict(dst, opts.to)):
        raise click.BadParameter(why, param_hint="'--to'")
    result = run(
        src,
        dst,
        to=target,
        codec=opts.codec,
        level=opts.level,
        dtype=dtype,
        force=opts.force,
        adapter=adapter_name,
        drop_tensors=opts.drop_tensors,
        rank=rank,
        serve_for=opts.serve_for,
        max_lora_rank=opts.max_lora_rank,
        base=opts.base,
        component=opts.component,
        nola_k=nola_k,
        nola_target_error=nola_target_error,
        nola_k_max=nola_k_max if nola_target_error is not None else None,
        nola_max_seconds=nola_max_seconds if nola_target_error is not None else None,
        progress=out.progress_factory("writing"),
    )
    if as_json:
        out.echo_json(result.as_dict())
    else:
        out.echo_lines(result_lines(result.as_dict()))
