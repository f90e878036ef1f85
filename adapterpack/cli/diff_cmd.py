"""``adapterpack diff A B [--base MODEL --text FILE]``: how two adapters differ, module by module (ops/diff.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterpack.cli import output as out
from adapterpack.errors import InputError
from adapterpack.ops.diff import diff_adapters
from adapterpack.ops.files import open as open_adapter

HEADERS = ("module", "rel. error", "cosine", "‖ΔW_a‖", "‖ΔW_b‖", "")
ALIGN = "<>>>><"


def _f(x: float | None, fmt: str = "{:.4g}") -> str:
    return "-" if x is None else fmt.format(x)


def diff_lines(r: dict[str, Any], limit: int | None = None) -> list[str]:
    """The per-module table, the totals and the model figures of a :class:`~adapterpack.ops.diff.DiffReport`."""
    rows = r["modules"] if limit is None else r["modules"][:limit]
    cells = [(m["name"], out.sci(m["rel_error"]), _f(m["cosine"], "{:.6f}"), _f(m["norm_a"]), _f(m["norm_b"]),
              f"only in {m['only_in'].upper()}" if m.get("only_in") else "") for m in rows]  # fmt: skip
    lines = [f"A = {r['a']}", f"B = {r['b']}", "", *out.table(HEADERS, cells, ALIGN)]
    if len(rows) < len(r["modules"]):
        lines.append(f"... {len(r['modules']) - len(rows)} more modules")
    t = r["total"]
    lines += [
        "",
        f"total    {t['module_count']} modules: relative error of ΔW {out.sci(t['rel_error'])} (‖ΔW_a − ΔW_b‖ / ‖ΔW_a‖), "
        f"cosine {_f(t['cosine'], '{:.6f}')}, ‖ΔW_a‖ {_f(t['norm_a'])}, ‖ΔW_b‖ {_f(t['norm_b'])}",
    ]
    if r.get("model"):
        m = r["model"]
        lines.append(
            f"model    {m['base']}: KL(A ‖ B) {m['kl']:.4g} nats/token (worst block {m['kl_worst_block']:.4g}), "
            f"top-1 agreement {100 * m['top1_agreement']:.2f}% over {m['tokens']:,} tokens of {m['text']}"
        )
    return lines + [f"note     {n}" for n in r["notes"]]


@click.command("diff", short_help="Per-module ΔW error, cosine and norms of two adapters (KL on text with --base).")
@click.argument("a", type=click.Path(exists=True, path_type=Path))
@click.argument("b", type=click.Path(exists=True, path_type=Path))
@click.option("--adapter-a", metavar="NAME", help="Which adapter of a multi-adapter .apack file A.")
@click.option("--adapter-b", metavar="NAME", help="Which adapter of a multi-adapter .apack file B.")
@click.option("--base", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A Hugging Face causal-LM folder: also measure KL(A ‖ B) and top-1 agreement on --text.")  # fmt: skip
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="UTF-8 held-out text for --base.")  # fmt: skip
@click.option("--blocks", type=click.IntRange(min=1), default=64, show_default=True, help="--base: blocks of text.")
@click.option("--block-tokens", type=click.IntRange(min=2), default=128, show_default=True, help="--base: tokens per block.")
@click.option("--device", default="cpu", show_default=True, help="--base: torch device for the model.")
@click.option("--limit", type=click.IntRange(min=0), help="Show only the first N modules of the table.")
@out.progress_option
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def diff(a: Path, b: Path, adapter_a: str | None, adapter_b: str | None, base: Path | None, text_file: Path | None,
         blocks: int, block_tokens: int, device: str, limit: int | None, as_json: bool) -> None:  # fmt: skip
    """Compare adapters A and B (any files the library reads): per module the relative error
    ‖ΔW_a − ΔW_b‖/‖ΔW_a‖, the cosine and both norms, exact from the factors (no out×in matrix is formed).
    With --base MODEL --text FILE, also KL(A ‖ B) per token and top-1 agreement on that text."""
    if (base is None) != (text_file is None):
        raise click.UsageError("--base and --text go together")
    with open_adapter(a, adapter=adapter_a) as ad_a, open_adapter(b, adapter=adapter_b) as ad_b:
        report = diff_adapters(ad_a, ad_b, a_name=str(a), b_name=str(b))
        if base is not None and text_file is not None:
            from adapterpack.torch.fit.compare import compare_causal_lm  # torch, transformers: only with --base

            try:
                text = text_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{text_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            model = compare_causal_lm(ad_a, ad_b, base, text, blocks=blocks, block_tokens=block_tokens, device=device)
            report.model = model | {"text": str(text_file)}
    r = report.as_dict()
    out.echo_json(r) if as_json else out.echo_lines(diff_lines(r, limit))
