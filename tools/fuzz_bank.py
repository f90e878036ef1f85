"""Fuzz the bank commands: a damaged or edited bank through ``bank list/extract/add/refit``, ``inspect`` and ``convert``.

The seed is a bank of two members built from two modules of the bundled real adapter (the second member's B
halved); a third member (B times -2) is what ``bank add`` adds. Half of the inputs get one index value set to a
random JSON value (:func:`tools.fuzz_open.json_edit`), the others one to three bytes overwritten; 70 % then get
their index CRC-32C recomputed so the checks behind it see the damage. A command that ends in an exception the CLI
did not turn into a message and an exit status is a crash; crashing inputs are written to ``--crash-dir``.
Run from the repository root::

    python -m tools.fuzz_bank --n 1500
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
from click.testing import CliRunner

import adapterpack
from adapterpack.adapter import Module
from adapterpack.cli import main as cli
from tools.fuzz_import import crash_note, run_commands, seeds, tally_report
from tools.fuzz_open import fix_index_crc, json_edit, random_value


def members(work: Path) -> list[Path]:
    """Three member adapters (.apack): the seed PEFT folder's two modules with B times 1, 0.5 and -2."""
    out = []
    peft = seeds(work)["peft"]
    for i, factor in enumerate((1.0, 0.5, -2.0)):
        with adapterpack.open(peft) as ad:
            mods = {
                n: Module(m.name, m.encoding, m.base_shape, dict(m.params),
                          {k: (m.array(k) * np.float32(factor if k == "B" else 1.0)).astype(m.array(k).dtype) for k in m.tensors})
                for n, m in ad.modules.items()
            }
            path = work / f"member{i}.apack"
            adapterpack.save(ad.derived(mods), path)
        out.append(path)
    return out


def seed_bank(work: Path) -> tuple[bytes, list[Path]]:
    """The seed bank's bytes (members ``a`` and ``b``) and the three member files."""
    files = members(work)
    result = CliRunner().invoke(cli, ["bank", "build", str(work / "bank.apack"), str(files[0]), str(files[1]), "--rank", "8",
                                      "--name", "a", "--name", "b"], catch_exceptions=False)
    if result.exit_code:
        raise SystemExit(f"could not build the seed bank: {result.output}")
    return (work / "bank.apack").read_bytes(), files


def mutate(seed: bytes, rnd: random.Random) -> bytes:
    raw = bytearray(json_edit(seed, rnd.choice, lambda: random_value(rnd)) if rnd.random() < 0.5 else seed)
    if raw == seed:
        for _ in range(rnd.randrange(1, 4)):
            raw[rnd.randrange(len(raw))] = rnd.randrange(256)
    if rnd.random() < 0.7:
        fix_index_crc(raw)
    return bytes(raw)


def commands(bank: Path, work: Path, new_member: Path) -> list[list[str]]:
    b = str(bank)
    return [
        ["bank", "list", b],
        ["bank", "extract", b, "a", str(work / "extracted.apack"), "--force"],
        ["bank", "refit", b, "--rank", "8", "--out", str(work / "refit.apack"), "--force"],
        ["inspect", b],
        ["convert", b, str(work / "converted.apack"), "--codec", "zstd", "--force"],
        ["bank", "add", b, str(new_member), "--name", "c"],  # last: it rewrites the bank
    ]


def exercise(raw: bytes, work: Path, new_member: Path) -> list[str]:
    """Every command on the bank ``raw`` (:func:`tools.fuzz_import.run_commands`): ``NAME ok`` or ``NAME exit N`` each."""
    bank = work / "input.apack"
    bank.write_bytes(raw)
    return run_commands(commands(bank, work, new_member))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="inputs (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    args = ap.parse_args(argv)
    rnd = random.Random(args.seed)
    tally: dict[str, int] = {}
    crashes = 0
    with tempfile.TemporaryDirectory(prefix="apack-fuzz-bank-") as tmp:
        work = Path(tmp)
        seed, files = seed_bank(work)
        for i in range(args.n):
            raw = mutate(seed, rnd)
            try:
                outcomes = exercise(raw, work, files[2])
            except Exception as e:
                crashes += 1
                args.crash_dir.mkdir(parents=True, exist_ok=True)
                keep = args.crash_dir / f"bank-{args.seed}-{i}.apack"
                keep.write_bytes(raw)
                crash_note(f"bank #{i}", e, keep)
                outcomes = [f"CRASH {type(e).__name__}"]
            for o in outcomes:
                tally[o] = tally.get(o, 0) + 1
    return tally_report(f"bank: {args.n} inputs, {len(commands(Path('x'), Path('.'), Path('y')))} commands each", tally, crashes)


if __name__ == "__main__":
    sys.exit(main())
