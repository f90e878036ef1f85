"""``adapterpack audit PATH...``: where adapter storage goes, and what codecs, bf16 or re-ranking would save.

Presentation only: :mod:`adapterpack.ops.audit` finds the inputs and measures them.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import click

from adapterpack.cli import output as out
from adapterpack.ops.audit import VARIANTS, audit_paths, default_jobs, find_inputs
from adapterpack.text import printable

#: Column titles of the alternatives (keys of ``sizes`` / ``saved`` in the report).
VARIANT_TITLES = {
    "zstd": "zstd",
    "byteplanes": "byteplanes",
    "bf16": "bf16",
    "energy99": "e99",
    "energy95": "e95",
    "compress8": "c/8",
}

CSV_FIELDS = (
    "path", "ok", "error", "format", "adapters", "bytes", "parameters", "modules", "dtype", "encoding",
    "rank_min", "rank_median", "rank_max", "rank_99_min", "rank_99_median", "rank_99_max",
    "rank_95_min", "rank_95_median", "rank_95_max",
)  # fmt: skip


def _dist(d: dict[str, int] | None) -> str:
    if d is None:
        return "-"
    return str(d["min"]) if d["min"] == d["max"] else f"{d['min']}/{d['median']}/{d['max']}"


def _pct(saved: int, size: int) -> str:
    return f"{100 * saved / size:.1f}%" if size else "-"


def _cell(r: dict[str, Any], v: str) -> str:
    """The share ``v`` saves; with the relative ΔW error it costs where the alternative reports one."""
    pct = _pct(r["saved"][v], r["bytes"])
    err = r.get("errors", {}).get(v)
    return pct if err is None else f"{pct} (err {err:.3f})"


def _titles(report: dict[str, Any]) -> dict[str, str]:
    return {v: VARIANT_TITLES[v] for v in report["measured"]}


def table_lines(report: dict[str, Any]) -> list[str]:
    """One row per input that could be read: size, ranks, and the share each alternative saves."""
    titles = _titles(report)
    headers = ("input", "format", "dtype", "encoding", "rank", "r99", "r95", "size", *titles.values())
    rows = []
    for r in report["inputs"]:
        if not r["ok"]:
            continue
        rows.append(
            (
                r["path"],
                r["format"],
                r["dtype"],
                r["encoding"],
                _dist(r["rank"]),
                _dist(r["rank_99"]),
                _dist(r["rank_95"]),
                out.human_bytes(r["bytes"]),
                *(_cell(r, v) for v in titles),
            )
        )
    t = report["totals"]
    lines = out.table(headers, rows, "<<<<>>>>" + ">" * len(titles)) if rows else ["(no adapter found)"]
    audited = t["inputs"] - t["failed"]
    lines += [
        "",
        f"total    {audited} input{'s' if audited != 1 else ''} ({t['adapters']} adapter{'s' if t['adapters'] != 1 else ''}, "
        f"{t['modules']} modules), "
        f"{out.size(t['bytes'])}, {out.count(t['parameters'])} parameters",
    ]
    if audited:
        sv = t["saved"]
        saved = ", ".join(f"{name} {out.human_bytes(sv[v])} ({_pct(sv[v], t['bytes'])})" for v, name in titles.items())
        lines += [
            f"saved    {saved or '(nothing measured)'}",
            f"ranks    min/median/max over modules: stored {_dist(t['rank'])}, 99% energy {_dist(t['rank_99'])}, "
            f"95% energy {_dist(t['rank_95'])}",
        ]
    lines += [f"failed   {r['path']}: {r['error']}" for r in report["inputs"] if not r["ok"]]
    lines += [f"missing  {m['path']}: {m['error']}" for m in report["missing"]]
    if report["skipped"]:
        lines.append(f"skipped  {len(report['skipped'])} file(s) that hold no adapter (--json lists them)")
    lines += [
        "",
        "Each column is the share of the size an .apack would save: zstd/byteplanes losslessly (default levels), bf16",
        "with floats cast to bfloat16 (default codec), e99/e95 re-ranked to the smallest rank keeping 99%/95% of each",
        "module's ‖ΔW‖²_F (rerank --energy: svd records, default codec). Exact byte counts of the files the writer would",
        "produce; nothing is sampled. Negative: that alternative would be larger.",
    ]
    return lines


def csv_rows(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the CSV (one row per input; failed inputs carry their error, no figures).

    Text cells are escaped (:func:`~adapterpack.text.printable`) as in the table: CSV has no escapes
    of its own, and is printed to a terminal as often as it is read by a program (``--json`` is exact).
    """
    titles = _titles(report)
    header = [*CSV_FIELDS, *(f"{v}_bytes" for v in titles), *(f"{v}_saved" for v in titles)]
    rows = []
    for r in report["inputs"]:
        d: dict[str, Any] = {"path": r["path"], "ok": int(r["ok"]), "error": r.get("error", ""), "format": r["format"] or ""}
        if r["ok"]:
            d |= {k: r[k] for k in ("bytes", "parameters", "modules", "dtype", "encoding")}
            d["adapters"] = ";".join(r["adapters"])
            for key in ("rank", "rank_99", "rank_95"):
                for stat in ("min", "median", "max"):
                    d[f"{key}_{stat}"] = "" if r[key] is None else r[key][stat]
            for v in titles:
                d[f"{v}_bytes"], d[f"{v}_saved"] = r["sizes"][v], r["saved"][v]
        rows.append([printable(v) if isinstance(v, str) else v for v in (d.get(h, "") for h in header)])
    return header, rows


def _parse_measure(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [v for v in names if v not in VARIANT_TITLES]
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)} (choose from {', '.join(VARIANT_TITLES)})")
    return names


@click.command("audit", short_help="Bytes, ranks and possible savings of many adapters.")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Print one CSV row per input.")
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="Worker processes (0: one per CPU available).",
)
@click.option(
    "--measure",
    callback=_parse_measure,
    default=",".join(VARIANTS),
    show_default=True,
    metavar="LIST",
    help="Alternatives to size, comma-separated (fewer is faster; ranks are reported anyway); also compress8: "
    "`compress --budget-ratio 0.125` (1/8 of the fp16 factors), with its relative ΔW error (slower).",
)
@click.option(
    "--base",
    type=click.Path(exists=True, path_type=Path),
    help="GGUF inputs: the base model's GGUF file or config.json (llama.cpp's q/k row order).",
)
@out.progress_option
def audit(paths: tuple[str, ...], as_json: bool, as_csv: bool, jobs: int, measure: tuple[str, ...], base: Path | None) -> None:
    """Audit adapters under PATH... (folders are walked for PEFT folders, kohya .safetensors and .apack
    files; globs such as 'runs/**/*.apack' are expanded): per input and in total, bytes, parameters,
    dtype, encoding, ranks, ranks keeping 99%/95% energy, and what zstd, byteplanes, bf16 and a re-rank
    to 99%/95% energy would save. Exit status 1 when any input could not be read or a path matched nothing."""
    if as_json and as_csv:
        raise click.UsageError("--json and --csv exclude each other")
    found = find_inputs(paths)
    with out.progress_bar(len(found.inputs), "auditing", "inputs") as advance:
        report = audit_paths(found, jobs=jobs or default_jobs(), measure=measure, progress=advance, base=base)
    if as_json:
        out.echo_json({"ok": not (report["totals"]["failed"] or report["totals"]["missing"]), **report})
    elif as_csv:
        header, rows = csv_rows(report)
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    else:
        out.echo_lines(table_lines(report))
    t = report["totals"]
    if t["failed"] or t["missing"]:
        sys.exit(1)
