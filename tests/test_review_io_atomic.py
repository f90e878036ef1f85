"""Output errors name the output (review round): a copy that fails writing (file too large, disk full) is not blamed
on its source."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import adapterpack
from adapterpack.adapter import Adapter
from adapterpack.atomic import atomic_dir
from adapterpack.errors import OutputWriteError
from tests.factories import qv_modules

ROOT = Path(__file__).resolve().parent.parent


def test_a_copy_error_naming_source_and_output_is_an_output_error(tmp_path: Path) -> None:
    """shutil's sendfile copy sets filename = the source, filename2 = the output: the output is what failed."""
    src = tmp_path / "base.safetensors"
    src.write_bytes(b"x")
    dst = tmp_path / "out"
    with pytest.raises(OutputWriteError) as e, atomic_dir(dst) as tmp:
        raise OSError(errno.EFBIG, "File too large", str(src), None, str(tmp / "base.safetensors"))
    assert e.value.filename == str(dst) and str(dst) in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]


def test_a_read_error_of_an_input_still_names_the_input(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    with pytest.raises(FileNotFoundError) as e, atomic_dir(dst):
        open(tmp_path / "missing.safetensors", "rb")
    assert not isinstance(e.value, OutputWriteError) and "missing.safetensors" in str(e.value)


def _limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and sendfile copies: Linux")
def test_cli_merge_that_cannot_write_names_the_output_and_leaves_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mods = qv_modules(rng, layers=1, rank=2, in_features=64, q_out=64, v_out=32, b_scale=0.05)
    adapterpack.save(Adapter("a", "base/model", "LlamaForCausalLM", mods), tmp_path / "a.apack")
    base = tmp_path / "base"
    base.mkdir()
    shapes = {"q_proj": 64, "v_proj": 32}
    t = {f"model.layers.0.self_attn.{n}.weight": rng.standard_normal((o, 64)).astype(np.float32) for n, o in shapes.items()}
    save_file(t, base / "model.safetensors")
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    out = tmp_path / "merged"
    r = subprocess.run(
        [sys.executable, "-m", "adapterpack", "merge", str(tmp_path / "a.apack"), str(base), str(out)],
        capture_output=True, text=True, cwd=ROOT, preexec_fn=_limit, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert f"cannot write {out}" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.apack", "base"]


def test_a_copy_read_error_keeps_naming_the_source(tmp_path: Path) -> None:
    """EIO from a copy may be either side: the source stays named (only write-side errors move to the output)."""
    src = tmp_path / "base.safetensors"
    with pytest.raises(OSError) as e, atomic_dir(tmp_path / "out") as tmp:
        raise OSError(errno.EIO, "Input/output error", str(src), None, str(tmp / "base.safetensors"))
    assert not isinstance(e.value, OutputWriteError) and e.value.filename == str(src)
