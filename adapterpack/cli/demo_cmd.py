"""``adapterpack demo``: the main job on the bundled example, each step checked.

PEFT folder → .apack → inspect → verify → back to PEFT (bit-identical?) → ΔW from both (equal?)
→ sizes. Exit status 0 only when every check passes. Needs no torch.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np

from adapterpack import open as open_adapter
from adapterpack.cli import output as out
from adapterpack.cli.inspect_cmd import adapter_lines, file_lines
from adapterpack.container.reader import ApackReader
from adapterpack.examples import example_path
from adapterpack.ops.convert import adapter_differences, convert, safetensors_differences
from adapterpack.ops.report import inspect_path

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


class Checks:
    """Collects pass/fail lines as the demo goes."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        mark = "ok  " if ok else "FAIL"
        out.echo(f"   [{mark}] {what}{': ' + detail if detail else ''}")
        if not ok:
            self.failed.append(what)
        return ok


@contextlib.contextmanager
def _workdir(out_dir: Path | None) -> Iterator[Path]:
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        yield out_dir
        return
    with tempfile.TemporaryDirectory(prefix="adapterpack-demo-") as tmp:
        yield Path(tmp)


def _step(n: int, title: str) -> float:
    out.echo("")
    click.echo(click.style(f"{n}. {title}", bold=True))
    return time.perf_counter()


def _took(t0: float) -> str:
    return f"{time.perf_counter() - t0:.2f} s"


@click.command("demo", short_help="Round-trip the bundled example, checking each step.")
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), help="Keep the files here (default: a temp folder)."
)
@click.pass_context
def demo(ctx: click.Context, out_dir: Path | None) -> None:
    """Convert the bundled example PEFT adapter to .apack and back, checking every step."""
    start = time.perf_counter()
    example = example_path()
    checks = Checks()
    out.echo(f"adapterpack demo on the bundled example {example.name}")
    out.echo(f"   source: {example} (a PEFT LoRA folder)")
    with _workdir(out_dir) as work:
        apack = work / f"{example.name}.apack"
        back = work / f"{example.name}-roundtrip"
        out.echo(f"   output: {work}{'' if out_dir else ' (temporary; use --out DIR to keep the files)'}")

        t0 = _step(1, "Convert the PEFT folder to .apack (default pco codec, lossless)")
        res = convert(example, apack, to="apack", force=True, progress=out.progress_factory("writing"))
        out.echo(f"   wrote {apack.name}: {out.size(res.dst_bytes)} in {_took(t0)}")
        with open_adapter(example) as original, open_adapter(apack) as packed:
            diffs = adapter_differences(original, packed)
            checks.check(not diffs, "the .apack holds the PEFT tensors bit for bit", "; ".join(diffs[:3]))

        t0 = _step(2, "Inspect it (adapterpack inspect shows every row)")
        report = inspect_path(apack)
        lines = adapter_lines(report["adapters"][0], limit=6)
        out.echo_lines(["   " + line if line else "" for line in [*lines, *file_lines(report)]])

        t0 = _step(3, "Verify it: decode every blob, check every CRC-32C and padding byte")
        with ApackReader(apack) as reader:
            vr = reader.verify()
        detail = f"{vr.blobs} blobs, {out.size(vr.bytes_checked)} checked in {_took(t0)}" if vr.ok else "; ".join(vr.problems[:3])
        checks.check(vr.ok, "verify", detail)

        t0 = _step(4, "Convert the .apack back to a PEFT folder")
        convert(apack, back, to="peft", force=True)
        out.echo(f"   wrote {back.name}/ in {_took(t0)}")
        if (example / WEIGHTS).is_file() and (back / WEIGHTS).is_file():
            diffs = safetensors_differences(example / WEIGHTS, back / WEIGHTS)
            checks.check(not diffs, f"{WEIGHTS}: every tensor bit-identical to the original", "; ".join(diffs[:3]))
        configs = [json.loads((d / CONFIG).read_text(encoding="utf-8")) for d in (example, back)]
        checks.check(configs[0] == configs[1], f"{CONFIG}: same settings as the original")
        with open_adapter(example) as original, open_adapter(back) as roundtrip:
            diffs = adapter_differences(original, roundtrip)
            checks.check(not diffs, "round-tripped adapter equals the original (records and tensors)", "; ".join(diffs[:3]))

        _step(5, "ΔW = scale·B·A of one module, from the .apack and from the PEFT folder")
        with open_adapter(example) as original, open_adapter(apack) as packed:
            name = next(iter(original.modules))
            d_peft, d_apack = original.delta(name), packed.delta(name)
            same = d_peft.shape == d_apack.shape and np.array_equal(d_peft, d_apack)
            norm = float(np.linalg.norm(d_peft.astype(np.float64)))
            out.echo(f"   {name}: ΔW {out.shape(d_peft.shape)} {d_peft.dtype}, ‖ΔW‖_F = {norm:.6g}")
            checks.check(same, "ΔW from .apack equals ΔW from PEFT, element for element")

        _step(6, "Sizes")
        peft_bytes = (example / WEIGHTS).stat().st_size if (example / WEIGHTS).is_file() else res.src_bytes
        apack_bytes = res.dst_bytes
        out.echo(f"   PEFT {WEIGHTS}: {out.size(peft_bytes)}")
        out.echo(f"   .apack file:{' ' * (len(WEIGHTS) - 7)}{out.size(apack_bytes)}")
        out.echo(
            f"   ratio {out.ratio(peft_bytes / apack_bytes)} ({100 * apack_bytes / peft_bytes:.1f}% of the PEFT file), lossless"
        )

    out.echo("")
    took = time.perf_counter() - start
    if checks.failed:
        out.echo(f"{len(checks.failed)} check(s) FAILED: {', '.join(checks.failed)} ({took:.2f} s)")
        ctx.exit(1)
    out.echo(f"all checks passed in {took:.2f} s")
