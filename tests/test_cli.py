"""The ``adapterpack`` command line: outputs match the files, exit codes, one-line errors, no torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner, Result

import adapterpack
from adapterpack import Adapter
from adapterpack.cli import main
from adapterpack.cli.output import vocabulary
from adapterpack.container.preamble import MINOR
from adapterpack.container.reader import ApackReader
from adapterpack.examples import example_path
from adapterpack.ops.convert import adapter_differences
from adapterpack.ops.report import inspect_path
from tests.factories import qv_adapter

REPO = Path(__file__).resolve().parent.parent


def toy(seed: int = 0) -> Adapter:
    return qv_adapter(seed, layers=2, rank=8, in_features=48, q_out=64, v_out=32, b_scale=0.02)


@pytest.fixture
def apack(tmp_path: Path) -> Path:
    path = tmp_path / "toy.apack"
    adapterpack.save(toy(), path)
    return path


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(r: Result, needle: str) -> None:
    assert r.exit_code == 1, r.output
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("adapterpack: ") and needle in lines[0], r.stderr


# --- inspect --------------------------------------------------------------------------------------


def test_inspect_table_lists_every_module_and_true_totals(apack: Path) -> None:
    r = run("inspect", apack)
    assert r.exit_code == 0, r.output
    blobs = ApackReader(apack).blobs
    stored = sum(b.stored_length for b in blobs)
    decoded = sum(b.length for b in blobs)
    lines = r.stdout.splitlines()
    for name, m in toy().modules.items():
        (row,) = [line for line in lines if line.startswith(name + " ")]
        assert row.split()[1:7] == ["lora", "8", "16", "2", f"{m.base_shape[0]}x48", "float32"]  # rank, alpha, scale
    assert f"{stored:,} B" in r.stdout and f"{decoded:,} B" in r.stdout
    assert "4 modules" in r.stdout and f"{4 * 8 * 48 + 2 * 64 * 8 + 2 * 32 * 8:,} parameters" in r.stdout
    assert f"{apack.stat().st_size:,} B" in r.stdout
    assert f"compression {decoded / stored:.2f}x" in r.stdout
    assert f"format 1.{MINOR}" in r.stdout and "pco x8" in r.stdout
    # index and padding bytes, total and per tensor (1.3: a zstd-compressed index, compressed blobs packed)
    with ApackReader(apack) as reader:
        index, text = reader.preamble.index_length, reader.index_text_length
        padding = apack.stat().st_size - 32 - index - stored
    assert f"index    {index:,} B (zstd of {text:,} B of JSON), {index / len(blobs):.1f} B/tensor" in r.stdout
    assert f"padding  {padding:,} B, {padding / len(blobs):.1f} B/tensor (compressed blobs packed)" in r.stdout


def test_inspect_json_is_the_report(apack: Path) -> None:
    r = run("inspect", apack, "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout) == {"ok": True, **vocabulary(json.loads(json.dumps(inspect_path(apack))))}


def test_inspect_missing_file_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run("inspect", tmp_path / "nope.apack"), "nope.apack")


def test_inspect_garbage_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.apack"
    bad.write_bytes(b"this is not an adapter at all, not even close")
    assert_one_line_error(run("inspect", bad), "magic")


# --- convert --------------------------------------------------------------------------------------


def test_convert_bf16_reports_errors_matching_dense_reference(apack: Path, tmp_path: Path) -> None:
    r = run("convert", apack, tmp_path / "bf16.apack", "--dtype", "bf16", "--json")
    assert r.exit_code == 0, r.output
    (cast,) = json.loads(r.stdout)["casts"]
    max_err = err2 = norm2 = 0.0
    for m in toy():
        a, b = m.tensors["A"].astype(np.float64), m.tensors["B"].astype(np.float64)
        a2 = m.tensors["A"].astype(ml_dtypes.bfloat16).astype(np.float64)
        b2 = m.tensors["B"].astype(ml_dtypes.bfloat16).astype(np.float64)
        max_err = max(max_err, np.abs(a - a2).max(), np.abs(b - b2).max())
        d, d2 = 2.0 * b @ a, 2.0 * b2 @ a2
        err2 += np.linalg.norm(d - d2) ** 2
        norm2 += np.linalg.norm(d) ** 2
        (mc,) = [x for x in cast["modules"] if x["name"] == m.name]
        assert mc["delta_rel_error"] == pytest.approx(np.linalg.norm(d - d2) / np.linalg.norm(d), rel=1e-6)
    assert cast["max_abs_error"] == max_err
    assert cast["delta_rel_error"] == pytest.approx(math.sqrt(err2 / norm2), rel=1e-6)
    assert cast["tensors_cast"] == 8
    # the text form prints the same numbers
    r = run("convert", apack, tmp_path / "bf16b.apack", "--dtype", "bf16")
    assert r.exit_code == 0
    assert f"max |value change| {max_err:.3e}" in r.stdout
    assert f"relative Frobenius error of ΔW {math.sqrt(err2 / norm2):.3e}" in r.stdout
    with adapterpack.open(tmp_path / "bf16b.apack") as out:
        assert {out.modules[n].tensors["A"].dtype for n in out.modules} == {"bfloat16"}


def test_convert_prints_sizes(apack: Path, tmp_path: Path) -> None:
    dst = tmp_path / "raw.apack"
    r = run("convert", apack, dst, "--codec", "raw")
    assert r.exit_code == 0, r.output
    assert f"{apack.stat().st_size:,} B" in r.stdout and f"{dst.stat().st_size:,} B" in r.stdout
    assert f"ratio {apack.stat().st_size / dst.stat().st_size:.2f}x" in r.stdout
    assert "(apack, raw)" in r.stdout  # raw has no level to report
    r = run("convert", apack, tmp_path / "bp.apack")
    assert "(apack, pco level 8)" in r.stdout  # the default codec at its default level


def test_convert_refuses_to_overwrite(apack: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out.apack"
    dst.write_bytes(b"keep")
    assert_one_line_error(run("convert", apack, dst), "already exists")
    assert dst.read_bytes() == b"keep"
    r = run("convert", apack, dst, "--force")
    assert r.exit_code == 0 and dst.read_bytes()[:4] == b"\x89APK"


@pytest.mark.parametrize(
    "extra",
    [
        ["--to", "kohya"],  # out.apack names an .apack file
        ["--dtype", "fp8"],
        ["--level", "0"],
    ],
)
def test_convert_usage_errors_exit_2(apack: Path, tmp_path: Path, extra: list[str]) -> None:
    r = run("convert", apack, tmp_path / "out.apack", *extra)
    assert r.exit_code == 2 and "Usage:" in r.stderr
    assert not (tmp_path / "out.apack").exists()


def test_convert_codec_for_peft_is_a_usage_error(apack: Path, tmp_path: Path) -> None:
    r = run("convert", apack, tmp_path / "folder", "--codec", "zstd")
    assert r.exit_code == 2 and "--codec" in r.stderr


def test_convert_round_trip_through_peft(apack: Path, tmp_path: Path) -> None:
    assert run("convert", apack, tmp_path / "peft").exit_code == 0
    r = run("convert", tmp_path / "peft", tmp_path / "back.apack", "--codec", "zstd", "--level", "9")
    assert r.exit_code == 0, r.output
    assert "from " in r.stdout and "(peft)" in r.stdout
    with adapterpack.open(apack) as a, adapterpack.open(tmp_path / "back.apack") as b:
        assert adapter_differences(a, b) == []


def test_convert_round_trip_through_kohya(apack: Path, tmp_path: Path) -> None:
    r = run("convert", apack, tmp_path / "k.safetensors")
    assert r.exit_code == 0, r.output
    assert "(kohya)" in r.stdout
    assert run("convert", tmp_path / "k.safetensors", tmp_path / "back.apack").exit_code == 0
    with adapterpack.open(apack) as a, adapterpack.open(tmp_path / "back.apack") as b:
        assert adapter_differences(a, b) == []


def test_kohya_notes_are_printed(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    kohya = tmp_path / "k.safetensors"
    save_file(
        {"lora_unet_x.lora_down.weight": np.ones((2, 4), np.float32), "lora_unet_x.lora_up.weight": np.ones((3, 2), np.float32)},
        kohya,
    )
    r = run("convert", kohya, tmp_path / "k.apack")
    assert r.exit_code == 0, r.output
    (note,) = [line for line in r.stdout.splitlines() if line.startswith("note")]
    assert "no alpha" in note and "lora_unet_x" in note
    r = run("inspect", kohya)
    assert r.exit_code == 0 and note in r.stdout and "kohya" in r.stdout


# --- verify ---------------------------------------------------------------------------------------


def test_verify_good_file(apack: Path) -> None:
    r = run("verify", apack)
    assert r.exit_code == 0 and f": ok (format 1.{MINOR}, 8 blobs" in r.stdout
    r = run("verify", apack, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True


def corrupt_one_blob_byte(path: Path) -> None:
    reader = ApackReader(path)
    b = reader.blobs[2]
    pos = reader.data_start + b.offset + b.stored_length // 2
    reader.close()
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_flipped_byte_names_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "raw.apack"
    adapterpack.save(toy(), path, codec="raw")
    corrupt_one_blob_byte(path)
    r = run("verify", path)
    assert r.exit_code == 1
    assert "1 problem" in r.stdout and "blob 2 (module 'model.layers.0.self_attn.v_proj' A): checksum mismatch" in r.stdout
    r = run("verify", path, "--json")
    assert r.exit_code == 1 and [f["message"] for f in json.loads(r.stdout)["findings"]] == [
        "blob 2 (module 'model.layers.0.self_attn.v_proj' A): checksum mismatch (decoded bytes are corrupt)"
    ]


def test_verify_flipped_byte_in_compressed_blob_fails(apack: Path) -> None:
    corrupt_one_blob_byte(apack)
    r = run("verify", apack)
    assert r.exit_code == 1 and "blob 2 (module 'model.layers.0.self_attn.v_proj' A):" in r.stdout


def test_verify_unopenable_files(tmp_path: Path) -> None:
    assert_one_line_error(run("verify", tmp_path / "missing.apack"), "no such file or folder")
    short = tmp_path / "short.apack"
    short.write_bytes(b"\x89APK\r\n")
    assert_one_line_error(run("verify", short), "short.apack")


# --- demo and the installed entry points -----------------------------------------------------------


def test_demo_passes_every_check(tmp_path: Path) -> None:
    r = run("demo", "--out", tmp_path / "demo")
    assert r.exit_code == 0, r.output
    assert "FAIL" not in r.stdout and "all checks passed" in r.stdout
    assert r.stdout.count("[ok  ]") == 6
    packed = tmp_path / "demo" / "smollm2-pydoc-lora.apack"
    with adapterpack.open(packed) as a, adapterpack.open(example_path()) as p:
        assert adapter_differences(a, p) == []


def test_python_m_adapterpack_end_to_end(apack: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "adapterpack", "inspect", str(apack), "--json"], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total"]["module_count"] == 4
    r = subprocess.run(
        [sys.executable, "-m", "adapterpack", "verify", str(tmp_path / "nope")], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [f"adapterpack: {tmp_path / 'nope'}: no such file or folder"]


def test_cli_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from adapterpack.cli import main\n"
        f"ex, out = {str(example_path())!r}, {str(tmp_path / 'x.apack')!r}\n"
        "for args in (['inspect', ex], ['convert', ex, out], ['verify', out], ['demo']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x.apack").is_file()


# --- dead ends and polish ----------------------------------------------------------------------------


def test_drop_tensors_flag(tmp_path: Path) -> None:
    a = toy()
    a.tensors["base_model.model.lm_head.weight"] = np.ones((3, 48), np.float32)
    a.source = {"format": "peft"}
    src = tmp_path / "a.apack"
    adapterpack.save(a, src)
    r = run("convert", src, tmp_path / "k.safetensors")
    assert_one_line_error(r, "--drop-tensors")
    assert not (tmp_path / "k.safetensors").exists()
    r = run("convert", src, tmp_path / "k.safetensors", "--drop-tensors")
    assert r.exit_code == 0, r.output
    with adapterpack.open(tmp_path / "k.safetensors") as k:
        assert k.tensors == {} and adapter_differences(toy(), k) == []
    r = run("convert", src, tmp_path / "b.apack", "--drop-tensors")
    assert r.exit_code == 2 and "--drop-tensors applies to PEFT and kohya output only" in r.stderr


def test_kohya_names_to_peft_are_resolved_or_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    kohya = tmp_path / "k.safetensors"
    save_file(
        {
            "lora_unet_x.lora_down.weight": np.ones((2, 4), np.float32),
            "lora_unet_x.lora_up.weight": np.ones((3, 2), np.float32),
            "lora_unet_x.alpha": np.array(2.0, np.float32),
        },
        kohya,
    )
    r = run("convert", kohya, tmp_path / "peft")
    # a PEFT folder under kohya names attaches to nothing: refused (issue 16), naming the module and the ways out
    assert r.exit_code == 1 and "'lora_unet_x'" in r.stderr and "--base" in r.stderr and "diffusers output" in r.stderr, r.output
    assert not (tmp_path / "peft").exists()


def test_one_module_is_singular(tmp_path: Path) -> None:
    a = toy()
    for n in list(a.modules)[1:]:
        del a.modules[n]
    adapterpack.save(a, tmp_path / "one.apack")
    r = run("inspect", tmp_path / "one.apack")
    assert "totals   1 module, " in r.stdout


def test_raw_codec_hint(apack: Path, tmp_path: Path) -> None:
    r = run("convert", apack, tmp_path / "b.apack")
    hints = [line for line in r.stdout.splitlines() if line.startswith("hint")]
    assert len(hints) == 1 and "--codec raw" in hints[0] and "zero-copy" in hints[0]
    r = run("convert", apack, tmp_path / "c.apack", "--codec", "raw")
    assert r.exit_code == 0 and not [line for line in r.stdout.splitlines() if line.startswith("hint")]
    r = run("convert", apack, tmp_path / "peft")
    assert r.exit_code == 0 and "--codec raw" not in r.stdout


def test_force_onto_peft_folder_keeps_readme(apack: Path, tmp_path: Path) -> None:
    dst = tmp_path / "peft"
    assert run("convert", apack, dst).exit_code == 0
    (dst / "README.md").write_text("card")
    (dst / "tokenizer.json").write_text("{}")
    r = run("convert", apack, dst, "--force")
    assert r.exit_code == 0, r.output
    assert (dst / "README.md").read_text() == "card" and (dst / "tokenizer.json").read_text() == "{}"


def test_the_cli_keeps_freed_memory_where_glibc_allows() -> None:
    """mallopt is glibc's: on glibc it must take (a re-rank's page faults depend on it), elsewhere it is a no-op."""
    import platform

    from adapterpack.cli.process import keep_freed_memory

    assert keep_freed_memory() is (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")


def test_every_cli_command_sets_the_allocator_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import adapterpack.cli as cli

    calls: list[int] = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    r = CliRunner().invoke(main, ["inspect", str(example_path())])
    assert r.exit_code == 0, r.output
    assert calls == [1]
