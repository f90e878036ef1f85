"""Follow-ups of the issue-12 audit of main: concurrent bank rewrites, bounded error lines, ``check``
applying the exporters' name rules, and the nola fit refusing a ΔW its dtype cannot hold."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.bank import add_to_bank, build_bank, read_bank, refit_bank
from adapterpack.bank import ops as bank_ops
from adapterpack.cli import main
from adapterpack.cli.output import MAX_ERROR_CHARS, Failure
from adapterpack.encodings.nola_fit import fit_adapter
from adapterpack.errors import ConversionError
from adapterpack.formats.peft import read_peft
from adapterpack.formats.serving import check_path
from tests.apack_builders import valid_parts, write
from tests.test_bank import NAMES, _split

# --- N9: read-modify-write of a bank is serialised ----------------------------------------------------


def _hold(path: Path) -> int:
    """An fd holding an exclusive flock on the file ``path`` names (as another writer would)."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _start(monkeypatch: pytest.MonkeyPatch, job: Callable[[], object]) -> tuple[threading.Thread, threading.Event, list]:
    """Run ``job`` in a thread; the event is set when it starts reading the bank."""
    reading = threading.Event()
    real_open = bank_ops.open_bank

    def watched(p):
        reading.set()
        return real_open(p)

    monkeypatch.setattr(bank_ops, "open_bank", watched)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            job()
        except BaseException as e:  # reported by the test
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, reading, errors


def test_bank_add_waits_for_a_writer_and_follows_the_file_it_put_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _split(tmp_path)
    bank, other = tmp_path / "bank.apack", tmp_path / "other.apack"
    build_bank(other, paths[:3], rank=4, max_iter=5)
    add_to_bank(other, [paths[4]], threshold=None)  # what a concurrent writer puts in place: one more member
    build_bank(bank, paths[:3], rank=4, max_iter=5)

    old = _hold(bank)
    t, reading, errors = _start(monkeypatch, lambda: add_to_bank(bank, [paths[3]], threshold=None))
    assert not reading.wait(1.0), "the add read the bank while another writer held it"
    os.replace(other, bank)  # the writer holding the lock renames its result into place ...
    new = _hold(bank)  # ... and a third writer locks the new file before the waiting add sees it
    os.close(old)
    assert not reading.wait(1.0), "the add went on holding a lock on a file the path no longer names"
    os.close(new)
    t.join(120)
    assert not t.is_alive() and errors == [] and reading.is_set()
    assert sorted(m.name for m in read_bank(bank).members) == sorted([*NAMES[:3], NAMES[4], NAMES[3]])  # nothing lost


def test_bank_refit_in_place_waits_for_a_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _split(tmp_path)
    bank = tmp_path / "bank.apack"
    build_bank(bank, paths[:3], rank=4, max_iter=5)
    held = _hold(bank)
    t, reading, errors = _start(monkeypatch, lambda: refit_bank(bank, rank=2, max_iter=5))
    assert not reading.wait(1.0), "the refit read the bank while another writer held it"
    os.close(held)
    t.join(120)
    assert not t.is_alive() and errors == [] and reading.is_set()
    assert {m.rank for m in read_bank(bank).modules.values()} == {2}


# --- N10: an error line is bounded, however long the value it quotes ------------------------------------


@pytest.mark.parametrize(("param", "length"), [("rank", 5_000_000), ("layout", 3_000_000)])
@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_error_line_quoting_a_huge_index_value_is_capped(tmp_path: Path, param: str, length: int, command: str) -> None:
    parts = valid_parts(tmp_path)
    parts.index["adapters"][0]["modules"][0]["params"][param] = "x" * length
    path = write(tmp_path / "long.apack", parts.build(minor=parts.minor))
    r = CliRunner().invoke(main, [command, str(path)])
    assert r.exit_code == 1 and f"{param} must be" in r.stdout + r.stderr
    limit = len("adapterpack: ") + MAX_ERROR_CHARS + len("… (9,999,999 more characters)")
    assert max(len(line) for line in (r.stdout + r.stderr).splitlines()) <= limit


def test_cli_error_printer_caps_any_message(capsys: pytest.CaptureFixture[str]) -> None:
    Failure("bad value " + "\x1b" * 5_000_000).show()
    (line,) = capsys.readouterr().err.splitlines()
    full = "bad value " + "\\x1b" * 5_000_000  # escaped first, then cut
    assert line == f"adapterpack: {full[:MAX_ERROR_CHARS]}… ({len(full) - MAX_ERROR_CHARS:,} more characters)"


# --- N12: ``check`` refuses the names ``convert`` refuses ------------------------------------------------

CTL_NAMES = ["model.layers.0.self_attn.q_proj\x1b]0;pwn\x07", "model.layers.0.\x9b31mk_proj", "model.layers.0.\x00nul"]


def _named(tmp: Path, names: list[str]) -> Path:
    """An adapter (as /tmp/audit/ctl_build.py builds it) whose modules have these names, plus a clean one."""
    rng = np.random.default_rng(0)
    mods = {
        n: Module(
            n,
            "lora",
            (16, 12),
            {"rank": 2, "alpha": 4.0},
            {"A": rng.standard_normal((2, 12)).astype(np.float32), "B": rng.standard_normal((16, 2)).astype(np.float32)},
        )
        for n in [*names, "model.layers.0.self_attn.v_proj"]
    }
    path = tmp / "names.apack"
    adapterpack.save(Adapter(name="default", modules=mods), path, codec="raw")
    return path


@pytest.mark.parametrize(
    ("target", "to"), [("peft", ["--to", "peft"]), ("kohya", ["--to", "kohya"]), ("vllm", ["--target", "vllm"])]
)
def test_check_refuses_control_characters_as_convert_does(tmp_path: Path, target: str, to: list[str]) -> None:
    path = _named(tmp_path, CTL_NAMES)
    conv = CliRunner().invoke(main, ["convert", str(path), str(tmp_path / "out"), *to])
    assert conv.exit_code == 1 and "holds a control character" in conv.stderr and not (tmp_path / "out").exists()
    (f,) = [f for f in check_path(path, target) if f.severity == "refuse"]
    assert f.modules == CTL_NAMES and "holds a control character" in f.problem and "(and 2 more)" in f.problem
    r = CliRunner().invoke(main, ["check", str(path), "--target", target])
    assert r.exit_code == 1 and "loads it as is" not in r.stdout and "refuse  names the export refuses" in r.stdout


@pytest.mark.parametrize("target", ["peft", "kohya"])
def test_check_passes_the_names_convert_writes(tmp_path: Path, target: str) -> None:
    path = _named(tmp_path, ["model.layers.0.\u202eself_attn.k_proj"])  # a format character: written (and shown escaped)
    conv = CliRunner().invoke(main, ["convert", str(path), str(tmp_path / "out"), "--to", target])
    assert conv.exit_code == 0, conv.stderr
    assert [f for f in check_path(path, target) if f.severity != "note"] == []


def test_check_peft_refuses_a_name_that_is_not_a_module_path(tmp_path: Path) -> None:
    path = _named(tmp_path, ["model..q_proj"])
    conv = CliRunner().invoke(main, ["convert", str(path), str(tmp_path / "out"), "--to", "peft"])
    assert conv.exit_code == 1 and "is not a module path" in conv.stderr
    (f,) = [f for f in check_path(path, "peft") if f.severity == "refuse"]
    assert f.modules == ["model..q_proj"] and "is not a module path (an empty part)" in f.problem


# --- N13: the nola fit refuses the ΔW rerank and bank fits refuse ------------------------------------------


def _peft_big_a(folder: Path) -> Path:
    """A PEFT folder (as /tmp/audit/bank_pt.py's ``bigA``) whose one A entry is 3e38: finite, but
    ΔW = 2·B·A is beyond float32, the dtype a nola record decodes to."""
    rng = np.random.default_rng(0)
    t = {}
    for i in range(2):
        n = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        t[n + ".lora_A.weight"] = rng.standard_normal((2, 16)).astype(np.float32)
        t[n + ".lora_B.weight"] = rng.standard_normal((16, 2)).astype(np.float32)
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] = 3e38
    folder.mkdir()
    save_file(t, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "base_model_name_or_path": "x/y"}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def test_nola_fit_refuses_a_delta_beyond_its_dtype_as_rerank_does(tmp_path: Path) -> None:
    src = _peft_big_a(tmp_path / "bigA")
    with pytest.raises(ConversionError, match=r"module 'model\.layers\.0\.self_attn\.q_proj': ΔW = scale·B·A is too large") as e:
        fit_adapter(read_peft(src), k=4)
    assert str(e.value).endswith("the limit for float32)")
    nola = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "n.apack"), "--to", "nola", "--k", "4"])
    rerank = CliRunner().invoke(main, ["rerank", str(src), str(tmp_path / "r.apack"), "--rank", "1"])
    assert nola.exit_code == rerank.exit_code == 1 and not (tmp_path / "n.apack").exists()
    assert nola.stderr == rerank.stderr == f"adapterpack: adapter 'default' {str(e.value).split(' ', 2)[2]}\n"
