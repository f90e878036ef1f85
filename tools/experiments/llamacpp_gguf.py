"""Our GGUF LoRA and llama.cpp's own converter's, run in llama.cpp, against PEFT on SmolLM2-135M.

For each adapter (the bundled r=8 example, and the same ΔW re-expressed as rsLoRA with rank_pattern /
alpha_pattern: odd layers cut to rank 4, v_proj and o_proj with their own alpha, B rescaled so every
module's ΔW is the trained one or its best rank-4 cut), on held-out pydoc blocks:

- PEFT's logits: the fp32 base (the Q4_1 GGUF dequantized, :mod:`tools.fixtures.smollm2`) with
  ``PeftModel.from_pretrained`` on the PEFT folder;
- llama.cpp's logits (llama-cpp-python) on the Q4_1 base GGUF with ``lora_path`` = our GGUF
  (:func:`adapterpack.formats.gguf.write_gguf`), and = the GGUF of llama.cpp's ``convert_lora_to_gguf.py``
  (from the llama-cpp-python sdist's ``vendor/llama.cpp``; skipped when it is not there);
- KL(PEFT ‖ llama.cpp) per predicted token (mean, float64), top-1 agreement and the share of positions
  whose top-5 token sets are equal. The base model alone (fp32 HF vs Q4_1 llama.cpp) is the yardstick:
  llama.cpp computes on Q4_1 weights, so an adapter cannot agree better than the base does.

    nice -n 5 python -m tools.experiments.llamacpp_gguf --blocks 8 --json /tmp/llamacpp_gguf.json

Needs torch, transformers, peft, llama-cpp-python and gguf; ``--llama-cpp DIR`` (or
``$ADAPTERPACK_LLAMACPP_SRC``) is llama.cpp's source folder, default: extracted from the sdist in /tmp/llcpp.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.encodings.lower import as_lora, at_rank
from adapterpack.examples import example_path
from adapterpack.formats.gguf import write_gguf
from adapterpack.formats.peft import write_peft

SDIST = Path("/tmp/llcpp/llama_cpp_python-0.3.36.tar.gz")
INNER = "llama_cpp_python-0.3.36/vendor/llama.cpp"


def llama_cpp_source(given: str | os.PathLike[str] | None = None) -> Path | None:
    """llama.cpp's source folder (holding convert_lora_to_gguf.py): ``given``, ``$ADAPTERPACK_LLAMACPP_SRC``, or
    the converter's files extracted once from the llama-cpp-python sdist; None when none is at hand."""
    for cand in (given, os.environ.get("ADAPTERPACK_LLAMACPP_SRC")):
        if cand and (Path(cand) / "convert_lora_to_gguf.py").is_file():
            return Path(cand)
    if not SDIST.is_file():
        return None
    root = Path(tempfile.gettempdir()) / "adapterpack-llamacpp-src"
    src = root / INNER
    if not (src / "convert_lora_to_gguf.py").is_file():
        with tarfile.open(SDIST) as tf:
            keep = [
                m
                for m in tf.getmembers()
                if m.isfile()
                and m.name.startswith(INNER + "/")
                and ((m.name.count("/") == 3 and m.name.endswith(".py")) or "/conversion/" in m.name or "/gguf-py/" in m.name)
            ]
            tf.extractall(root, members=keep, filter="data")
    return src


def no_extra_buffers() -> None:
    """Load models without llama.cpp's extra (repacking) buffer types: a native build on a VM that advertises AMX
    crashes in ggml_backend_amx_mul_mat otherwise (seen here); the plain CPU kernels compute the same products."""
    import llama_cpp.llama_cpp as api

    if getattr(api.llama_model_default_params, "_adapterpack", False):
        return
    default = api.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = False
        return p

    params._adapterpack = True  # type: ignore[attr-defined]
    api.llama_model_default_params = params


def llamacpp_problem(base_gguf: Path) -> str | None:
    """None when llama-cpp-python evaluates the base GGUF; else why not (a broken build can crash the process,
    so it is tried in a subprocess first)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (an hour's build)"
    code = (
        "import sys; from llama_cpp import Llama; from tools.experiments.llamacpp_gguf import no_extra_buffers; "
        "no_extra_buffers(); Llama(model_path=sys.argv[1], n_ctx=64, n_batch=8, verbose=False, n_threads=1).eval([1, 2, 3])"
    )
    try:
        root = Path(__file__).resolve().parents[2]
        r = subprocess.run([sys.executable, "-c", code, str(base_gguf)], capture_output=True, timeout=300, cwd=root)
    except subprocess.TimeoutExpired:
        return "llama-cpp-python did not evaluate 3 tokens in 300 s"
    return None if r.returncode == 0 else f"llama-cpp-python fails on this machine (exit status {r.returncode} evaluating 3 tokens)"


def run_converter(src: Path, lora: Path, base_dir: Path, dst: Path) -> None:
    """llama.cpp's convert_lora_to_gguf.py (its own gguf-py first on the path), f32 output."""
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    cmd = [sys.executable, str(src / "convert_lora_to_gguf.py"), "--base", str(base_dir), "--outfile", str(dst)]
    subprocess.run([*cmd, "--outtype", "f32", str(lora)], check=True, env=env, capture_output=True)


def rslora_patterns(ad: Adapter) -> Adapter:
    """The bundled adapter as rsLoRA with patterns: odd layers at rank 4 (exact SVD cut), alpha 16 except v_proj (4)
    and o_proj (32); each B rescaled so the module's ΔW is unchanged by the new scale alpha/√r."""
    mods = {}
    for m in ad:
        layer = int(m.name.split(".")[2])
        cut = as_lora(at_rank(m, 4)) if layer % 2 else m
        r = int(cut.params["rank"])
        alpha = 4.0 if m.name.endswith("v_proj") else 32.0 if m.name.endswith("o_proj") else 16.0
        factor = float(cut.implementation.scale(cut)) / (alpha / math.sqrt(r))
        b = (cut.array("B").astype(np.float64) * factor).astype(np.float32)
        params = {**cut.params, "rank": r, "alpha": alpha, "rslora": True}
        mods[m.name] = Module(m.name, "lora", tuple(m.base_shape), params, {"A": cut.array("A"), "B": b})
    out = ad.derived(mods)
    out.source = {}
    return out


def peft_logits(model_dir: Path, adapter_dir: Path | None, blocks: Any) -> np.ndarray:
    """[n, block, vocab] float32 logits of the fp32 HF base with the PEFT adapter (None: the base alone)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    with torch.no_grad():
        return np.stack([model(input_ids=b[None]).logits[0].float().numpy() for b in blocks])


def llama_logits(base_gguf: Path, lora_gguf: Path | None, blocks: Any) -> np.ndarray:
    """[n, block, vocab] float32 logits of llama.cpp on ``base_gguf`` with ``lora_gguf`` applied (None: the base)."""
    from llama_cpp import Llama

    no_extra_buffers()
    n = int(blocks.shape[1])
    kw = {"lora_path": str(lora_gguf)} if lora_gguf is not None else {}
    llm = Llama(model_path=str(base_gguf), n_ctx=max(n, 256), n_batch=n, logits_all=True, verbose=False, n_threads=2, **kw)
    out = []
    for b in blocks:
        llm.reset()
        llm.eval([int(t) for t in b])
        out.append(np.array(llm.scores[:n], dtype=np.float32))
    return np.stack(out)


def agreement(p_logits: np.ndarray, q_logits: np.ndarray) -> dict[str, float]:
    """Mean KL(p ‖ q) per position (float64), top-1 agreement and the share of positions with equal top-5 sets."""
    p = p_logits.reshape(-1, p_logits.shape[-1]).astype(np.float64)
    q = q_logits.reshape(-1, q_logits.shape[-1]).astype(np.float64)
    lp = p - p.max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    lq = q - q.max(1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(1)
    top5p, top5q = np.argsort(-p, 1)[:, :5], np.argsort(-q, 1)[:, :5]
    same5 = np.mean([set(a) == set(b) for a, b in zip(top5p, top5q)])
    return {
        "kl": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1": float(np.mean(top5p[:, 0] == top5q[:, 0])),
        "top5_same": float(same5),
    }


def delta_error(gguf_path: Path, model_dir: Path, peft: Adapter) -> float:
    """Largest relative Frobenius error, over modules, of the ΔW llama.cpp applies from ``gguf_path`` (adapter.lora.alpha
    / the pair's rank · lora_b · lora_a, rows put back in HF order) against PEFT's."""
    got = adapterpack.open(gguf_path, base=model_dir)
    worst = 0.0
    for m in peft:
        want = m.delta().astype(np.float64)
        worst = max(worst, float(np.linalg.norm(got.delta(m.name).astype(np.float64) - want) / np.linalg.norm(want)))
    return worst


def measure(
    work: Path, n_blocks: int = 8, llama_cpp_dir: str | os.PathLike[str] | None = None, *, logits: bool | None = None
) -> dict[str, Any]:
    """Every figure of the module docstring, as a dict (what ``--json`` writes and tests/test_llamacpp.py checks). ΔW
    errors always; logits (``logits`` None: when llama-cpp-python is importable) only with llama.cpp."""
    from tools.fixtures import smollm2

    base_gguf, model_dir = smollm2.gguf_path(), smollm2.model_dir()
    blocks = smollm2.pydoc_blocks("heldout")[:n_blocks]
    src = llama_cpp_source(llama_cpp_dir)
    if logits is None:
        problem = llamacpp_problem(base_gguf)
        logits = problem is None
        out_problem = problem
    else:
        out_problem = None
    out: dict[str, Any] = {
        "blocks": int(blocks.shape[0]) if logits else 0,
        "tokens_per_block": int(blocks.shape[1]),
        "converter": str(src) if src else None,
        "llamacpp_problem": out_problem,
    }
    if logits:
        out["base"] = agreement(peft_logits(model_dir, None, blocks), llama_logits(base_gguf, None, blocks))
    adapters = {"plain": adapterpack.open(example_path())}
    adapters["rslora_patterns"] = rslora_patterns(adapters["plain"])
    for label, ad in adapters.items():
        folder = work / label
        write_peft(ad, folder)
        peft = adapterpack.open(folder)
        ours = work / f"{label}.ours.gguf"
        write_gguf(peft, ours, base=model_dir)
        row: dict[str, Any] = {"delta_rel_error": {"ours": delta_error(ours, model_dir, peft)}}
        ref = peft_logits(model_dir, folder, blocks) if logits else None
        if logits:
            row["ours"] = agreement(ref, llama_logits(base_gguf, ours, blocks))
        if src is not None:
            theirs = work / f"{label}.llamacpp.gguf"
            run_converter(src, folder, model_dir, theirs)
            row["delta_rel_error"]["llamacpp_converter"] = delta_error(theirs, model_dir, peft)
            row["tensors_identical"] = same_tensors(ours, theirs)
            if logits:
                row["llamacpp_converter"] = agreement(ref, llama_logits(base_gguf, theirs, blocks))
        out[label] = row
    return out


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two GGUF files hold the same tensor names, shapes, types and bytes."""
    import gguf

    ta = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(b)).tensors}
    return ta == tb


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=8, help="held-out blocks of 128 tokens (default 8)")
    ap.add_argument("--llama-cpp", help="llama.cpp source folder (convert_lora_to_gguf.py); default: from the sdist")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        res = measure(Path(tmp), args.blocks, args.llama_cpp)
    fmt = "{:<34} KL {kl:.4f} (max {kl_max:.3f})  top-1 {top1:.3f}  same top-5 {top5_same:.3f}"
    if "base" in res:
        print(f"{res['blocks']} held-out blocks x {res['tokens_per_block']} tokens; KL(PEFT fp32 || llama.cpp Q4_1)")
        print(fmt.format("base model alone", **res["base"]))
    else:
        print(f"ΔW figures only: {res['llamacpp_problem']}")
    for label in ("plain", "rslora_patterns"):
        row = res[label]
        for who, err in row["delta_rel_error"].items():
            print(f"{label}: {who:<20} max relative ΔW error (llama.cpp's alpha/rank rule vs PEFT) {err:.3e}")
        for who in ("ours", "llamacpp_converter"):
            if who in row:
                print(fmt.format(f"{label}: {who}", **row[who]))
        if "tensors_identical" in row:
            print(f"{label}: our GGUF tensors identical to llama.cpp's converter's: {row['tensors_identical']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
