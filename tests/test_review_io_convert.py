"""convert / exports of the newest encodings (qsvd from compress, nola): --dtype reaches the written factors (review round)."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

import adapterpack
from adapterpack.adapter import Adapter
from adapterpack.ops.compress import compress_file
from adapterpack.ops.convert import convert
from tests.factories import qv_modules


def _qsvd_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    mods = qv_modules(rng, layers=1, rank=4, in_features=128, q_out=128, v_out=64, b_scale=0.05)
    src = tmp_path / "src.apack"
    adapterpack.save(Adapter("a", "base/model", "LlamaForCausalLM", mods), src)
    dst = tmp_path / "q.apack"
    compress_file(src, dst, budget_ratio=0.25)
    assert {m.encoding for m in adapterpack.open(dst)} == {"qsvd"}
    return dst


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b.astype(np.float64)) / np.linalg.norm(b.astype(np.float64)))


@pytest.mark.parametrize(
    ("to", "name", "dtype", "np_dtype", "tol"),
    [
        ("peft", "peft", "bf16", ml_dtypes.bfloat16, 2e-2),
        ("peft", "peft", "fp16", np.float16, 2e-3),
        ("kohya", "k.safetensors", "fp16", np.float16, 2e-3),
        ("diffusers", "pytorch_lora_weights.safetensors", "bf16", ml_dtypes.bfloat16, 2e-2),
    ],
)
def test_dtype_reaches_the_factors_of_a_qsvd_export(
    tmp_path: Path, to: str, name: str, dtype: str, np_dtype: object, tol: float
) -> None:
    """A qsvd record has no float tensor to cast (its one blob is uint8): the cast must apply to the LoRA factors
    the export writes (was: 'cast 0 tensors' and float32 factors written)."""
    q = _qsvd_file(tmp_path)
    dst = tmp_path / name
    extra = {"component": "transformer"} if to == "diffusers" else {}
    res = convert(q, dst, to=to, dtype=dtype, **extra)  # type: ignore[arg-type]
    assert sum(c.tensors_cast for c in res.casts) > 0
    weights = dst / "adapter_model.safetensors" if to == "peft" else dst
    t = load_file(weights)
    factors = [v for k, v in t.items() if not k.endswith(".alpha")]
    assert factors and all(v.dtype == np_dtype for v in factors)
    src, back = adapterpack.open(q), adapterpack.open(dst)
    assert len(back.modules) == len(src.modules)
    for n, m in src.modules.items():
        got = next(back.module(k) for k in back.modules if k.endswith(n))
        assert 0 < _rel(got.delta(), m.delta()) < tol


def test_dtype_reaches_the_factors_of_a_nola_export(tmp_path: Path) -> None:
    q = _qsvd_file(tmp_path)
    nola = tmp_path / "n.apack"
    convert(q, nola, to="nola", nola_k=32)
    res = convert(nola, tmp_path / "peft", to="peft", dtype="fp16")
    assert sum(c.tensors_cast for c in res.casts) > 0
    t = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert all(v.dtype == np.float16 for v in t.values())


def test_apack_output_of_qsvd_keeps_its_records(tmp_path: Path) -> None:
    """An .apack output keeps the qsvd records (nothing float to cast): the cast leaves them bit for bit."""
    q = _qsvd_file(tmp_path)
    convert(q, tmp_path / "c.apack", dtype="fp16")
    a, b = adapterpack.open(q), adapterpack.open(tmp_path / "c.apack")
    for n, m in a.modules.items():
        assert b.module(n).encoding == "qsvd"
        assert np.array_equal(b.module(n).delta(), m.delta())


def test_vllm_refusal_of_a_whole_adapter_finding_has_no_empty_module_list(tmp_path: Path) -> None:
    from adapterpack.errors import ConversionError

    q = _qsvd_file(tmp_path)
    with pytest.raises(ConversionError, match=r"--max-lora-rank 2 is not one vLLM accepts \(\([0-9, ]+\)\); fix") as e:
        convert(q, tmp_path / "v", to="peft", serve_for="vllm", max_lora_rank=2)
    assert "()" not in str(e.value) and not (tmp_path / "v").exists()
