"""Every command that writes an adapter takes the same output options, declared once (issue 16 item 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import adapterpack
from adapterpack.bank import build_bank
from adapterpack.cli import main
from adapterpack.examples import example_path
from tests.factories import qv_adapter

#: The output options (click parameter names) of adapterpack.cli.write_options.
NAMES = ("to", "codec", "level", "drop_tensors", "serve_for", "max_lora_rank", "base", "component", "force")
LLAMA_CONFIG = '{"architectures": ["LlamaForCausalLM"], "num_attention_heads": 9, "num_key_value_heads": 3}'


def read_gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    import gguf

    return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}


def _command(*path: str) -> object:
    cmd = main
    for name in path:
        cmd = cmd.get_command(None, name)  # type: ignore[attr-defined]
    return cmd


@pytest.mark.parametrize("path", [("convert",), ("rerank",), ("bank", "extract")])
def test_writing_commands_share_the_output_options(path: tuple[str, ...]) -> None:
    from adapterpack.cli.write_options import NAMES as declared

    assert declared == NAMES
    params = {p.name for p in _command(*path).params}  # type: ignore[attr-defined]
    assert set(NAMES) <= params, sorted(set(NAMES) - params)


def test_rerank_to_gguf_takes_base(tmp_path: Path) -> None:
    """rerank --to gguf of a LLaMA adapter: its own error said to pass --base, which rerank lacked."""
    (tmp_path / "config.json").write_text(LLAMA_CONFIG)
    runner = CliRunner()
    out = tmp_path / "r4.gguf"
    no_base = runner.invoke(main, ["rerank", str(example_path()), str(out), "--rank", "4", "--summary"])
    assert no_base.exit_code == 1 and "--base" in no_base.output and not out.exists(), no_base.output
    base = ["--base", str(tmp_path / "config.json")]
    r = runner.invoke(main, ["rerank", str(example_path()), str(out), "--rank", "4", "--summary", *base])
    assert r.exit_code == 0, r.output
    # the same as re-ranking to PEFT, then converting that to gguf with --base
    assert runner.invoke(main, ["rerank", str(example_path()), str(tmp_path / "r4"), "--rank", "4", "--to", "peft"]).exit_code == 0
    c = runner.invoke(main, ["convert", str(tmp_path / "r4"), str(tmp_path / "c4.gguf"), *base])
    assert c.exit_code == 0, c.output
    got, want = read_gguf_tensors(out), read_gguf_tensors(tmp_path / "c4.gguf")
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in got)  # rerank writes natural order


def test_rerank_target_vllm_and_bank_extract_to_kohya(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["rerank", str(example_path()), str(tmp_path / "v"), "--energy", "0.9", "--target", "vllm"])
    assert r.exit_code == 0 and "vLLM: r=" in r.output, r.output
    assert runner.invoke(main, ["check", "--target", "vllm", str(tmp_path / "v")]).exit_code == 0
    srcs = []
    for i in range(2):
        srcs.append(tmp_path / f"a{i}.apack")
        adapterpack.save(qv_adapter(i, layers=1, rank=4, in_features=16, q_out=16, v_out=8, b_scale=0.1), srcs[-1])
    build_bank(tmp_path / "bank.apack", srcs, rank=4)
    r = runner.invoke(main, ["bank", "extract", str(tmp_path / "bank.apack"), "a1", str(tmp_path / "a1.safetensors")])
    assert r.exit_code == 0 and "as kohya" in r.output, r.output
    assert runner.invoke(main, ["bank", "extract", str(tmp_path / "bank.apack"), "a1", str(tmp_path / "x1.apack")]).exit_code == 0
    with adapterpack.open(tmp_path / "a1.safetensors") as got, adapterpack.open(tmp_path / "x1.apack") as want:
        for m in want:
            np.testing.assert_allclose(got.delta(m.name), m.delta(), rtol=1e-5, atol=1e-6)
