"""Differential tests of every path by which adapterpack WRITES an ``.apack`` from its bundled real example (a PEFT
LoRA on SmolLM2-135M, 120 modules), against the clean-room reader tools/vectors/_container_reference.py and the spec's
ΔW formulas in tools/vectors/_reference.py.

Writers covered (CLI in-process through ``click.testing.CliRunner``; public API ``adapterpack.open``/``save``):

- ``convert``: from PEFT (raw; fp16 zstd), through kohya and through gguf back to ``.apack``; ``--rank`` (lora to svd,
  an svd and a qsvd prefix, a bank's shared records to svd); ``--to nola`` (``--k 4``, ``--k 0``); ``--dtype`` of svd,
  nola and bank files and of pass-through tensors (``--level`` 12, 22); a multi-adapter file converted whole;
- ``rerank``: ranks 0, 2, 4 (svd), 0 and 16 as lora (zero-padded), ``--energy``, ``--budget``, ``--budget-ratio`` with
  ``--round-to``, ``--modules``, a bank member (``--adapter``);
- ``compress``: a byte budget; 1/3/8-bit widths in groups of 7 with zstd; rank-0 and rank-1 records of 2 bits in one
  group wider than any vector with byteplanes (both through ``--modules``); 16 bits only, from a bank member;
- ``bank build`` (full, diagonal fp16, ``--target-error``, float64 with pass-through tensors), ``bank add`` (growing the
  bases; ``--no-grow``), ``bank refit``, ``bank extract`` (lora, ``--to svd``); ``demo --out``;
- ``adapterpack.save``: four adapters of mixed encodings in one file; adapters opened at a rank; the example with
  pass-through tensors of every dtype.

The CLI has no ``bank remove``; ``convert --to nola --target-error`` is left out for time (it fits k >= 16: seconds).

For each written file: (1) the reference reader accepts it; (2) every module tensor and pass-through tensor decodes bit
for bit the same in both readers, with the same names, encodings, shapes and params; (3) every module's ΔW from the
spec's formulas (binary64, on the reference reader's arrays) agrees with ``Module.delta()`` within spec/vectors.md §2
(``max |ΔW_a − ΔW_ref| <= 1e-5 · max(1, max |ΔW_ref|)``; nola: the first and last module only, its plain-Python
Philox is slow); (4) a file with svd or qsvd records is also read at ranks 1 and 3 (format.md §8.1) by
``read(data, rank=j)`` and ``adapterpack.open(path, rank=j)``, compared the same way on those records.

adapterpack is a black box here: only its CLI, ``open``, ``save``, ``Adapter``/``Module`` are used.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tools.vectors import _container_reference as ref
from tools.vectors import _reference as spec_delta

REPO = Path(__file__).resolve().parents[1]
RANKS = (1, 3)
#: The record kinds each written file must hold (the writer path really produced them).
ENCODINGS: dict[str, set[str]] = {
    "peft-raw": {"lora"}, "peft-fp16-zstd": {"lora"}, "demo": {"lora"},
    "via-kohya": {"lora"}, "via-gguf": {"lora"}, "convert-rank3": {"svd"},
    "nola-k4": {"nola"}, "nola-k0": {"nola"}, "nola-bf16": {"nola"},
    "rerank-r4": {"svd"}, "rerank-r0": {"svd"}, "rerank-r16-lora": {"lora"}, "rerank-energy": {"svd"},
    "rerank-budget": {"svd"}, "rerank-ratio-round": {"svd"}, "rerank-modules": {"svd", "lora"},
    "svd-bf16": {"svd"}, "svd-fp16-rank2": {"svd"},
    "compress-budget": {"qsvd"}, "compress-bits": {"qsvd", "lora"}, "compress-min0": {"qsvd", "lora"},
    "qsvd-rank2-pco": {"qsvd"},
    "bank-build": {"shared"}, "bank-diag-fp16": {"shared"}, "bank-target": {"shared"}, "bank-add": {"shared"},
    "bank-refit": {"shared"}, "bank-fp16-zstd": {"shared"}, "bank-extract": {"lora"}, "bank-extract-svd": {"svd"},
    "api-multi": {"lora", "nola", "svd", "qsvd"}, "multi-bf16": {"lora", "nola", "svd", "qsvd"},
    "multi-rank2": {"svd", "qsvd"},
    "api-at-rank-svd": {"svd"}, "api-at-rank-qsvd": {"qsvd"}, "api-at-rank-lora": {"svd"}, "api-at-rank-nola": {"svd"},
    "pt-pco": {"lora"}, "pt-bf16-pco12": {"lora"}, "pt-fp16-byteplanes22": {"lora"}, "pt-rerank-zstd22": {"svd"},
    "pt-bank-f64": {"shared"}, "bank-rank2": {"svd"}, "rerank-bank-member": {"svd"}, "compress-bank-member": {"qsvd"},
    "rerank-r0-lora": {"lora"}, "bank-add-nogrow": {"shared"},
}  # fmt: skip
#: Files whose first adapter carries the pass-through tensors of every dtype that ``_passthrough`` adds.
PASSTHROUGH = {k for k in ENCODINGS if k.startswith("pt-")}
#: Adapters per file (default 1).
ADAPTERS = {"bank-build": 2, "bank-diag-fp16": 2, "bank-target": 3, "bank-add": 3, "bank-refit": 3, "bank-fp16-zstd": 3,
            "api-multi": 4, "multi-bf16": 4, "multi-rank2": 4, "pt-bank-f64": 2, "bank-rank2": 3,
            "bank-add-nogrow": 3}  # fmt: skip
KINDS = list(ENCODINGS)

SMOLLM2_CONFIG = (  # llama.cpp's q/k row order for gguf needs the base's head counts (SmolLM2-135M's config.json)
    '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,'
    ' "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30}'
)


def _cli(*args: str | Path) -> None:
    from click.testing import CliRunner

    from adapterpack.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, (args, result.output)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import adapterpack
    from adapterpack.examples import __file__ as examples_init

    assert Path(adapterpack.__file__).resolve().is_relative_to(REPO), adapterpack.__file__  # the code under test
    example = Path(examples_init).parent / "smollm2-pydoc-lora"
    out = tmp_path_factory.mktemp("writers")
    f = {k: out / f"{k}.apack" for k in KINDS}
    np_ = "--no-progress"

    # convert from PEFT, and through kohya and gguf back to .apack
    _cli("convert", example, f["peft-raw"], "--codec", "raw", np_)
    _cli("convert", example, f["peft-fp16-zstd"], "--dtype", "fp16", "--codec", "zstd", np_)
    _cli("demo", "--out", out / "demo")
    shutil.copy(out / "demo" / "smollm2-pydoc-lora.apack", f["demo"])
    lora = f["peft-raw"]
    _cli("convert", lora, out / "kohya.safetensors", np_)
    _cli("convert", out / "kohya.safetensors", f["via-kohya"], "--codec", "byteplanes", np_)
    (out / "config.json").write_text(SMOLLM2_CONFIG, encoding="utf-8")
    _cli("convert", lora, out / "lora.gguf", "--base", out / "config.json", np_)
    _cli("convert", out / "lora.gguf", f["via-gguf"], "--base", out / "config.json", np_)
    _cli("convert", lora, f["convert-rank3"], "--rank", "3", np_)

    # nola
    _cli("convert", lora, f["nola-k4"], "--to", "nola", "--k", "4", np_)
    _cli("convert", lora, f["nola-k0"], "--to", "nola", "--k", "0", "--codec", "raw", np_)
    _cli("convert", f["nola-k4"], f["nola-bf16"], "--dtype", "bf16", "--codec", "zstd", np_)

    # rerank
    _cli("rerank", lora, f["rerank-r4"], "--rank", "4", np_)
    _cli("rerank", lora, f["rerank-r0"], "--rank", "0", "--codec", "raw", np_)
    _cli("rerank", lora, f["rerank-r16-lora"], "--rank", "16", "--encoding", "lora", np_)
    _cli("rerank", lora, f["rerank-r0-lora"], "--rank", "0", "--encoding", "lora", "--codec", "zstd", np_)
    _cli("rerank", lora, f["rerank-energy"], "--energy", "0.9", "--codec", "byteplanes", np_)
    _cli("rerank", lora, f["rerank-budget"], "--budget", "800KB", "--codec", "zstd", np_)
    _cli("rerank", lora, f["rerank-ratio-round"], "--budget-ratio", "0.5", "--round-to", "1,2,4,8", "--codec", "raw", np_)
    _cli("rerank", lora, f["rerank-modules"], "--rank", "2", "--modules", "v_proj", np_)
    _cli("convert", f["rerank-r4"], f["svd-bf16"], "--dtype", "bf16", np_)
    _cli("convert", f["rerank-r4"], f["svd-fp16-rank2"], "--dtype", "fp16", "--rank", "2", "--codec", "raw", np_)

    # compress (qsvd)
    _cli("compress", lora, f["compress-budget"], "--budget", "200KB", np_)
    # only q_proj (k_proj) compressed, the rest kept as lora: a budget just above the smallest file gives rank-1
    # components of 3 bits in groups of 7 (rank 0 and 1 components of 2 bits, one group wider than any vector)
    _cli("compress", lora, f["compress-bits"], "--modules", "q_proj", "--budget", "2425000", "--bits", "1,3,8",
         "--group-size", "7", "--codec", "zstd", np_)  # fmt: skip
    _cli("compress", lora, f["compress-min0"], "--modules", "k_proj", "--budget", "2522000", "--min-rank", "0",
         "--weighting", "absolute", "--bits", "2,5,16", "--group-size", "100000", "--codec", "byteplanes", np_)  # fmt: skip
    _cli("convert", f["compress-budget"], f["qsvd-rank2-pco"], "--rank", "2", "--codec", "pco", np_)

    # banks (shared)
    _cli("bank", "build", f["bank-build"], lora, f["nola-k4"], "--name", "a", "--name", "b", "-r", "4", "--max-iter",
         "2", np_)  # fmt: skip
    _cli("bank", "build", f["bank-diag-fp16"], lora, f["rerank-r4"], "--form", "diagonal", "--dtype", "float16",
         "-r", "4", "--max-iter", "2", np_)  # fmt: skip
    _cli("bank", "build", f["bank-target"], lora, f["nola-k4"], f["compress-budget"], "--target-error", "0.01", "-r",
         "8", "--max-iter", "2", np_)  # fmt: skip
    shutil.copy(f["bank-build"], f["bank-add"])
    _cli("bank", "add", f["bank-add"], f["rerank-r16-lora"], "--name", "c", np_)
    _cli("bank", "refit", f["bank-add"], "--out", f["bank-refit"], "--max-iter", "2", np_)
    _cli("convert", f["bank-refit"], f["bank-fp16-zstd"], "--dtype", "fp16", "--codec", "zstd", np_)
    _cli("bank", "extract", f["bank-refit"], "c", f["bank-extract"], "--codec", "raw")
    _cli("bank", "extract", f["bank-refit"], "b", f["bank-extract-svd"], "--to", "svd")
    shutil.copy(f["bank-diag-fp16"], f["bank-add-nogrow"])
    _cli("bank", "add", f["bank-add-nogrow"], f["compress-budget"], "--name", "q", "--no-grow", np_)
    _cli("convert", f["bank-refit"], f["bank-rank2"], "--rank", "2", np_)  # every member's shared records to svd
    _cli("rerank", f["bank-refit"], f["rerank-bank-member"], "--adapter", "b", "--rank", "3", np_)
    _cli("compress", f["bank-refit"], f["compress-bank-member"], "--adapter", "a", "--budget", "300KB", "--bits", "16", np_)

    # the public API: several adapters of mixed encodings in one file; adapters opened at a rank, saved
    parts = []
    for name, src in (("lora", lora), ("nola", f["nola-k4"]), ("svd", f["rerank-r4"]), ("qsvd", f["compress-bits"])):
        ad = adapterpack.open(src)
        ad.name = name
        parts.append(ad)
    adapterpack.save(parts, f["api-multi"], codec="zstd")
    for ad in parts:
        ad.close()
    _cli("convert", f["api-multi"], f["multi-bf16"], "--dtype", "bf16", "--codec", "pco", np_)
    _cli("convert", f["api-multi"], f["multi-rank2"], "--rank", "2", "--codec", "byteplanes", np_)
    for kind, src, rank, codec in (("svd", f["rerank-r4"], 2, "pco"), ("qsvd", f["compress-budget"], 2, "raw"),
                                   ("lora", lora, 3, "zstd"), ("nola", f["nola-k4"], 2, "byteplanes")):  # fmt: skip
        with adapterpack.open(src, rank=rank) as ad:
            adapterpack.save(ad, f[f"api-at-rank-{kind}"], codec=codec)

    # pass-through tensors of every dtype (the example has none), saved by the API, then converted, re-ranked, banked
    with adapterpack.open(example) as ad:
        ad.tensors.update(_passthrough())
        adapterpack.save(ad, f["pt-pco"], codec="pco")
    _cli("convert", f["pt-pco"], f["pt-bf16-pco12"], "--dtype", "bf16", "--codec", "pco", "--level", "12", np_)
    _cli("convert", f["pt-pco"], f["pt-fp16-byteplanes22"], "--dtype", "fp16", "--codec", "byteplanes", "--level",
         "22", np_)  # fmt: skip
    _cli("rerank", f["pt-pco"], f["pt-rerank-zstd22"], "--rank", "2", "--codec", "zstd", "--level", "22", np_)
    _cli("bank", "build", f["pt-bank-f64"], f["pt-pco"], lora, "-r", "2", "--max-iter", "1", "--dtype", "float64", np_)
    return f


def _passthrough() -> dict[str, np.ndarray]:
    import ml_dtypes

    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((7, 5)).astype(np.float32), "bf16": rng.standard_normal((3, 65)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal(33).astype(np.float16), "f64": rng.standard_normal((4, 4)),
        "i8": rng.integers(-128, 128, 10).astype(np.int8), "u8": rng.integers(0, 256, 300).astype(np.uint8),
        "i16": rng.integers(-3000, 3000, (5, 7)).astype(np.int16), "i32": rng.integers(-3000, 3000, 6).astype(np.int32),
        "i64": rng.integers(-3000, 3000, (2, 3)).astype(np.int64), "bool": rng.integers(0, 2, 9).astype(bool),
        "empty": np.zeros((0, 4), np.float32), "scalar": np.array(3.5, np.float32),
    }  # fmt: skip


def _entry(m: ref.Module) -> dict[str, Any]:
    """The reference reader's module as _reference.py's module entry (its tensors the decoded arrays)."""
    return {"name": m.name, "encoding": m.encoding, "base_shape": m.base_shape, "params": m.params, "tensors": m.tensors}


def _delta_problem(m: ref.Module, lib: np.ndarray) -> str | None:
    """spec/vectors.md §2: max |ΔW_a − ΔW_ref| <= 1e-5·max(1, max |ΔW_ref|) where ΔW_ref is finite, and the same
    non-finite elements elsewhere; None when they agree, else what each says."""
    want = spec_delta.delta(_entry(m), get=lambda t: t)
    got = np.array(lib, dtype=np.float64)  # a copy, subtracted in place (no 576×576 temporaries)
    if got.shape != want.shape:
        return f"shape {got.shape} vs reference {want.shape}"
    finite = np.isfinite(want)
    if not (finite.all() and np.isfinite(got).all()):
        for test in (np.isnan, np.isposinf, np.isneginf):
            if not np.array_equal(test(got), test(want)):
                return f"non-finite elements differ ({test.__name__})"
        got, want = got[finite], want[finite]
    if not want.size:
        return None
    scale = max(1.0, float(want.max()), -float(want.min()))
    np.subtract(got, want, out=got)
    err = max(float(got.max()), -float(got.min()))
    return None if err <= 1e-5 * scale else f"max |ΔW_a − ΔW_ref| = {err:.3e} > {1e-5 * scale:.3e} (max |ΔW_ref| {scale:.3e})"


def _compare(path: Path, apack: ref.Apack, rank: int | None, check_delta: bool) -> list[str]:
    """Every disagreement between the reference reader's ``apack`` and adapterpack's reading of ``path`` (at ``rank``:
    only the svd and qsvd records, whose truncation format.md §8.1 defines)."""
    import adapterpack

    problems: list[str] = []
    for got in apack.adapters:
        with adapterpack.open(path, adapter=got.name, rank=rank) as want:
            if rank is None:
                if (got.name, got.base_model, got.base_architecture) != (want.name, want.base_model, want.base_architecture):
                    problems.append(f"{got.name}: name/base differ")
                if (got.metadata, got.source) != (dict(want.metadata), dict(want.source)):
                    problems.append(f"{got.name}: metadata/source differ")
                if got.skipped_modules or want.skipped:
                    problems.append(f"{got.name}: skipped {got.skipped_modules} vs {want.skipped}")
                if [m.name for m in got.modules] != [m.name for m in want]:
                    problems.append(f"{got.name}: module names/order differ")
                if sorted(got.tensors) != sorted(want.tensors):
                    problems.append(f"{got.name}: pass-through tensors {sorted(got.tensors)} vs {sorted(want.tensors)}")
                for name, arr in got.tensors.items():
                    lib = np.asarray(want.tensors[name].load())
                    if arr.dtype != lib.dtype or arr.shape != lib.shape or arr.tobytes() != lib.tobytes():
                        problems.append(f"{got.name}: pass-through {name} differs")
            nola_checked = {got.modules[0].name, got.modules[-1].name} if got.modules else set()
            for m in got.modules:
                if rank is not None and m.encoding not in ("svd", "qsvd"):
                    continue
                where = f"{got.name}/{m.name}" + ("" if rank is None else f" @rank {rank}")
                wm = want.module(m.name)
                if (m.encoding, list(m.base_shape)) != (wm.encoding, list(wm.base_shape)):
                    problems.append(f"{where}: encoding/base_shape {m.encoding} {m.base_shape} vs {wm.encoding} {wm.base_shape}")
                    continue
                if {k: v for k, v in wm.params.items() if k in m.params} != m.params:
                    problems.append(f"{where}: params {m.params} vs adapterpack {wm.params}")
                if sorted(m.tensors) != sorted(wm.tensors):
                    problems.append(f"{where}: slots {sorted(m.tensors)} vs {sorted(wm.tensors)}")
                    continue
                for slot, arr in m.tensors.items():
                    lib = np.asarray(wm.array(slot))
                    if arr.dtype != lib.dtype or arr.shape != lib.shape:
                        problems.append(f"{where} {slot}: {arr.dtype}{arr.shape} vs adapterpack {lib.dtype}{lib.shape}")
                    elif arr.tobytes() != lib.tobytes():
                        n = int((arr.view(np.uint8) != lib.view(np.uint8)).sum())
                        problems.append(f"{where} {slot}: {n} bytes differ")
                if check_delta and (m.encoding != "nola" or m.name in nola_checked):
                    problem = _delta_problem(m, wm.delta())
                    if problem:
                        problems.append(f"{where} ΔW: {problem}")
    return problems


@pytest.mark.parametrize("kind", KINDS)
def test_reference_reads_what_the_writer_wrote(written: dict[str, Path], kind: str) -> None:
    """(1)-(3): accepted by the spec's reader, every tensor bit-identical, every ΔW within vectors.md §2."""
    path = written[kind]
    apack = ref.read(path.read_bytes())  # a writer MUST NOT write what the spec's reader refuses
    assert not apack.padding_problems, apack.padding_problems
    assert len(apack.adapters) == ADAPTERS.get(kind, 1)
    encodings = {m.encoding for a in apack.adapters for m in a.modules}
    assert encodings == ENCODINGS[kind], encodings
    assert all(len(a.modules) == 120 for a in apack.adapters), [len(a.modules) for a in apack.adapters]
    assert len(apack.adapters[0].tensors) == (len(_passthrough()) if kind in PASSTHROUGH else 0)
    problems = _compare(path, apack, None, check_delta=True)
    assert not problems, f"{len(problems)} disagreements, first: " + "; ".join(problems[:5])


@pytest.mark.parametrize("kind", [k for k in KINDS if ENCODINGS[k] & {"svd", "qsvd"}])
@pytest.mark.parametrize("rank", RANKS)
def test_a_rank_read_agrees(written: dict[str, Path], kind: str, rank: int) -> None:
    """(4): opened at rank j (format.md §8.1; svd.md §3, qsvd.md §3), every svd and qsvd record is the same
    truncation in both readers, bit for bit, and its ΔW agrees with the spec's formula."""
    path = written[kind]
    apack = ref.read(path.read_bytes(), rank=rank)
    cut = [m for a in apack.adapters for m in a.modules if m.encoding in ("svd", "qsvd")]
    assert cut and all(m.params["rank"] <= rank for m in cut)
    problems = _compare(path, apack, rank, check_delta=True)
    assert not problems, f"{len(problems)} disagreements, first: " + "; ".join(problems[:5])
