"""``adapterpack rerank SRC DST``: re-rank an adapter from its exact spectra (rerank.py does the work)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from adapterpack import dtypes
from adapterpack.cli import output as out
from adapterpack.cli.write_options import write_options
from adapterpack.formats.write import WriteOptions
from adapterpack.linalg.allocate import WEIGHTINGS
from adapterpack.ops.convert import TARGETS, infer_target, target_conflict
from adapterpack.ops.importance import load_importance
from adapterpack.ops.rerank import RerankPolicy, rerank_file

HEADERS = ("module", "old rank", "new rank", "retained", "rel. error", "bytes before", "bytes after", "note")
ALIGN = "<>>>>>><"
DTYPES = dtypes.CAST_CHOICES
RULE_OPTIONS = ("--rank", "--energy", "--sv-ratio", "--budget", "--budget-ratio")


def parse_ranks(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    """``1,8,16,32`` → (1, 8, 16, 32); click's error for anything else."""
    if value is None:
        return None
    ranks = out.comma_ints(value, "ranks")
    if not ranks or min(ranks) < 1:
        raise click.BadParameter(f"{value!r}: ranks must be integers >= 1")
    return ranks


def parse_bytes(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    """``1500000``, ``1.5MB``, ``2MiB`` → bytes."""
    if value is None:
        return None
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = value.strip().upper()
    number = text.rstrip("KMGIB")
    try:
        n = float(number) * units[text[len(number) :].strip()]
    except (ValueError, KeyError):
        raise click.BadParameter(f"{value!r} is not a size (e.g. 1500000, 1.5MB, 2MiB)") from None
    if not math.isfinite(n) or n < 0:
        raise click.BadParameter(f"{value!r}: a budget must be a finite number of bytes >= 0")
    return int(n)


def report_lines(r: dict[str, Any], per_module: bool) -> list[str]:
    """The per-module table (when asked) and the totals of a rerank result (as_dict form)."""
    lines = []
    if per_module:
        rows = [
            (
                m["name"],
                m["old_rank"],
                m["stored_rank"] if m["stored_rank"] != m["new_rank"] else m["new_rank"],
                f"{m['retained']:.2%}",
                out.sci(m["rel_error"]),
                out.count(m["bytes_before"]),
                out.count(m["bytes_after"]),
                "; ".join(m["notes"]) if m["selected"] else "not re-ranked",
            )
            for m in r["modules"]
        ]
        lines += [*out.table(HEADERS, rows, ALIGN), ""]
    t = r["total"]
    lines.append(
        f"total    {t['reranked']} of {t['modules']} modules re-ranked ({r['rule']}): factors {out.size(t['bytes_before'])} -> "
        f"{out.size(t['bytes_after'])}, ratio {out.ratio(t['ratio'])}"
    )
    lines.append(
        f"kept     {t['retained']:.4%} of ‖ΔW‖² (least in a module {t['min_retained']:.2%}); relative Frobenius error of ΔW "
        f"{out.sci(t['rel_error'])} overall, worst module {out.sci(t['max_rel_error'])}"
    )
    if r["dst"] is not None:
        lines.append(
            f"wrote    {r['dst']} ({r['dst_format']}): file {out.size(r['src_bytes'])} -> {out.size(r['dst_bytes'])}"
            f" in {r['seconds']:.2f} s"
        )
    lines += [f"note     {n}" for n in r["notes"] + r["export_notes"]]
    return lines


@click.command("rerank", short_help="Re-rank an adapter without retraining (exact SVD).")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path), required=False)
@click.option("--rank", type=click.IntRange(min=0), help="One rank for every module.")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), help="Keep this fraction of ‖ΔW‖² in each module.")
@click.option("--sv-ratio", type=click.FloatRange(min=1), help="Keep singular values σ_i >= σ_1 / R.")
@click.option(
    "--budget",
    callback=parse_bytes,
    metavar="BYTES",
    help="Bytes of the whole output file (e.g. 2MB; index, padding and kept tensors included): ranks chosen per module.",
)
@click.option(
    "--budget-ratio",
    type=click.FloatRange(0, 1, min_open=True),
    help="Budget for the whole output file as a fraction of the re-ranked modules' current tensor bytes.",
)
@click.option("--max-rank", type=click.IntRange(min=0), help="No module above this rank.")
@click.option("--min-rank", type=click.IntRange(min=0), help="No module below this rank (default: 1 with a budget, else 0).")
@click.option("--round-to", callback=parse_ranks, metavar="LIST", help="Allowed ranks, e.g. 1,8,16,32,64 (vLLM's).")
@click.option(
    "--round-mode",
    type=click.Choice(("up", "down")),
    default="up",
    show_default=True,
    help="Round ranks up (keep more; zero-pad lora output) or down.",
)
@click.option("--modules", metavar="REGEX", help="Only modules whose name matches (re.search); others are copied unchanged.")
@click.option(
    "--weighting",
    type=click.Choice(WEIGHTINGS),
    help="What a budget optimises. balanced (default): least Σ‖error‖^1.5 with every module at >= 3/4 of the uniform "
    "rank the budget affords (lowest KL measured, BENCHMARKS.md); absolute: most ‖ΔW‖² kept (the default with "
    "--importance); relative: most kept fraction per module.",
)
@click.option(
    "--importance",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Budgets: weigh each singular component by its measured Fisher information (a file from "
    "`adapterpack importance`), so ranks go where cutting costs the model the most.",
)
@click.option(
    "--method",
    type=click.Choice(("dp", "greedy")),
    default="dp",
    show_default=True,
    help="Budget solver: exact knapsack DP or greedy.",
)
@click.option("--dtype", type=click.Choice(DTYPES), help="Output factor dtype (default: each module's own).")
@click.option(
    "--encoding",
    type=click.Choice(("svd", "lora")),
    default="svd",
    show_default=True,
    help="Record kind in .apack output (PEFT/kohya are always lora).",
)
@write_options(TARGETS)
@out.report_options
def rerank(
    src: Path,
    dst: Path | None,
    rank: int | None,
    energy: float | None,
    sv_ratio: float | None,
    budget: int | None,
    budget_ratio: float | None,
    max_rank: int | None,
    min_rank: int | None,
    round_to: tuple[int, ...] | None,
    round_mode: str,
    modules: str | None,
    weighting: str | None,
    importance: Path | None,
    method: str,
    dtype: str | None,
    encoding: str,
    opts: WriteOptions,
    adapter_name: str | None,
    dry_run: bool,
    summary: bool,
    as_json: bool,
) -> None:
    """Re-rank SRC (.apack, PEFT folder or kohya file) into DST, choosing ranks by exactly one rule.

    Every module's exact SVD comes from its factors (nothing out×in is formed), so the kept energy
    and relative errors printed are exact. .apack output stores svd records by default: any lower
    rank of them can be loaded later as a prefix (adapterpack.open(path, rank=j)).
    """
    given = [o for o, v in zip(RULE_OPTIONS, (rank, energy, sv_ratio, budget, budget_ratio)) if v is not None]
    if len(given) != 1:
        raise click.UsageError(f"give exactly one of {', '.join(RULE_OPTIONS)}" + (f" (got {', '.join(given)})" if given else ""))
    if max_rank is not None and min_rank is not None and max_rank < min_rank:
        raise click.BadParameter(f"--max-rank {max_rank} is below --min-rank {min_rank}", param_hint="'--max-rank'")
    if dst is None and not dry_run:
        raise click.UsageError("DST is required unless --dry-run")
    target = None
    if dst is not None and not dry_run:
        target = opts.to or infer_target(dst)
        if opts.to is not None and (why := target_conflict(dst, opts.to)):
            raise click.BadParameter(why, param_hint="'--to'")
        if target != "apack" and (opts.codec is not None or opts.level is not None):
            raise click.UsageError(f"--codec and --level apply to .apack output only, not {target}")
    if importance is not None and budget is None and budget_ratio is None:
        raise click.UsageError("--importance weighs a budget: use it with --budget or --budget-ratio")
    policy = RerankPolicy(
        rank=rank,
        energy=energy,
        sv_ratio=sv_ratio,
        budget=budget,
        budget_ratio=budget_ratio,
        max_rank=max_rank,
        min_rank=min_rank,
        round_to=round_to,
        round_mode=round_mode,
        modules=modules,
        weighting=weighting,
        method=method,
        dtype=dtype,
        encoding="lora" if target not in (None, "apack") else encoding,  # PEFT, kohya, gguf hold LoRA factors
        importance=None if importance is None else load_importance(importance),
    )
    result = rerank_file(src, None if dry_run else dst, policy, to=target, adapter=adapter_name, options=opts)
    data = result.as_dict()
    if as_json:
        out.echo_json(data)
    else:
        out.echo_lines(report_lines(data, per_module=not summary))
