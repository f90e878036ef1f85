"""``adapterpack inspect PATH``: per-module table and totals of any adapter (report.py builds the data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterpack.cli import output as out
from adapterpack.ops.report import inspect_path

HEADERS = ("module", "encoding", "rank", "shape (base)", "dtype", "stored bytes", "share")
ALIGN = "<<><<>>"


def _encoding(row: dict[str, Any]) -> str:
    if row["kind"] == "tensor":
        return "tensor"
    s = row["summary"]
    enc = row["encoding"]
    if s.get("layout", "linear") != "linear":
        enc += f"/{s['layout']}"
    return enc + ("+dora" if s.get("dora") else "")


def _dtype(row: dict[str, Any]) -> str:
    """The dtype cell; for records with per-component widths (qsvd), the widths run-length encoded: ``8,4x3,1x4 g64``."""
    bits = row["summary"].get("bits")
    if not isinstance(bits, list):
        return str(row["dtype"])
    runs: list[list[Any]] = []
    for b in bits:
        if runs and runs[-1][0] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    cell = ",".join(("f16" if b == 16 else str(b)) + (f"x{n}" if n > 1 else "") for b, n in runs) or "-"
    return f"bits {cell} g{row['summary'].get('group_size')}"


def module_table(rows: list[dict[str, Any]], limit: int | None = None) -> list[str]:
    """The per-module table; with ``limit``, the first rows and a line saying how many were left out."""
    shown = rows if limit is None else rows[:limit]
    cells = [
        (
            r["module"],
            _encoding(r),
            r["rank"],
            out.shape(r["base_shape"]),
            _dtype(r),
            out.count(r["stored_bytes"]),
            f"{r['share']:.2f}%",
        )
        for r in shown
    ]
    lines = out.table(HEADERS, cells, ALIGN)
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more rows (adapterpack inspect PATH shows all)")
    return lines


def totals_lines(t: dict[str, Any]) -> list[str]:
    """Totals of one adapter (or of the whole file)."""
    nt, nm = t["tensors"], t["modules"]
    tensors = f", {nt} pass-through tensor{'s' if nt != 1 else ''}" if nt else ""
    return [
        f"totals   {nm} module{'s' if nm != 1 else ''}{tensors}, {out.count(t['parameters'])} parameters",
        f"         decoded {out.size(t['decoded_bytes'])}, stored {out.size(t['stored_bytes'])}, "
        f"compression {out.ratio(t['compression_ratio'])}",
    ]


def file_lines(report: dict[str, Any]) -> list[str]:
    """File-level facts: size, and for .apack the index, padding, version and codecs."""
    f = report["file"]
    if report["format"] != "apack":
        return [f"file     {out.size(f['file_size'])} on disk ({report['format']})"]
    codecs = ", ".join(f"{k} x{v}" for k, v in sorted(f["codecs"].items())) or "none"
    return [
        f"file     {out.size(f['file_size'])}: format {f['format_version']}, index {out.count(f['index_bytes'])} B, "
        f"padding {out.count(f['padding_bytes'])} B, {f['blobs']} blobs",
        f"codecs   {codecs}",
    ]


def adapter_lines(a: dict[str, Any], limit: int | None = None) -> list[str]:
    """Header, table, totals, skipped records and notes of one adapter."""
    base = a["base_model"] or "unknown base model"
    if a["base_architecture"]:
        base += f" ({a['base_architecture']})"
    origin = f", imported from {a['source_format']}" if a["source_format"] else ""
    lines = [f"adapter {a['name']!r}: {base}{origin}", ""]
    lines += module_table(a["rows"], limit) if a["rows"] else ["(no modules)"]
    lines += ["", *totals_lines(a["totals"])]
    lines += [f"skipped  {s}" for s in a["skipped"]]
    lines += [f"note     {n}" for n in a["notes"]]
    return lines


def inspect_lines(report: dict[str, Any], limit: int | None = None) -> list[str]:
    """The whole ``inspect`` text for a report from :func:`adapterpack.ops.report.inspect_path`."""
    n = len(report["adapters"])
    lines = [f"{report['path']}: {report['format']}, {n} adapter{'s' if n != 1 else ''}", ""]
    for a in report["adapters"]:
        lines += [*adapter_lines(a, limit), ""]
    if n > 1:
        lines += ["all adapters", *totals_lines(report["totals"])]
    lines += file_lines(report)
    return lines


# --- spectra ----------------------------------------------------------------------------------------

SPECTRUM_HEADERS = ("module", "rank", "num.rank", "r90", "r95", "r99", "‖ΔW‖F", "singular values", "energy kept by rank 1..k (%)")
SPECTRUM_ALIGN = "<>>>>>><<"
#: Singular values / energy points shown per module in the table (``--json`` has all of them).
SHOWN_VALUES = 12


def _values(xs: list[float], fmt: str) -> str:
    cells = [fmt.format(x) for x in xs[:SHOWN_VALUES]]
    return " ".join(cells) + (f" ... ({len(xs)})" if len(xs) > SHOWN_VALUES else "")


def _dist(d: dict[str, int] | None) -> str:
    return "-" if d is None else f"{d['min']}/{d['median']}/{d['max']}"


def spectrum_lines(a: dict[str, Any]) -> list[str]:
    """Per-module spectrum table and rank distributions of one adapter (``inspect --spectrum``)."""
    sp = a["spectrum"]
    cells = [
        (
            m["module"] + (" (dora: direction)" if m["dora"] else ""),
            m["rank"],
            m["numerical_rank"],
            m["rank_90"],
            m["rank_95"],
            m["rank_99"],
            f"{m['norm']:.4g}",
            _values(m["singular_values"], "{:.3g}"),
            _values([100 * e for e in m["energy_curve"]], "{:.1f}"),
        )
        for m in sp["modules"]
    ]
    base = a["base_model"] or "unknown base model"
    lines = [f"adapter {a['name']!r}: {base}", ""]
    lines += out.table(SPECTRUM_HEADERS, cells, SPECTRUM_ALIGN) if cells else ["(no modules)"]
    s = sp["summary"]
    lines += [
        "",
        f"ranks    (min/median/max over {s['modules']} modules) stored {_dist(s['rank'])}, "
        f"numerical {_dist(s['numerical_rank'])}, 90% energy {_dist(s['rank_90'])}, "
        f"95% {_dist(s['rank_95'])}, 99% {_dist(s['rank_99'])}",
    ]
    return lines


def spectrum_report_lines(report: dict[str, Any]) -> list[str]:
    """The whole ``inspect --spectrum`` text."""
    n = len(report["adapters"])
    lines = [f"{report['path']}: {report['format']}, {n} adapter{'s' if n != 1 else ''}", ""]
    for a in report["adapters"]:
        lines += [*spectrum_lines(a), ""]
    lines.append(
        "(rank rN: smallest rank keeping N% of the module's ‖ΔW‖²_F; num.rank: singular values above max(out,in)·eps·σ₁; "
        "exact SVDs from the factors)"
    )
    return lines


@click.command("inspect", short_help="Per-module table and totals of an adapter.")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--adapter", "adapter_name", metavar="NAME", help="Only this adapter of a multi-adapter .apack file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--spectrum",
    is_flag=True,
    help="Per module: singular values, numerical rank, ranks keeping 90/95/99% of ‖ΔW‖²_F and the energy curve.",
)
@click.option(
    "--plot",
    "plot_path",
    metavar="FILE.png",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Draw singular values and energy curves of every module to FILE.png (needs the plot extra: matplotlib).",
)
def inspect(path: Path, adapter_name: str | None, as_json: bool, spectrum: bool, plot_path: Path | None) -> None:
    """Show what PATH holds (.apack file, PEFT folder or kohya file): one row per module, then totals."""
    if plot_path is not None:
        from adapterpack.ops.spectrum import require_matplotlib  # start-up: plain inspect does not import the spectrum code

        require_matplotlib()  # refuse before any work when the extra is missing
    report = inspect_path(path, adapter=adapter_name, spectrum=spectrum or plot_path is not None)
    if plot_path is not None:
        from adapterpack.ops.spectrum import plot_spectra  # start-up, as above

        plot_spectra([(a["name"], a["spectrum"]["modules"]) for a in report["adapters"]], plot_path, title=str(path))
    if as_json:
        out.echo_json(report)
    elif spectrum:
        out.echo_lines(spectrum_report_lines(report))
    else:
        out.echo_lines(inspect_lines(report))
    if plot_path is not None and not as_json:
        out.echo(f"plot     {plot_path}")
