"""Review: ``check --target X`` predicts what the X export refuses. For odd-but-legal adapters (DoRA on some
modules only, alpha 0, an alpha float32 cannot hold), a check that says "loads as is" while the export then
refuses (or the reverse) misleads the user; each case here is checked both ways with the writer's own error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterpack
from adapterpack import Adapter, Module
from adapterpack.errors import ConversionError
from adapterpack.formats.gguf import GgufBase, write_gguf
from adapterpack.formats.kohya import write_kohya
from adapterpack.formats.peft import write_peft
from adapterpack.formats.serving import check_path, write_vllm

pytest.importorskip("gguf")


def _mod(name: str, *, rank: int = 2, alpha: float = 4.0, **params: Any) -> Module:
    rng = np.random.default_rng(len(name))
    t = {"A": rng.standard_normal((rank, 6)).astype(np.float32), "B": rng.standard_normal((8, rank)).astype(np.float32)}
    if params.get("dora"):
        t["magnitude"] = np.ones(8, np.float32)
    return Module(name, "lora", (8, 6), {"rank": rank, "alpha": alpha, **params}, t)


V, UP = "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"
CASES: dict[str, list[Module]] = {
    "plain": [_mod(V), _mod(UP, rank=1, alpha=3.0)],
    "rslora": [_mod(V, rslora=True), _mod(UP, rslora=True)],
    "mixed_dora": [_mod(V, dora=True), _mod(UP)],
    "alpha0": [_mod(V, alpha=0.0), _mod(UP, alpha=0.0)],
    "one_alpha0": [_mod(V, alpha=0.0), _mod(UP), _mod("model.layers.1.mlp.up_proj")],
    "huge_alpha": [_mod(V, alpha=1e300), _mod(UP, alpha=1e300), _mod("model.layers.1.mlp.up_proj", alpha=1.0)],
    "tiny_alpha": [_mod(V, alpha=1e-300), _mod(UP)],
}
WRITERS: dict[str, Callable[[Adapter, Path], object]] = {
    "peft": lambda a, p: write_peft(a, p),
    "vllm": lambda a, p: write_vllm(a, p),
    "kohya": lambda a, p: write_kohya(a, p.with_suffix(".safetensors")),
    "llama.cpp": lambda a, p: write_gguf(a, p.with_suffix(".gguf"), base=GgufBase("llama", 2, 1)),
}


@pytest.mark.parametrize("target", list(WRITERS))
@pytest.mark.parametrize("case", list(CASES))
def test_check_predicts_the_exports_refusal(tmp_path: Path, case: str, target: str, request: pytest.FixtureRequest) -> None:
    if (case, target) == ("tiny_alpha", "vllm"):  # a known gap, kept visible: the test fails if check learns to predict it
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "vLLM bakes 4 / 1e-300 into a B: whether that overflows depends on B's values, which check does not read")))
    src = tmp_path / "in.apack"
    adapterpack.save(Adapter(name="x", modules={m.name: m for m in CASES[case]}), src)
    refused = [f for f in check_path(src, target) if f.severity == "refuse"]
    with adapterpack.open(src) as ad:
        try:
            WRITERS[target](ad, tmp_path / "out")
            error = None
        except ConversionError as e:
            error = str(e)
    assert bool(refused) == (error is not None), (refused, error)
