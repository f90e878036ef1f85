"""``adapterpack bank build|add|refit|extract|list``: adapter banks (presentation only; adapterpack.bank does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterpack import dtypes
from adapterpack.bank import add_to_bank, bank_listing, build_bank, extract_drops, extract_member, refit_bank, write_extracted
from adapterpack.cli import output as out
from adapterpack.cli.write_options import write_options
from adapterpack.formats.write import FORMATS, WriteOptions, check_write_options, infer_format, write_adapters

_FIT_OPTIONS = [
    click.option("--rank", "-r", type=click.IntRange(min=1), default=None,
                 help="Shared rank R per module (build: default 16; with --target-error/--budget the most R may reach, default 64; "
                 "refit: default the bank's current ranks, in both roles)."),
    click.option("--target-error", type=click.FloatRange(min=0), default=None,
                 help="Choose R per module: least R whose mean relative squared error is at most this."),
    click.option("--budget", type=click.IntRange(min=1), default=None,
                 help="Choose R per module to fit the bank's tensors in this many bytes (uncompressed)."),
    click.option("--form", type=click.Choice(["full", "diagonal"]), default=None, help="Per-adapter S: R×R (full) or R values."),
    click.option("--weights", type=click.Choice(["norm", "uniform"]), default="norm", show_default=True,
                 help="norm: each adapter weighs 1/‖ΔW‖² (relative errors); uniform: absolute errors."),
    click.option("--max-iter", type=click.IntRange(min=0), default=50, show_default=True, help="Most iterations per module."),
    click.option("--scheduler", default=None,
                 help="Run passes on Dask: 'threads' (local threads) or a scheduler ADDRESS; default in-process."),
]


def _fit_options(f: Any) -> Any:
    for opt in reversed(_FIT_OPTIONS):
        f = opt(f)
    return f


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3g}%"


def fit_lines(r: dict[str, Any]) -> list[str]:
    """Summary of a build/refit: errors, ranks, iterations."""
    f = r["fit"]
    e = f["rel_error"]
    ranks = sorted(set(f["ranks"].values()))
    its = list(f["iterations"].values())
    conv = sum(f["converged"].values())
    lines = [
        f"{r['path']}: {r['action']} {r['adapters']} adapters, {f['modules']} modules, form {f['form']}, "
        f"{out.size(r['file_size'])}",
        f"  rank per module: {ranks[0]}" + (f"..{ranks[-1]}" if len(ranks) > 1 else ""),
        f"  relative squared error: mean {_pct(e['mean'])}, median {_pct(e['quantiles']['0.5'])}, "
        f"p90 {_pct(e['quantiles']['0.9'])}, max {_pct(e['max'])}",
        f"  iterations: {min(its)}..{max(its)}; converged {conv}/{len(its)} modules",
    ]
    return lines + [f"  left out: {x}" for x in r["left_out"]]


def add_lines(r: dict[str, Any]) -> list[str]:
    """Summary of an add: each new adapter's error and how much the bases grew."""
    lines = [f"{r['path']}: {len(r['added'])} added, {r['adapters']} adapters in the bank"]
    for a in r["added"]:
        grew = sum(a["grown"].values())
        note = f", bases grew by {grew} columns on {len(a['grown'])} modules" if grew else ""
        err = f"mean {_pct(a['rel_error_mean'])}, max {_pct(a['rel_error_max'])}"
        lines.append(f"  {a['name']}: relative squared error {err}{note}")
    lines += [f"  skipped: {s}" for s in r["skipped"]]
    return lines + [f"  left out: {x}" for x in r["left_out"]]


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")


def list_lines(r: dict[str, Any]) -> list[str]:
    """The members of a bank with their errors and pass-through tensors, then the modules' ranks."""
    ranks = sorted({m["rank"] for m in r["modules"]})
    lines = [
        f"{r['path']}: bank of {r['adapters']} adapters, {len(r['modules'])} modules, form {r['form']}, "
        f"rank {ranks[0]}" + (f"..{ranks[-1]}" if len(ranks) > 1 else "") + f", {out.size(r['file_size'])} "
        f"(shared bases {out.size(r['shared_bytes'])})",
    ]
    rows = [(m["name"], out.count(m["own_bytes"]), _pct(m["rel_error_mean"]), _pct(m["rel_error_max"]), m["error_reference"] or "-",
             m["sha256"], len(m["tensors"])) for m in r["members"]]
    lines += out.table(("adapter", "own bytes", "mean err", "max err", "error against", "sha256", "tensors"), rows, "<>>><<>")
    return lines + [f"  {m['name']} carries pass-through tensors: {_names(m['tensors'])}" for m in r["members"] if m["tensors"]]


@click.group("bank", short_help="Many adapters in one file on shared bases.")
def bank() -> None:
    """Adapter banks: many adapters of one base model sharing per-module bases U, V (spec/shared.md)."""


@bank.command("build")
@click.argument("out_path", metavar="OUT", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("adapters", nargs=-1, type=click.Path(exists=True, path_type=Path))
@_fit_options
@click.option("--name", "names", multiple=True, help="Member name per ADAPTER, in order (default: file or folder name).")
@click.option("--dtype", type=click.Choice(dtypes.FLOATS), default="float32", show_default=True)
@click.option("--partial", is_flag=True, help="Bank only the modules every adapter has with the same shape; list the rest.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@out.progress_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def build(out_path: Path, adapters: tuple[Path, ...], rank: int | None, target_error: float | None, budget: int | None,
          form: str | None, weights: str, max_iter: int, scheduler: str | None, names: tuple[str, ...], dtype: str,
          partial: bool, force: bool, as_json: bool) -> None:
    """Fit shared bases for ADAPTERs and write the bank to OUT."""
    chosen = target_error is not None or budget is not None
    r = build_bank(out_path, list(adapters), names=list(names) or None, rank=rank or (64 if chosen else 16),
                   target_error=target_error, budget=budget, form=form or "full", weights=weights, dtype=dtype,
                   partial=partial, max_iter=max_iter, scheduler=scheduler, overwrite=force).as_dict()
    out.echo_json(out.written(r, [str(a) for a in adapters])) if as_json else out.echo_lines(fit_lines(r))


@bank.command("add")
@click.argument("bank_path", metavar="BANK", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("adapters", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--threshold", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="Grow the bases when a new adapter's relative squared error on a module exceeds this.")
@click.option("--no-grow", is_flag=True, help="Never grow the bases; only project.")
@click.option("--name", "names", multiple=True, help="Member name per ADAPTER, in order.")
@click.option("--partial", is_flag=True, help="Leave out modules the bank does not have (listed).")
@out.progress_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def add(bank_path: Path, adapters: tuple[Path, ...], threshold: float, no_grow: bool, names: tuple[str, ...], partial: bool,
        as_json: bool) -> None:
    """Add ADAPTERs to BANK: project onto its bases, grow them where needed (old members unchanged)."""
    r = add_to_bank(bank_path, list(adapters), names=list(names) or None, threshold=None if no_grow else threshold,
                    partial=partial).as_dict()
    out.echo_json(out.written(r, [str(a) for a in adapters])) if as_json else out.echo_lines(add_lines(r))


@bank.command("refit")
@click.argument("bank_path", metavar="BANK", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_fit_options
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the refitted bank here (default: replace BANK atomically).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@out.progress_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def refit(bank_path: Path, rank: int | None, target_error: float | None, budget: int | None, form: str | None, weights: str,
          max_iter: int, scheduler: str | None, out_path: Path | None, force: bool, as_json: bool) -> None:
    """Refit BANK's bases from its members (e.g. after many adds grew them)."""
    r = refit_bank(bank_path, out=out_path, rank=rank, target_error=target_error, budget=budget, form=form, weights=weights,
                   max_iter=max_iter, scheduler=scheduler, overwrite=force).as_dict()
    out.echo_json(out.written(r, str(bank_path))) if as_json else out.echo_lines(fit_lines(r))


@bank.command("extract")
@click.argument("bank_path", metavar="BANK", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("name")
@click.argument("out_path", metavar="OUT", type=click.Path(path_type=Path))
@write_options(
    (*FORMATS, "svd"),
    to_help="Output format: svd = svd records in .apack (loadable at any lower rank), else as convert --to "
    "(default: from OUT's name; a folder is PEFT).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def extract(bank_path: Path, name: str, out_path: Path, opts: WriteOptions, as_json: bool) -> None:
    """Write member NAME of BANK as a standalone adapter (lora records and its pass-through tensors) to OUT."""
    target = opts.to or infer_format(out_path)
    fmt = "apack" if target == "svd" else target
    o = opts
    check_write_options(fmt, out_path, drop_tensors=o.drop_tensors, serve_for=o.serve_for, component=o.component, base=o.base)
    adapter, errs = extract_member(bank_path, name)
    dropped = extract_drops(adapter, "peft") if opts.drop_tensors else []
    if target == "svd":
        write_extracted(adapter, out_path, "svd", codec=o.codec, level=o.level, overwrite=o.force)
        notes: list[str] = []
    else:
        notes = write_adapters([adapter], out_path, target, **opts.writer_kwargs())
    path = out_path
    kept = [k for k in adapter.tensors if k not in dropped]
    worst = max(errs.values()) if errs else 0.0
    r = {"path": str(path), "adapter": name, "format": target, "modules": len(errs), "max_rel_error": worst, "tensors": kept,
         "dropped_tensors": dropped, "notes": notes}
    if as_json:
        out.echo_json(out.written(r, str(bank_path)))
        return
    lines = [f"{path}: {name} as {target}, {len(errs)} modules (extraction error at most {worst:.2g} of the bank's ΔW)"]
    lines += [f"  pass-through tensors: {_names(kept)}"] if kept else []
    lines += [f"  dropped on request: {len(dropped)} pass-through tensors ({_names(dropped)})"] if dropped else []
    lines += [f"  note: {n}" for n in notes]
    out.echo_lines(lines)


@bank.command("list")
@click.argument("bank_path", metavar="BANK", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
def list_(bank_path: Path, as_json: bool) -> None:
    """List BANK's adapters (errors, own bytes, content hash) and modules."""
    r = bank_listing(bank_path)
    out.echo_json(r) if as_json else out.echo_lines(list_lines(r))
