"""``adapterpack audit``: every figure equals what the real files take, on the real bundled adapter."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

import adapterpack
from adapterpack.adapter import Adapter
from adapterpack.cli import main
from adapterpack.encodings.lower import as_svd
from adapterpack.examples import example_path
from adapterpack.ops.audit import VARIANTS, apack_size, audit_input, audit_paths, find_inputs
from tests.factories import qv_adapter

EXAMPLE = example_path()
REPO = Path(__file__).resolve().parent.parent


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def convert(src: Path, dst: Path, *extra: str) -> int:
    """Size of the file (folder: adapter files) the real ``adapterpack convert`` writes."""
    r = run("convert", src, dst, *extra)
    assert r.exit_code == 0, r.output
    from adapterpack.ops.report import footprint

    return footprint(dst)


def energy_rank(s: np.ndarray, fraction: float) -> int:
    e = s.astype(np.float64) ** 2
    return next(k for k in range(len(e) + 1) if e[:k].sum() >= fraction * e.sum() * (1 - 1e-12))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled PEFT folder, its kohya and .apack conversions, a broken .apack and a model file."""
    root = tmp_path_factory.mktemp("audit")
    shutil.copytree(EXAMPLE, root / "peft" / "example")
    (root / "runs" / "a").mkdir(parents=True)
    convert(EXAMPLE, root / "runs" / "a" / "kohya.safetensors")
    convert(EXAMPLE, root / "runs" / "a" / "bf16.apack", "--dtype", "bf16")
    good = (root / "runs" / "a" / "bf16.apack").read_bytes()
    (root / "runs" / "broken.apack").write_bytes(good[:5000])
    from safetensors.numpy import save_file

    save_file({"model.embed.weight": np.zeros((4, 3), np.float32)}, str(root / "runs" / "model.safetensors"))
    return root


@pytest.fixture(scope="module")
def example_audit() -> dict:
    return audit_input(EXAMPLE).as_dict()


# --- the figures are the sizes of real files ----------------------------------------------------------


def test_codec_and_bf16_sizes_equal_files_convert_writes(example_audit: dict, tmp_path: Path) -> None:
    a = example_audit
    assert a["ok"] and a["format"] == "peft" and a["adapters"] == ["default"]
    written = {
        "zstd": convert(EXAMPLE, tmp_path / "z.apack", "--codec", "zstd"),
        "byteplanes": convert(EXAMPLE, tmp_path / "b.apack", "--codec", "byteplanes"),
        "bf16": convert(EXAMPLE, tmp_path / "h.apack", "--dtype", "bf16"),
    }
    for v, size in written.items():
        assert a["sizes"][v] == size, v
        assert a["saved"][v] == a["bytes"] - size
    on_disk = sum(p.stat().st_size for p in EXAMPLE.iterdir() if p.name in ("adapter_config.json", "adapter_model.safetensors"))
    assert a["bytes"] == on_disk
    real = adapterpack.open(EXAMPLE)
    assert a["parameters"] == sum(m.array("A").size + m.array("B").size for m in real) == 921_600
    assert a["modules"] == 120 and a["dtype"] == "float32" and a["encoding"] == "lora"
    assert a["rank"] == {"min": 8, "median": 8, "max": 8}


def test_energy_variants_equal_files_rerank_writes_and_dense_ranks(tmp_path: Path) -> None:
    """energy99/95: ranks from a dense numpy SVD of ΔW; sizes of what ``adapterpack rerank --energy`` writes."""
    res = audit_input(EXAMPLE)
    real = adapterpack.open(EXAMPLE)
    names = list(real.modules)
    # the dense reference (a full numpy SVD of ΔW) for a few modules: dense SVDs are what costs here
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.4.self_attn.k_proj", "model.layers.17.self_attn.v_proj"):
        i = names.index(name)
        f = real.module(name).factors()
        s = np.linalg.svd(f.scale * (f.B.astype(np.float64) @ f.A.astype(np.float64)), compute_uv=False)
        assert res.energy_ranks["energy99"][i] == energy_rank(s, 0.99), name
        assert res.energy_ranks["energy95"][i] == energy_rank(s, 0.95), name
    for v, frac in (("energy99", "0.99"), ("energy95", "0.95")):
        dst = tmp_path / f"{v}.apack"
        r = run("rerank", EXAMPLE, dst, "--energy", frac, "--json")
        assert r.exit_code == 0, r.output
        assert res.sizes[v] == dst.stat().st_size, v
        plans = {p["name"]: p for p in json.loads(r.stdout)["modules"]}
        assert [plans[n]["new_rank"] for n in names] == res.energy_ranks[v]
        cut = adapterpack.open(dst)
        assert sum(m.summary()["rank"] < 8 for m in cut) > 60  # most modules really are cut
    d = res.as_dict()
    r99 = sorted(res.energy_ranks["energy99"])
    assert d["rank_99"] == {"min": r99[0], "median": r99[(len(r99) - 1) // 2], "max": r99[-1]}
    assert d["rank_99"]["min"] < d["rank_99"]["max"]


def test_svd_input_reads_singular_values(tmp_path: Path) -> None:
    """An .apack of svd records: the same energy ranks as the lora it came from; sizes are what rerank writes."""
    real = adapterpack.open(EXAMPLE)
    svd = Adapter(name="default", base_model=real.base_model, modules={n: as_svd(m) for n, m in real.modules.items()})
    path = tmp_path / "svd.apack"
    adapterpack.save(svd, path)
    res = audit_input(path)
    assert res.ok, res.error
    assert res.energy_ranks == audit_input(EXAMPLE).energy_ranks
    r = run("rerank", path, tmp_path / "cut.apack", "--energy", "0.95")
    assert r.exit_code == 0, r.output
    assert res.sizes["energy95"] == (tmp_path / "cut.apack").stat().st_size
    assert res.as_dict()["encoding"] == "svd"


def test_mixed_dtype_adapter_energy_sizes(tmp_path: Path) -> None:
    """Modules of different dtypes (q in bf16, v in fp32): each re-ranked record keeps its module's dtype."""
    from adapterpack.dtypes import cast_array
    from adapterpack.ops.rerank import RerankPolicy, rerank

    a = qv_adapter(3, layers=2, rank=6, in_features=40, q_out=48, v_out=24, b_scale=0.02)
    for m in a:
        if m.name.endswith("q_proj"):
            m.tensors = {s: cast_array(t, "bfloat16")[0] for s, t in m.tensors.items()}
    path = tmp_path / "mixed.apack"
    adapterpack.save(a, path)
    res = audit_input(path)
    assert res.ok and res.as_dict()["dtype"] == "bfloat16/float32"  # by tensor count, ties in module order
    for v, frac in (("energy99", 0.99), ("energy95", 0.95)):
        out, _ = rerank(adapterpack.open(path), RerankPolicy(energy=frac))
        assert {m.array("Ut").dtype.name for m in out} == {"bfloat16", "float32"}
        assert res.sizes[v] == adapterpack.save(out, tmp_path / f"{v}.apack").file_size


def test_multi_adapter_apack_is_one_row(tmp_path: Path) -> None:
    a, b = (
        qv_adapter(1, name="one", layers=2, rank=4, in_features=40, q_out=48, v_out=24, b_scale=0.02),
        qv_adapter(2, name="two", layers=3, rank=6, in_features=40, q_out=48, v_out=24, b_scale=0.02),
    )
    path = tmp_path / "two.apack"
    adapterpack.save([a, b], path, codec="raw")
    d = audit_input(path).as_dict()
    assert d["adapters"] == ["one", "two"] and d["modules"] == 10 and d["bytes"] == path.stat().st_size
    assert d["rank"] == {"min": 4, "median": 6, "max": 6}
    assert d["sizes"]["zstd"] == adapterpack.save([a, b], tmp_path / "z.apack", codec="zstd").file_size
    planes = adapterpack.save([a, b], tmp_path / "p.apack", codec="byteplanes").file_size
    assert d["sizes"]["byteplanes"] == apack_size([a, b], "byteplanes") == planes
    assert apack_size([a, b]) == adapterpack.save([a, b], tmp_path / "d.apack").file_size  # the default codec, both


# --- many inputs: walking, globs, failures -----------------------------------------------------------


def test_walk_finds_each_adapter_once_and_skips_non_adapters(tree: Path) -> None:
    found = find_inputs([tree, tree / "runs" / "a" / "bf16.apack"])  # named twice: audited once
    rel = [str(p.relative_to(tree)) for p in found.inputs]
    assert rel == ["peft/example", "runs/broken.apack", "runs/a/bf16.apack", "runs/a/kohya.safetensors"]
    assert [(Path(p).name, why) for p, why in found.skipped] == [("model.safetensors", "safetensors file with no LoRA tensors")]
    assert found.missing == []


def test_broken_file_among_good_ones(tree: Path) -> None:
    r = run("audit", tree, "--json", "--jobs", "1")
    assert r.exit_code == 1  # one input failed
    report = json.loads(r.stdout)
    rows = {Path(x["path"]).name: x for x in report["inputs"]}
    assert set(rows) == {"example", "broken.apack", "bf16.apack", "kohya.safetensors"}
    bad = rows["broken.apack"]
    assert bad["ok"] is False and set(bad) == {"path", "ok", "format", "error"}
    assert bad["error"]["type"].endswith("Error")
    assert "\n" not in bad["error"]["message"] and "5000" in bad["error"]["message"]  # cut at byte 5000
    assert all(x["ok"] for n, x in rows.items() if n != "broken.apack")
    # the bf16 .apack is in bf16 with the default codec already: re-encoding it so gives the same bytes
    h = rows["bf16.apack"]
    assert h["bytes"] == h["sizes"]["bf16"] and h["saved"]["bf16"] == 0
    # the kohya file holds the same tensors: the same parameters and ranks as the PEFT folder
    k, p = rows["kohya.safetensors"], rows["example"]
    assert k["format"] == "kohya" and k["parameters"] == p["parameters"] and k["rank_99"] == p["rank_99"]
    assert k["bytes"] == (tree / "runs" / "a" / "kohya.safetensors").stat().st_size
    t = report["total"]
    good = [x for x in report["inputs"] if x["ok"]]
    assert t["inputs"] == 4 and t["failed"] == 1 and t["adapters"] == 3 and t["module_count"] == 360
    assert t["bytes"] == sum(x["bytes"] for x in good)
    for v in VARIANTS:
        assert t["sizes"][v] == sum(x["sizes"][v] for x in good) and t["saved"][v] == t["bytes"] - t["sizes"][v]
    assert report["skipped"] == [
        {"path": str(tree / "runs" / "model.safetensors"), "reason": "safetensors file with no LoRA tensors"}
    ]


def test_table_output(tree: Path) -> None:
    r = run("audit", tree, "-j", "1")
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert lines[0].split() == [
        "input",
        "format",
        "dtype",
        "encoding",
        "rank",
        "r99",
        "r95",
        "size",
        "zstd",
        "byteplanes",
        "bf16",
        "e99",
        "e95",
    ]
    assert sum(line.startswith(str(tree)) for line in lines) == 3
    assert any(line.startswith("failed   ") and "broken.apack" in line for line in lines)
    assert any(line.startswith("total    3 inputs (3 adapters, 360 modules)") for line in lines)
    assert any(line.startswith("skipped  1 file") for line in lines)


def test_csv_matches_json(tree: Path) -> None:
    j = json.loads(run("audit", tree, "--json", "-j", "1").stdout)
    r = run("audit", tree, "--csv", "-j", "1")
    assert r.exit_code == 1
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == len(j["inputs"]) == 4
    header = next(csv.reader(io.StringIO(r.stdout)))
    assert header[:3] == ["path", "ok", "error"] and "energy99_bytes" in header and "bf16_saved" in header
    for row, want in zip(rows, j["inputs"]):
        assert row["path"] == want["path"] and row["ok"] == str(int(want["ok"]))
        if want["ok"]:
            assert int(row["bytes"]) == want["bytes"] and int(row["rank_99_median"]) == want["rank_99"]["median"]
            for v in VARIANTS:
                assert int(row[f"{v}_bytes"]) == want["sizes"][v] and int(row[f"{v}_saved"]) == want["saved"][v]
        else:
            assert row["error"] == want["error"]["message"] and row["bytes"] == ""


def test_globs(tree: Path) -> None:
    r = run("audit", f"{tree}/**/*.apack", f"{tree}/nothing-*.apack", "--json", "-j", "1")
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert [Path(x["path"]).name for x in report["inputs"]] == ["bf16.apack", "broken.apack"]  # sorted matches
    assert report["missing"] == [
        {"path": f"{tree}/nothing-*.apack", "error": {"type": "InputError", "message": "no file or folder matches this pattern"}}
    ]
    ok = run("audit", f"{tree}/runs/a/*", "--json", "-j", "1")
    assert ok.exit_code == 0, ok.output  # all good: exit 0
    assert [Path(x["path"]).name for x in json.loads(ok.stdout)["inputs"]] == ["bf16.apack", "kohya.safetensors"]


def test_missing_path_and_mutually_exclusive_outputs(tmp_path: Path) -> None:
    r = run("audit", tmp_path / "nope", "--json", "-j", "1")
    assert r.exit_code == 1 and json.loads(r.stdout)["missing"][0]["error"]["message"] == "no such file or folder"
    r = CliRunner().invoke(main, ["audit", str(EXAMPLE), "--json", "--csv"])
    assert r.exit_code == 2 and "exclude each other" in r.stderr


def test_parallel_audit_equals_serial(tree: Path) -> None:
    def strip(report: dict) -> dict:
        for x in report["inputs"]:
            x.pop("seconds", None)
        report["totals"].pop("seconds")
        return report

    assert strip(audit_paths([tree], jobs=2)) == strip(audit_paths([tree], jobs=1))


def test_audit_and_spectrum_never_import_torch(tree: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from adapterpack.cli import main\n"
        f"for args in (['audit', {str(tree)!r}, '--json', '-j', '1'], ['inspect', {str(EXAMPLE)!r}, '--spectrum']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, 1), e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr


def test_measure_picks_the_alternatives() -> None:
    full = audit_input(EXAMPLE)
    none = audit_input(EXAMPLE, measure=())
    assert none.sizes == {} and none.energy_ranks == full.energy_ranks  # ranks from the spectra alone, the same
    some = json.loads(run("audit", EXAMPLE, "--measure", "bf16,energy95", "--json", "-j", "1").stdout)
    assert some["measured"] == ["bf16", "energy95"]
    assert some["inputs"][0]["sizes"] == {"bf16": full.sizes["bf16"], "energy95": full.sizes["energy95"]}
    assert set(some["total"]["saved"]) == {"bf16", "energy95"}
    r = run("audit", EXAMPLE, "--measure", "zstd", "--csv", "-j", "1")
    assert next(csv.reader(io.StringIO(r.stdout)))[-2:] == ["zstd_bytes", "zstd_saved"]
    bad = CliRunner().invoke(main, ["audit", str(EXAMPLE), "--measure", "zstd,gzip"])
    assert bad.exit_code == 2 and "unknown gzip" in bad.stderr


def test_unreadable_safetensors_in_a_folder_is_reported(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)  # header length far past the end
    adapterpack.save(qv_adapter(4, layers=1, rank=2, in_features=16, q_out=8, v_out=8, b_scale=0.1), tmp_path / "ok.apack")
    r = run("audit", tmp_path, "--json", "-j", "1")
    assert r.exit_code == 1
    rows = {Path(x["path"]).name: x for x in json.loads(r.stdout)["inputs"]}
    assert rows["ok.apack"]["ok"] and not rows["bad.safetensors"]["ok"]
    assert rows["bad.safetensors"]["error"]["message"] == "not a safetensors file (header length 18446744073709551615)"


def test_dora_modules_are_kept_by_the_energy_variants(tmp_path: Path) -> None:
    from adapterpack.ops.rerank import RerankPolicy, rerank

    a = qv_adapter(5, layers=2, rank=6, in_features=40, q_out=48, v_out=24, b_scale=0.02)
    m = a.module("model.layers.1.self_attn.v_proj")
    m.params["dora"] = True
    m.tensors["magnitude"] = np.linspace(0.5, 1.5, 24, dtype=np.float32)
    path = tmp_path / "dora.apack"
    adapterpack.save(a, path)
    res = audit_input(path)
    assert res.ok, res.error
    assert res.notes == ["1 DoRA module(s) kept at their rank by the energy variants (their SVD needs the base weight)"]
    assert res.energy_ranks["energy95"][list(a.modules).index(m.name)] == 6
    assert res.as_dict()["encoding"] == "lora/lora+dora"
    out, _ = rerank(adapterpack.open(path), RerankPolicy(energy=0.95))
    assert out.module(m.name).encoding == "lora"
    assert res.sizes["energy95"] == adapterpack.save(out, tmp_path / "r.apack").file_size
