"""``adapterpack check --target vllm|peft|llama.cpp|kohya PATH``: what that stack would refuse or misread, and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterpack.cli import output as out
from adapterpack.formats.serving import TARGETS, check_path


def finding_lines(target: str, path: Path, findings: list[dict[str, Any]]) -> list[str]:
    """One block per finding: severity, problem, modules, fix."""
    bad = [f for f in findings if f["severity"] != "note"]
    head = f"{path}: {target} " + ("loads it as is" if not bad else f"would refuse or misread {len(bad)} thing(s)")
    lines = [head]
    for f in findings:
        mods = f["modules"]
        some = ", ".join(mods[:3]) + (f", ... ({len(mods)} modules)" if len(mods) > 3 else "")
        lines.append(f"  {f['severity']:<8}{f['problem']}" + (f" [{some}]" if mods else ""))
        lines.append(f"  {'fix':<8}{f['fix']}")
    return lines


@click.command("check", short_help="List what vLLM, PEFT, llama.cpp or kohya would refuse or misread.")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--target", type=click.Choice(TARGETS), required=True, help="The stack to check against.")
@click.option("--adapter", help="Adapter name in a multi-adapter .apack file.")
@click.option("--max-lora-rank", type=click.IntRange(1), help="vLLM: the server's --max-lora-rank (default: vLLM's largest, 512).")
@click.option(
    "--base",
    type=click.Path(exists=True, path_type=Path),
    help="llama.cpp: the base model's GGUF file or config.json; peft/vllm: its folder, .safetensors or config.json "
    "(every module name must be one of its modules).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.pass_context
def check(
    ctx: click.Context, path: Path, target: str, adapter: str | None, max_lora_rank: int | None, base: Path | None, as_json: bool
) -> None:
    """Exit status 0 when TARGET would load PATH as it is (notes only), 1 when it would refuse or misread something."""
    findings = [f.as_dict() for f in check_path(path, target, adapter=adapter, max_lora_rank=max_lora_rank, base=base)]
    if as_json:
        bad = any(f["severity"] != "note" for f in findings)
        coded = [{"code": f"{target.replace('.', '_')}_{f['severity']}", **f} for f in findings]
        out.echo_json({"ok": not bad, "path": str(path), "target": target, "findings": coded})
    else:
        out.echo_lines(finding_lines(target, path, findings))
    ctx.exit(1 if any(f["severity"] != "note" for f in findings) else 0)
