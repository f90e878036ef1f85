"""Output hygiene: names, paths and messages never reach the terminal raw, and every output holds names to one rule.

A kohya file's module names are whatever its keys say: an OSC sequence (retitles the terminal), a
CSI sequence (clears it), a bidi override, a C1 control. Every human-readable line the CLI prints
shows them escaped; ``--json`` keeps them exact. Names ``.apack`` refuses (empty, over 1,024 code
points, a lone surrogate) are refused by every exporter too, as are keys a target cannot hold.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from adapterpack.adapter import Adapter, Module
from adapterpack.cli import main
from adapterpack.container.writer import write_apack
from adapterpack.errors import ConversionError, IndexFormatError
from adapterpack.formats.diffusers import write_diffusers
from adapterpack.formats.gguf import write_gguf
from adapterpack.formats.kohya import write_kohya
from adapterpack.formats.peft import write_peft
from adapterpack.formats.source import source_format
from adapterpack.text import json_printable, printable

#: Hostile module names, each with the escaped form a person sees.
HOSTILE = {
    "m0\x1b]0;pwned\x07": "m0\\x1b]0;pwned\\x07",
    "m1\x1b[2J": "m1\\x1b[2J",
    "m2\u202e": "m2\\u202e",
    "m3\x9b": "m3\\x9b",
}
HOSTILE_DIR = "dir\x1b[2J\u202e"


def raw_controls(text: str) -> list[str]:
    """Every control, format, surrogate or separator character in ``text`` other than a line feed."""
    return [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")]


def cli(*args: object) -> tuple[int, str, str]:
    """Run the CLI in-process with ANSI kept (click strips CSI sequences when it thinks stdout is no terminal)."""
    r = CliRunner().invoke(main, [str(a) for a in args], color=True)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r.exit_code, r.stdout, r.stderr


def kohya_file(folder: Path, names: list[str], scale: float = 1.0) -> Path:
    """A kohya LoRA file (rank 2, 8×8) whose modules have these names (kohya keeps a name without metadata as it is)."""
    rng = np.random.default_rng(0)
    tensors = {}
    for n in names:
        tensors[f"{n}.lora_down.weight"] = rng.standard_normal((2, 8)).astype(np.float32) * scale
        tensors[f"{n}.lora_up.weight"] = rng.standard_normal((8, 2)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"evil{scale:g}.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """A kohya file with the HOSTILE module names, in a folder whose name holds a CSI sequence."""
    return kohya_file(tmp_path / HOSTILE_DIR, list(HOSTILE))


def assert_escaped(text: str, *, names: bool = True, path: bool = True) -> None:
    """No raw control character; every hostile name (``names``) and the folder (``path``) shown escaped."""
    assert raw_controls(text) == []
    if names:
        for shown in HOSTILE.values():
            assert shown in text
    if path:
        assert "dir\\x1b[2J\\u202e" in text


# --- human-readable output --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("inspect",),
        ("inspect", "--spectrum"),
        ("rerank", "--rank", "1", "--dry-run"),
    ],
    ids=lambda a: " ".join(a),
)
def test_module_tables_escape_names(hostile: Path, args: tuple[str, ...]) -> None:
    code, stdout, stderr = cli(*args, hostile)
    assert code == 0, stderr
    assert_escaped(stdout + stderr, path=args[0] == "inspect")


def test_convert_check_verify_audit_escape(hostile: Path) -> None:
    apack = hostile.with_suffix(".apack")
    code, stdout, stderr = cli("convert", hostile, apack)
    assert code == 0, stderr
    assert_escaped(stdout, names=False)  # the wrote line names the path
    assert "no alpha tensor" in stdout and "m0\\x1b]0;pwned\\x07, m1\\x1b[2J, m2\\u202e" in stdout  # the note names 3 modules
    peft = hostile.parent / "peft"
    code, stdout, stderr = cli("convert", hostile, peft, "--to", "peft")
    assert code == 1 and not peft.exists()  # no model has a parameter whose name holds a control character
    assert stderr == (
        "adapterpack: the PEFT key 'base_model.model.m0\\x1b]0;pwned\\x07.lora_A.weight' holds a control character; "
        "no model has such a parameter\n"
    )
    code, stdout, stderr = cli("check", hostile, "--target", "peft")
    assert code == 1  # the names are no module paths a base model has
    assert raw_controls(stdout + stderr) == [] and "m0\\x1b]0;pwned\\x07" in stdout
    code, stdout, stderr = cli("verify", apack)
    assert code == 0, stderr
    assert_escaped(stdout, names=False)
    damaged = bytearray(apack.read_bytes())
    damaged[-3] ^= 0xFF
    bad = apack.with_name("damaged.apack")
    bad.write_bytes(bytes(damaged))
    code, stdout, stderr = cli("verify", bad)
    assert code == 1 and "checksum" in stdout
    assert_escaped(stdout, names=False)
    for fmt in ((), ("--csv",)):
        code, stdout, stderr = cli("audit", *fmt, hostile.parent)
        assert code == 1  # the damaged file is reported as failed
        assert_escaped(stdout + stderr, names=False)
        assert "damaged.apack" in stdout


def test_bank_member_names_escaped(hostile: Path) -> None:
    other = kohya_file(hostile.parent, list(HOSTILE), scale=2.0)
    bank = hostile.parent / "bank.apack"
    code, stdout, stderr = cli("bank", "build", bank, hostile, other, "--name", "a\x1b[2J", "--name", "b\u202e", "--rank", "2")
    assert code == 0, stderr
    assert raw_controls(stdout + stderr) == []
    code, stdout, stderr = cli("bank", "list", bank)
    assert code == 0, stderr
    assert raw_controls(stdout) == [] and "a\\x1b[2J" in stdout and "b\\u202e" in stdout


def test_demo_paths_escaped(tmp_path: Path) -> None:
    code, stdout, stderr = cli("demo", "--out", tmp_path / HOSTILE_DIR)
    assert code == 0, stderr
    assert "all checks passed" in stdout
    own_style = stdout.replace("\x1b[1m", "").replace("\x1b[0m", "")  # the demo's step titles are bold
    assert_escaped(own_style + stderr, names=False)


def test_error_line_escaped(tmp_path: Path) -> None:
    code, stdout, stderr = cli("inspect", tmp_path / "nope\x1b]0;pwned\x07")
    assert code == 1 and stdout == ""
    assert stderr.startswith("adapterpack: ") and stderr.count("\n") == 1
    assert raw_controls(stderr) == [] and "nope\\x1b]0;pwned\\x07" in stderr


def test_usage_error_escaped(tmp_path: Path) -> None:
    """click's own usage errors quote the command line; they are escaped too."""
    code, stdout, stderr = cli("audit", "--measure", "zstd,\x1b]0;pwned\x07", tmp_path)
    assert code == 2 and stdout == ""
    assert raw_controls(stderr) == [] and "unknown \\x1b]0;pwned\\x07 (choose from" in stderr


def test_resolver_warning_escaped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The vLLM resolver logs why it cannot serve an adapter; the message is escaped (a path can hold anything)."""
    import asyncio

    from adapterpack.errors import InputError
    from adapterpack.formats import vllm_resolver

    def refuse(*_: object) -> None:
        raise InputError(f"{tmp_path / HOSTILE_DIR}: not an adapter")

    res = vllm_resolver.ApackResolver(tmp_path, tmp_path / "cache", make_request=lambda *a: a)
    monkeypatch.setattr(res, "materialize", refuse)
    with caplog.at_level("WARNING", logger=vllm_resolver.__name__):
        assert asyncio.run(res.resolve_lora("base", "x")) is None
    [message] = [r.getMessage() for r in caplog.records]
    assert raw_controls(message) == [] and message.endswith("dir\\x1b[2J\\u202e: not an adapter")


# --- JSON stays exact ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [("inspect", "--json"), ("audit", "--json")], ids=lambda a: " ".join(a))
def test_json_exact_and_escaped(hostile: Path, args: tuple[str, ...]) -> None:
    code, stdout, stderr = cli(*args, hostile)
    assert code == 0, stderr
    assert raw_controls(stdout) == []  # json.dumps leaves DEL, C1 and format characters raw
    report = json.loads(stdout)
    if args[0] == "inspect":
        assert report["path"] == str(hostile)
        assert [r["name"] for r in report["adapters"][0]["modules"]] == list(HOSTILE)
    else:
        assert [r["path"] for r in report["inputs"]] == [str(hostile)]


def test_printable_forms() -> None:
    assert printable("a\x00\x1b\x7f\x9b\u200b\u202e\u2028\ud800\U000e0001é‖Δ\\x") == (
        "a\\x00\\x1b\\x7f\\x9b\\u200b\\u202e\\u2028\\ud800\\U000e0001é‖Δ\\x"
    )
    assert printable(printable("\x1b[2J")) == "\\x1b[2J"
    text = json.dumps({"k\u202e": ["\x7f\x9b\ud800\U000e0001", "\n\t"]}, indent=2, ensure_ascii=False)
    safe = json_printable(text)
    assert raw_controls(safe) == [] and json.loads(safe) == json.loads(text)


# --- one name rule for every output ----------------------------------------------------------------------


def _adapter(name: str) -> Adapter:
    a = np.ones((2, 8), np.float32)
    b = np.ones((8, 2), np.float32)
    m = Module(name, "lora", (8, 8), {"rank": 2, "alpha": 2.0}, {"A": a, "B": b})
    return Adapter(base_model="toy/base", modules={name: m})


WRITERS = {
    "peft": lambda ad, p: write_peft(ad, p),
    "kohya": lambda ad, p: write_kohya(ad, p),
    "diffusers": lambda ad, p: write_diffusers(ad, p),
    "gguf": lambda ad, p: write_gguf(ad, p),
}
REFUSED_NAMES = {
    "empty": ("", r"module name '' must be 1–1024 characters, not 0"),
    "5000": ("unet." + "x" * 4995, r"module name 'unet\.x+ must be 1–1024 characters, not 5,000"),
    "surrogate": ("unet.a\ud800", r"module name .* holds a lone surrogate \(\\ud800 at 6\)"),
}


@pytest.mark.parametrize("target", WRITERS)
@pytest.mark.parametrize("case", REFUSED_NAMES)
def test_exporters_refuse_names_apack_refuses(tmp_path: Path, target: str, case: str) -> None:
    name, message = REFUSED_NAMES[case]
    ad = _adapter(name)
    with pytest.raises(IndexFormatError):
        write_apack(tmp_path / "x.apack", ad)  # the rule every output follows
    dst = tmp_path / f"adapter.{target}"
    with pytest.raises(ConversionError, match=message):
        WRITERS[target](ad, dst)
    assert list(tmp_path.iterdir()) == []


def test_pass_through_names_refused(tmp_path: Path) -> None:
    ad = _adapter("model.q_proj")
    ad.tensors["x" * 1025] = np.zeros(1, np.float32)
    ad.source = {"format": "peft"}
    assert source_format(ad) == "peft"
    with pytest.raises(ConversionError, match=r"tensor name 'x+ must be 1–1024 characters, not 1,025"):
        write_peft(ad, tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_cli_convert_refuses_empty_kohya_name(tmp_path: Path) -> None:
    """A kohya key ``.lora_down.weight`` gives a module named ''; no output may hold it."""
    src = kohya_file(tmp_path / "in", [""])
    refusal = {
        "peft": "module name '' must be 1–1024 characters, not 0",
        "kohya": "module name '' must be 1–1024 characters, not 0",
        "apack": f"cannot write {tmp_path / 'a.apack'}: adapter 'default' module 0: 'name' must be 1–1024 characters, not 0",
    }
    for to, dst in (("peft", tmp_path / "p"), ("kohya", tmp_path / "k.safetensors"), ("apack", tmp_path / "a.apack")):
        code, stdout, stderr = cli("convert", src, dst, "--to", to)
        assert code == 1 and not dst.exists() and stdout == ""
        assert stderr == f"adapterpack: {refusal[to]}\n"


# --- keys a target cannot hold ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "name", "message"),
    [
        ("peft", "model.layers.0.lora_A.q", r"is not a module path \(the part 'lora_A'\)"),
        ("peft", "model..q_proj", r"is not a module path \(an empty part\)"),
        ("diffusers", "unet.lora_B.to_q", r"is not a module path \(the part 'lora_B'\)"),
        ("peft", "model.q\x00proj", r"key 'base_model\.model\.model\.q\\x00proj\.lora_A\.weight' holds a control character"),
        ("kohya", "lora_unet_q\x00proj", r"key 'lora_unet_q\\x00proj\.lora_down\.weight' holds a control character"),
        ("diffusers", "unet.q\x1bproj", r"key 'unet\.q\\x1bproj\.lora_A\.weight' holds a control character"),
    ],
)
def test_key_grammar(tmp_path: Path, target: str, name: str, message: str) -> None:
    dst = tmp_path / f"out.{target}"
    with pytest.raises(ConversionError, match=message):
        WRITERS[target](_adapter(name), dst)
    assert list(tmp_path.iterdir()) == []


def test_kohya_name_with_dot_refused(tmp_path: Path) -> None:
    """kohya splits a key at its first '.': a prefix holding one would make another module of it."""
    with pytest.raises(ConversionError, match=r"kohya name 'lora\.unet_model_q_proj' holds a '\.'"):
        write_kohya(_adapter("model.q_proj"), tmp_path / "k.safetensors", prefix="lora.unet")
    assert list(tmp_path.iterdir()) == []
