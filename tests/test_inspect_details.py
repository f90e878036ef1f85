"""What people look for in ``inspect``, ``verify`` and ``rerank`` output, and the model card through conversion.

inspect: alpha, scale, rsLoRA and the target modules in the table; the input file's own metadata (kohya's ss_*
keys); verify: the damaged module by name; rerank: modules in natural order; a PEFT folder's README.md carried
to folder outputs.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import adapterpack
from adapterpack.cli import main
from adapterpack.examples import example_path
from adapterpack.names import natural_key

EXAMPLE = example_path()


def run(*args: str | Path) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _rslora_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "rs"
    shutil.copytree(EXAMPLE, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def test_inspect_shows_alpha_scale_rslora_and_targets(tmp_path: Path) -> None:
    r = run("inspect", EXAMPLE)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert "targets  k_proj, o_proj, q_proj, v_proj" in lines
    header = next(line for line in lines if line.startswith("module"))
    assert header.split()[:5] == ["module", "encoding", "rank", "alpha", "scale"]
    row = next(line for line in lines if line.startswith("model.layers.3.self_attn.q_proj "))
    assert row.split()[1:5] == ["lora", "8", "16", "2"]

    rs = _rslora_copy(tmp_path)
    r = run("inspect", rs)
    row = next(line for line in r.stdout.splitlines() if line.startswith("model.layers.3.self_attn.q_proj "))
    assert row.split()[1:5] == ["lora+rslora", "8", "16", f"{16 / math.sqrt(8):.4g}"]
    rep = json.loads(run("inspect", rs, "--json").stdout)["adapters"][0]
    assert rep["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    q = next(x for x in rep["modules"] if x["name"] == "model.layers.3.self_attn.q_proj")
    assert q["alpha"] == 16 and q["rslora"] is True and q["scale"] == 16 / math.sqrt(8)


def test_inspect_shows_kohya_metadata(tmp_path: Path) -> None:
    kohya = tmp_path / "k.safetensors"
    assert run("convert", EXAMPLE, kohya).exit_code == 0
    meta = {"ss_network_dim": "8", "ss_network_alpha": "16", "ss_output_name": "pydoc", "ss_tag_frequency": "x" * 500}
    save_file(load_file(str(kohya)), str(kohya), metadata=meta)
    r = run("inspect", kohya)
    assert r.exit_code == 0, r.output
    assert any(line.startswith("metadata") and "ss_network_alpha = 16" in line for line in r.stdout.splitlines())
    assert "ss_network_dim = 8" in r.stdout and "ss_output_name = pydoc" in r.stdout
    assert "x" * 100 + "..." in r.stdout and "x" * 101 not in r.stdout  # long values cut in the text
    rep = json.loads(run("inspect", kohya, "--json").stdout)["adapters"][0]
    assert rep["file_metadata"] == dict(sorted(meta.items()))


def test_verify_names_the_adapter_and_module_of_a_damaged_blob(tmp_path: Path) -> None:
    a, b = adapterpack.open(EXAMPLE), adapterpack.open(EXAMPLE)
    a.name, b.name = "first", "second"
    path = tmp_path / "two.apack"
    adapterpack.save([a, b], path, codec="raw")
    from adapterpack.container.reader import ApackReader

    with ApackReader(path) as reader:
        users = reader.blob_users()
        i = next(k for k, v in users.items() if v == ["adapter 'second' module 'model.layers.10.self_attn.v_proj' B"])
        start, n = reader.blob_offset(i), reader.blobs[i].stored_length
    data = bytearray(path.read_bytes())
    data[start + n // 2] ^= 0x10
    path.write_bytes(bytes(data))
    r = run("verify", path)
    assert r.exit_code == 1
    assert f"blob {i} (adapter 'second' module 'model.layers.10.self_attn.v_proj' B): checksum mismatch" in r.stdout


def test_rerank_lists_modules_in_natural_order(tmp_path: Path) -> None:
    r = run("rerank", EXAMPLE, "--rank", "4", "--dry-run")
    assert r.exit_code == 0, r.output
    names = [line.split()[0] for line in r.stdout.splitlines() if line.startswith("model.layers.")]
    assert len(names) == 120 and names == sorted(names, key=natural_key)
    assert names.index("model.layers.2.self_attn.k_proj") < names.index("model.layers.10.self_attn.k_proj")
    rep = json.loads(run("rerank", EXAMPLE, "--rank", "4", "--dry-run", "--json").stdout)
    got = [m["name"] for m in rep["modules"]]
    assert got == sorted(got, key=natural_key)


def test_model_card_is_carried_to_folder_outputs(tmp_path: Path) -> None:
    card = (EXAMPLE / "README.md").read_text()
    assert run("convert", EXAMPLE, tmp_path / "a.apack").exit_code == 0
    assert run("convert", tmp_path / "a.apack", tmp_path / "peft").exit_code == 0
    assert (tmp_path / "peft" / "README.md").read_text() == card
    assert run("convert", EXAMPLE, tmp_path / "direct").exit_code == 0
    assert (tmp_path / "direct" / "README.md").read_text() == card
    r = run("convert", EXAMPLE, tmp_path / "vllm", "--target", "vllm")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "vllm" / "README.md").read_text() == card
    r = run("rerank", tmp_path / "a.apack", tmp_path / "r4", "--rank", "4", "--to", "peft")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r4" / "README.md").read_text() == card
