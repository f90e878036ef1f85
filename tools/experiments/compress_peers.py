"""Rank and bits under one byte budget: `adapterpack compress` against its peers on real SmolLM2 adapters.

For each adapter and each budget (the adapter's fp16 factor size Σ r·(out+in)·2 divided by 4, 8, 16, 32),
every method gets the same bytes and is measured on held-out pydoc blocks against the full adapter
(:class:`tools.experiments.rerank_quality.Evaluator`: W + ΔW, KL(full‖x) per token, top-1 agreement,
perplexity). Methods:

- ``uniform`` / ``balanced`` / ``importance`` × ``fp32`` / ``bf16``: rank only, the library's ``rerank``
  (largest uniform rank that fits; the budget DP with the data-free ``balanced`` weighting; the budget DP on
  measured Fisher importance, ``component_fisher`` on ``--calibration`` TRAIN blocks), lora records;
- ``kohya``: kohya sv_fro (an exact re-implementation of its rule on the exact SVD,
  :func:`tools.experiments.rerank_quality.kohya_sv_fro_rank`, not its script), up = U·S and down = Vᵀ
  saved in bf16 like ``--save_precision bf16``; the threshold on a grid with the most bytes that fit;
- ``q8_0`` / ``q4_0``: llama.cpp block quantization (``gguf.quants``) of the factors after a ``balanced``
  rank cut sized so the quantized bytes fit; a tensor whose row length is not a multiple of 32 (every
  lora_b of rank < 32) is stored F16, as llama.cpp's converter falls back;
- ``loraquant``: LoRAQuant-style, written from the paper's description: SVD split B' = U√S, A' = √S·Vᵀ,
  the leading h components at 3 bits (asymmetric RTN, fp16 scale and minimum per 64 values), the rest
  1-bit sign with an fp16 scale (mean |x|) per 64 values; h = the components holding a fraction ρ of
  σ², components past a fraction ρ_keep cut, (ρ, ρ_keep) the grid point with the least estimated
  ‖ΔW − ΔŴ‖² that fits (no gradient refinement: no data);
- ``compeft``: ComPEFT-style, top-k sparsified ternary A and B (scale folded into B), one scale per tensor
  (the L2-optimal mean |kept|); bytes = ideal entropy of the positions + one sign bit per kept value +
  fp16 scale; one density for all tensors, the grid point with the least exact ‖ΔW − ΔŴ‖² that fits;
- ``ours``: ``adapterpack.ops.compress`` (data-free, and ``ours+imp`` with the same importance), its whole
  ``.apack`` file written and measured.

Bytes: ours is the whole written file (index, padding, checksums included). Every peer is counted as its
payload plus 16 B of metadata per tensor (shape and dtype; no names, no index), which favours the peers.

    nice -n 5 python -m tools.experiments.compress_peers --adapters example --blocks 16 --json /tmp/cp.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import adapterpack
from adapterpack.adapter import Adapter
from adapterpack.linalg import allocate

META = 16  # bytes of metadata granted to each peer tensor (shape and dtype)
GROUP = 64  # LoRAQuant-style group size
DIVISORS = (4, 8, 16, 32)
RANK_ONLY = tuple(f"{w}-{d}" for w in ("uniform", "balanced", "importance") for d in ("fp32", "bf16"))
PEERS = (*RANK_ONLY, "kohya-bf16", "q8_0", "q4_0", "loraquant", "compeft")
OURS = ("ours", "ours+imp")
DIAGNOSTIC = ("ours-payload", "ours+imp-payload")  # ours counted like the peers (payload + metadata), not whole-file
METHODS = (*PEERS, *OURS, *DIAGNOSTIC)
KOHYA_GRID = tuple(np.round(np.arange(0.05, 0.99951, 0.0005), 4))


# --- one module's exact SVD ------------------------------------------------------------------------


@dataclass
class Src:
    """One module: its factors (scale folded into B) and its exact SVD (k nonzero components)."""

    name: str
    A: np.ndarray  # r×in float64
    B: np.ndarray  # out×r float64, scale folded in
    S: np.ndarray  # k
    U: np.ndarray  # out×k
    Vt: np.ndarray  # k×in

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]


def sources(adapter: Adapter) -> list[Src]:
    """Every module's factors and exact SVD (the library's QR route, never a dense SVD)."""
    from adapterpack.ops.spectrum import module_spectrum

    out = []
    for m in adapter:
        f = m.factors()
        if f.transpose or f.layout != "linear":
            raise SystemExit(f"{m.name}: only plain linear LoRA modules are handled here")
        sp = module_spectrum(m)
        k = int(np.count_nonzero(sp.S > 0))
        u, vt = sp.vectors(k)
        out.append(Src(m.name, np.asarray(f.A, np.float64), np.asarray(f.B, np.float64) * f.scale, sp.S[:k].copy(), u, vt))
    return out


def split(s: Src, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced rank-r factors: B' = U√S, A' = √S·Vᵀ."""
    root = np.sqrt(s.S[:r])
    return s.U[:, :r] * root, root[:, None] * s.Vt[:r]


def err2(b: np.ndarray, a: np.ndarray, bh: np.ndarray, ah: np.ndarray) -> float:
    """Exact ‖b·a − bh·ah‖²_F through Gram products (no out×in matrix)."""
    x = np.concatenate([b, bh], axis=1)
    y = np.concatenate([a, -ah], axis=0)
    return float(max(np.sum((x.T @ x) * (y @ y.T)), 0.0))


# --- a variant: ΔW per module as (B̂, Â) --------------------------------------------------------------


@dataclass
class Delta:
    """ΔW = b·a of one module, in the duck type :class:`Evaluator` applies (``name``, ``delta()``)."""

    name: str
    b: np.ndarray
    a: np.ndarray

    def delta(self) -> np.ndarray:
        return np.asarray(self.b, np.float32) @ np.asarray(self.a, np.float32)


@dataclass
class Variant:
    method: str
    modules: Any  # iterable of objects with .name and .delta() (an Adapter, or a list of Delta)
    nbytes: int
    note: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def meta_for(n_tensors: int) -> int:
    return META * n_tensors


# --- rank-only through the library ----------------------------------------------------------------------


def rank_only(adapter: Adapter, srcs: list[Src], budget: int, weighting: str, dtype: str, imp: Any) -> Variant:
    """``rerank`` (lora records in ``dtype``) under the budget less the peers' tensor metadata."""
    from adapterpack.ops.rerank import RerankPolicy, rerank

    item = 4 if dtype == "fp32" else 2
    dname = "float32" if dtype == "fp32" else "bfloat16"
    payload_budget = budget - meta_for(2 * len(srcs))
    per_rank = sum((s.shape[0] + s.shape[1]) * item for s in srcs)
    if weighting == "uniform":
        j = max(payload_budget // per_rank, 0)
        j = min(j, max(len(s.S) for s in srcs))
        if j == 0:
            return Variant(f"uniform-{dtype}", [], 0, "rank 0: the base model", {"ranks": [0]})
        policy = RerankPolicy(rank=int(j), encoding="lora", dtype=dname)
    elif weighting == "balanced":
        policy = RerankPolicy(budget=int(payload_budget), encoding="lora", dtype=dname, min_rank=0, weighting="balanced")
    else:
        policy = RerankPolicy(budget=int(payload_budget), encoding="lora", dtype=dname, min_rank=0, importance=imp)
    out, report = rerank(adapter, policy)
    ranks = [p.new_rank for p in report.modules]
    kept = [m for m, p in zip(out, report.modules) if p.new_rank > 0]
    payload = sum(p.bytes_after for p in report.modules if p.new_rank > 0)
    return Variant(f"{weighting}-{dtype}", kept, payload + meta_for(2 * len(kept)), info={"ranks": ranks})


# --- kohya sv_fro ---------------------------------------------------------------------------------


def bf16(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (nearest even), returned as float32."""
    import ml_dtypes

    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def kohya(srcs: list[Src], budget: int) -> Variant:
    """sv_fro at the grid threshold with the most bytes within the budget; up = U·S, down = Vᵀ in bf16."""
    from tools.experiments.rerank_quality import kohya_sv_fro_rank

    caps = [s.A.shape[0] for s in srcs]
    best: tuple[int, float, list[int]] | None = None
    for t in KOHYA_GRID:
        ranks = [min(kohya_sv_fro_rank(s.S, min(s.shape), float(t), c), len(s.S)) for s, c in zip(srcs, caps)]
        b = sum(r * (s.shape[0] + s.shape[1]) * 2 for r, s in zip(ranks, srcs)) + meta_for(2 * len(srcs))
        if b <= budget and (best is None or b > best[0]):
            best = (b, float(t), ranks)
    if best is None:
        return Variant("kohya-bf16", None, 0, "does not fit: sv_fro keeps at least rank 1 (2 when it can) per module")
    b, t, ranks = best
    mods = [Delta(s.name, bf16(s.U[:, :r] * s.S[:r]), bf16(s.Vt[:r])) for s, r in zip(srcs, ranks)]
    return Variant("kohya-bf16", mods, b, f"sv_fro {t:g}", {"ranks": ranks, "threshold": t})


# --- llama.cpp Q8_0 / Q4_0 -----------------------------------------------------------------------------


def ggml_bytes(rows: int, cols: int, qtype: str) -> int:
    """Bytes of a rows×cols tensor in ``qtype`` (F16 when cols is not a multiple of 32)."""
    if cols % 32:
        return rows * cols * 2
    return rows * (cols // 32) * (34 if qtype == "q8_0" else 18)


def ggml_roundtrip(x: np.ndarray, qtype: str) -> np.ndarray:
    import gguf.quants as q

    x = np.ascontiguousarray(x, np.float32)
    if x.shape[1] % 32:
        return x.astype(np.float16).astype(np.float32)
    t = q.GGMLQuantizationType.Q8_0 if qtype == "q8_0" else q.GGMLQuantizationType.Q4_0
    return np.asarray(q.dequantize(q.quantize(x, t), t), np.float32).reshape(x.shape)


def ggml_variant(srcs: list[Src], budget: int, qtype: str) -> Variant:
    """Balanced rank cut (data-free library DP), then Q8_0/Q4_0 of both factors; the largest cut that fits."""
    items = [
        allocate.Item(s.name, s.S**2, ggml_bytes(1, s.shape[1], qtype) + s.shape[0] * 2, tuple(range(len(s.S) + 1)))
        for s in srcs
    ]
    spend = budget - meta_for(2 * len(srcs))
    while spend > 0:
        ranks = allocate.budget_dp(items, spend, "balanced")
        mods, total = [], 0
        for s in srcs:
            r = ranks[s.name]
            if r == 0:
                continue
            b, a = split(s, r)
            total += ggml_bytes(r, s.shape[1], qtype) + ggml_bytes(s.shape[0], r, qtype) + meta_for(2)
            mods.append(Delta(s.name, ggml_roundtrip(b, qtype), ggml_roundtrip(a, qtype)))
        if total <= budget:
            return Variant(qtype, mods, total, info={"ranks": [ranks[s.name] for s in srcs]})
        spend -= max(total - budget, 1)
    return Variant(qtype, [], 0, "rank 0: the base model")


# --- LoRAQuant-style -------------------------------------------------------------------------------------


def rtn3(x: np.ndarray) -> np.ndarray:
    """3-bit asymmetric round-to-nearest per group of GROUP values (fp16 scale and minimum)."""
    g = x.reshape(-1, GROUP)
    lo = g.min(axis=1, keepdims=True).astype(np.float16).astype(np.float64)
    sc = ((g.max(axis=1, keepdims=True) - lo) / 7).astype(np.float16).astype(np.float64)
    sc[sc == 0] = 1.0
    q = np.clip(np.round((g - lo) / sc), 0, 7)
    return (q * sc + lo).reshape(x.shape)


def sign1(x: np.ndarray) -> np.ndarray:
    """1-bit sign with an fp16 scale (mean |x|) per group of GROUP values."""
    g = x.reshape(-1, GROUP)
    al = np.abs(g).mean(axis=1, keepdims=True).astype(np.float16).astype(np.float64)
    return (np.where(g >= 0, 1.0, -1.0) * al).reshape(x.shape)


def lq_component_bytes(n: int, bits: int) -> int:
    return n * bits // 8 + (n // GROUP) * (4 if bits == 3 else 2)


def loraquant(srcs: list[Src], budget: int) -> Variant:
    """The (ρ, ρ_keep) grid point with the least estimated squared ΔW error within the budget."""
    per = []
    for s in srcs:
        b, a = split(s, len(s.S))
        n_out, n_in = s.shape
        if n_out % GROUP or n_in % GROUP:
            raise SystemExit(f"{s.name}: dimensions not multiples of {GROUP}")
        q3 = (rtn3(b.T).T, rtn3(a))
        q1 = (sign1(b.T).T, sign1(a))
        e = {}
        for key, (bh, ah) in (("3", q3), ("1", q1)):
            bb, aa = np.sum(b * b, 0), np.sum(a * a, 1)
            e[key] = bb * aa + np.sum(bh * bh, 0) * np.sum(ah * ah, 1) - 2 * np.sum(b * bh, 0) * np.sum(a * ah, 1)
        cum = np.cumsum(s.S**2) / np.sum(s.S**2)
        per.append((s, cum, e, q3, q1, lq_component_bytes(n_out, 3) + lq_component_bytes(n_in, 3),
                    lq_component_bytes(n_out, 1) + lq_component_bytes(n_in, 1)))
    grid = np.round(np.concatenate([[0.0], np.linspace(0.05, 1.0, 96)]), 4)
    kmax = max(len(s.S) for s in srcs)
    n = len(per)
    counts = np.zeros((n, len(grid)), np.int64)  # components holding a fraction grid[g] of σ² (0 at ρ = 0)
    tail = np.zeros((n, kmax + 1))  # Σ σ² past k
    e3 = np.zeros((n, kmax + 1))  # Σ of the first h 3-bit errors
    e1 = np.zeros((n, kmax + 1))
    c3 = np.array([p[5] for p in per])
    c1 = np.array([p[6] for p in per])
    for i, (s, cum, e, *_rest) in enumerate(per):
        k = len(s.S)
        counts[i, 1:] = np.minimum(np.searchsorted(cum, grid[1:] - 1e-12) + 1, k)
        t = np.concatenate([np.cumsum((s.S**2)[::-1])[::-1], [0.0]])
        tail[i, : k + 1] = t
        e3[i, 1 : k + 1] = np.cumsum(e["3"])
        e3[i, k + 1 :] = e3[i, k]
        e1[i, 1 : k + 1] = np.cumsum(e["1"])
        e1[i, k + 1 :] = e1[i, k]
    rows = np.arange(n)
    best = None
    for ik in range(1, len(grid)):
        k = counts[:, ik]
        for ih in range(0, ik + 1):
            h = np.minimum(counts[:, ih], k)
            total = int(np.sum(h * c3 + (k - h) * c1 + np.where(k > 0, meta_for(4), 0)))
            if total > budget:
                continue
            err = float(np.sum(tail[rows, k] + e3[rows, h] + e1[rows, k] - e1[rows, h]))
            if best is None or err < best[0]:
                best = (err, total, float(grid[ih]), float(grid[ik]), list(zip(k.tolist(), h.tolist())))
    if best is None:
        return Variant("loraquant", None, 0, "does not fit")
    _err, total, rh, rk, plan = best
    mods = []
    for (s, _cum, _e, q3, q1, _c3, _c1), (k, h) in zip(per, plan):
        if k == 0:
            continue
        b = np.concatenate([q3[0][:, :h], q1[0][:, h:k]], axis=1)
        a = np.concatenate([q3[1][:h], q1[1][h:k]], axis=0)
        mods.append(Delta(s.name, b, a))
    ks = [k for k, _h in plan]
    hs = [h for _k, h in plan]
    return Variant("loraquant", mods, total, f"ρ={rh:g}, ρ_keep={rk:g}", {"ranks": ks, "h": hs})


# --- ComPEFT-style -----------------------------------------------------------------------------------


def ternary(x: np.ndarray, density: float) -> tuple[np.ndarray, int]:
    """Top-k by magnitude, sign · one L2-optimal scale; and its bytes (entropy-coded positions + signs + fp16 scale)."""
    n = x.size
    k = max(1, round(density * n))
    flat = np.abs(x).ravel()
    idx = np.argpartition(flat, n - k)[n - k :]
    mask = np.zeros(n, bool)
    mask[idx] = True
    alpha = float(np.float16(flat[mask].mean()))
    out = np.where(mask, np.sign(x.ravel()) * alpha, 0.0).reshape(x.shape)
    d = k / n
    h = 0.0 if d >= 1 else -(d * math.log2(d) + (1 - d) * math.log2(1 - d))
    return out, math.ceil((n * h + k) / 8) + 2 + META


def compeft(srcs: list[Src], budget: int) -> Variant:
    grid = np.round(np.geomspace(0.001, 1.0, 40), 5)
    best = None
    for d in grid:
        total, err, mods = 0, 0.0, []
        for s in srcs:
            bh, nb = ternary(s.B, float(d))
            ah, na = ternary(s.A, float(d))
            total += nb + na
            if total > budget:
                break
            err += err2(s.B, s.A, bh, ah)
            mods.append(Delta(s.name, bh, ah))
        if total <= budget and (best is None or err < best[0]):
            best = (err, total, float(d), mods)
    if best is None:
        return Variant("compeft", None, 0, "does not fit")
    _e, total, d, mods = best
    return Variant("compeft", mods, total, f"density {d:g}", {"density": d})


# --- ours ----------------------------------------------------------------------------------------


def ours_payload(src_path: Path, budget: int, work: Path, imp: Any) -> Variant:
    """DIAGNOSTIC, not the whole-file rule: ours counted like the peers (record payload + META per stored tensor,
    3 per qsvd module), i.e. ``compress`` given the budget plus what its file spends on index and padding."""
    method = "ours+imp-payload" if imp is not None else "ours-payload"
    side = work / f"{method}_{budget}.json"
    if side.is_file() and (work / f"{method}_{budget}.apack").is_file():
        info = json.loads(side.read_text())
        return Variant(method, adapterpack.open(work / f"{method}_{budget}.apack"), info.pop("counted"), info.pop("note", ""), info)
    from adapterpack.ops.compress import compress_file

    dst = work / f"{method}_{budget}.apack"
    extra = 0
    whole = work / f"{method.removesuffix('-payload')}_{budget}.apack"
    if whole.is_file():  # start from what the whole-file run spent beyond the payload
        with adapterpack.open(whole) as ad:
            extra = whole.stat().st_size - sum(m.decoded_bytes + meta_for(3) for m in ad)
    for _ in range(3):
        res = compress_file(src_path, dst, force=True, budget=budget + extra, importance=imp, min_rank=0)
        mods = [m for m in res.report.modules if m.rank > 0]
        counted = sum(m.nbytes for m in mods) + meta_for(3 * len(mods))
        size = dst.stat().st_size
        if counted <= budget and size - counted <= extra + budget // 200:  # payload fits, < 0.5% left unused
            break
        extra = size - counted if counted <= budget else extra - (counted - budget)
    if counted > budget:
        return Variant(method, None, 0, f"could not fit the payload ({counted:,} B)")
    info = {"ranks": [m.rank for m in res.report.modules], "file_bytes": size,
            "mean_bits": float(np.mean([b for m in res.report.modules for b in m.bits] or [0]))}
    side.write_text(json.dumps({**info, "counted": counted, "note": f"file {size:,} B"}) + "\n")
    return Variant(method, adapterpack.open(dst), counted, f"file {size:,} B", info)


def ours(src_path: Path, budget: int, work: Path, imp: Any) -> Variant:
    """``adapterpack.ops.compress.compress_file`` (library defaults) writing a whole .apack within the budget;
    bytes = the written file's size. When the defaults refuse (min_rank 1 does not fit), min_rank 0."""
    method = "ours+imp" if imp is not None else "ours"
    try:
        from adapterpack.ops.compress import compress_file
    except ImportError:
        return Variant(method, None, 0, "adapterpack.ops.compress not on this branch yet")
    from adapterpack.errors import ConversionError

    dst = work / f"{method}_{budget}.apack"
    side = dst.with_suffix(".json")
    if dst.is_file() and side.is_file():  # written by an earlier run (--precompute): same budget, same source
        info = json.loads(side.read_text())
        note = info.pop("note", "")
        return Variant(method, adapterpack.open(dst), dst.stat().st_size, note, info)
    note = ""
    t0 = time.perf_counter()
    try:
        res = compress_file(src_path, dst, force=True, budget=budget, importance=imp)
    except ConversionError as e:
        note = f"min_rank 0 ({e})"
        try:
            res = compress_file(src_path, dst, force=True, budget=budget, importance=imp, min_rank=0)
        except ConversionError as e2:
            return Variant(method, None, 0, f"does not fit: {e2}")
    size = dst.stat().st_size
    ranks = [m.rank for m in res.report.modules]
    bits = [b for m in res.report.modules for b in m.bits]
    info = {"ranks": ranks, "mean_bits": float(np.mean(bits)) if bits else None, "seconds": time.perf_counter() - t0}
    side.write_text(json.dumps({**info, "note": note}) + "\n")
    return Variant(method, adapterpack.open(dst), size, note, info)


# --- the experiment ------------------------------------------------------------------------------


def fp16_bytes(srcs: list[Src]) -> int:
    return sum(s.A.shape[0] * (s.shape[0] + s.shape[1]) * 2 for s in srcs)


def importance_for(ev: Any, full: Adapter, label: str, n_cal: int, cache: Path) -> Path:
    """Fisher importance of the adapter's components on ``n_cal`` TRAIN blocks (cached on disk)."""
    from adapterpack.ops.importance import load_importance
    from adapterpack.torch.fit.fisher import component_fisher
    from tools.fixtures import smollm2

    path = cache / f"{label}.cal{n_cal}.importance.safetensors"
    if path.is_file():
        load_importance(path)
        return path
    ev.apply(None)
    train = smollm2.pydoc_blocks("train", tokenizer=smollm2.load_tokenizer())
    cal = train[np.unique(np.linspace(0, train.shape[0] - 1, num=min(n_cal, train.shape[0])).round().astype(np.int64))]
    t0 = time.perf_counter()
    imp = component_fisher(ev.model, full, [cal[i : i + 4] for i in range(0, cal.shape[0], 4)], labels="sample", seed=0)
    imp.save(path)
    print(f"   importance: {cal.shape[0]} blocks, {time.perf_counter() - t0:.0f} s -> {path}", file=sys.stderr)
    return path


def digest(modules: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for m in modules:
        h.update(m.name.encode())
        h.update(np.ascontiguousarray(m.delta(), np.float32).tobytes()[:: 4096])
    return h.hexdigest()[:16]


def build(method: str, ctx: dict[str, Any], budget: int) -> Variant:
    full, srcs, imp, work, path = (ctx[k] for k in ("full", "srcs", "imp", "work", "path"))
    if method in RANK_ONLY:
        w, d = method.split("-")
        return rank_only(full, srcs, budget, w, d, imp)
    if method == "kohya-bf16":
        return kohya(srcs, budget)
    if method in ("q8_0", "q4_0"):
        return ggml_variant(srcs, budget, method)
    if method == "loraquant":
        return loraquant(srcs, budget)
    if method == "compeft":
        return compeft(srcs, budget)
    if method == "ours":
        return ours(path, budget, work, None)
    if method == "ours+imp":
        return ours(path, budget, work, imp)
    if method == "ours-payload":
        return ours_payload(path, budget, work, None)
    if method == "ours+imp-payload":
        return ours_payload(path, budget, work, imp)
    raise SystemExit(f"unknown method {method!r}")


def run_adapter(ev: Any, label: str, path: Path, methods: list[str], divisors: list[int], n_cal: int,
                cache: Path, results: dict[str, Any], save: Callable[[], None], force: bool) -> None:
    full = adapterpack.open(path)
    srcs = sources(full)
    f16 = fp16_bytes(srcs)
    print(f"== {label}: {len(srcs)} modules, fp16 factors {f16:,} B", file=sys.stderr)
    res = results.setdefault(label, {"path": str(path), "modules": len(srcs), "rank": max(s.A.shape[0] for s in srcs),
                                     "fp16_bytes": f16, "rows": {}})
    rows = res["rows"]
    todo = [(m, d) for d in divisors for m in methods if force or f"{m}/{d}" not in rows]
    if not todo and "full" in res:
        return
    t0 = time.perf_counter()
    ev.apply(None)  # the previous adapter's last variant off: W0 back before its copies are forgotten
    ev.base.clear()
    res["full"] = ev.set_reference(full)
    print(f"   full: ppl {res['full']['ppl']:.4f} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if "base" not in res:
        res["base"] = ev.measure(None)
    imp_path = None
    if any(m.startswith("importance") or m.startswith("ours+imp") for m, _ in todo):
        imp_path = importance_for(ev, full, label, n_cal, cache)
    from adapterpack.ops.importance import load_importance

    ctx = {"full": full, "srcs": srcs, "imp": load_importance(imp_path) if imp_path else None, "work": cache / "work" / label,
           "path": path}
    ctx["work"].mkdir(parents=True, exist_ok=True)
    seen: dict[str, dict[str, Any]] = {}
    for m, d in todo:
        budget = f16 // d
        t0 = time.perf_counter()
        try:
            v = build(m, ctx, budget)
        except Exception as e:  # a peer that cannot be built is a result, not a crash
            v = Variant(m, None, 0, f"error: {type(e).__name__}: {e}")
        row: dict[str, Any] = {"method": m, "div": d, "budget": budget, "bytes": v.nbytes, "note": v.note,
                               "ranks_mean": float(np.mean(v.info["ranks"])) if "ranks" in v.info else None,
                               "mean_bits": v.info.get("mean_bits")}
        if v.modules is not None:
            if v.nbytes > budget:
                raise SystemExit(f"{label} {m} /{d}: {v.nbytes:,} B over the budget {budget:,} B")
            mods = list(v.modules)
            key = digest(mods) if mods else "base"
            if key == "base":
                meas = dict(res["base"])
            elif key in seen:
                meas = dict(seen[key])
            else:
                meas = ev.measure(mods)
            seen[key] = meas
            row.update(meas)
        rows[f"{m}/{d}"] = row
        kl = f"KL {row['kl'] * 1e3:8.3f}e-3 ppl {row['ppl']:.4f} top1 {row['top1']:.4f}" if "kl" in row else "—"
        print(f"   /{d:<2} {m:16s} {v.nbytes:>10,} B  {kl}  {v.note} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        save()
    full.close()


def markdown(results: dict[str, Any], methods: list[str], all_divisors: list[int], blocks: int) -> str:
    """Per adapter: KL(full‖x)×10³ (bytes used) and perplexity change / top-1 agreement, methods × budgets."""
    out = []
    for label, res in results.items():
        if "full" not in res:
            continue
        f16 = res["fp16_bytes"]
        divisors = [d for d in all_divisors if any(f"{m}/{d}" in res["rows"] for m in methods)]
        out.append(f"**{label}** ({res['modules']} modules, rank {res['rank']}, fp16 factors {f16:,} B; full adapter "
                   f"perplexity {res['full']['ppl']:.3f}; base model KL×10³ {res['base']['kl'] * 1e3:.1f}; "
                   f"{blocks} held-out blocks). KL(full‖x)×10³ per token (bytes used, k = 1000 B):\n")
        head = "| method | " + " | ".join(f"fp16/{d} = {f16 // d:,} B" for d in divisors) + " |"
        sep = "|---|" + "---:|" * len(divisors)
        second = ["", "Perplexity change against the full adapter · top-1 agreement:\n", head, sep]
        out += [head, sep]
        for m in methods:
            kl, pt = [], []
            for d in divisors:
                r = res["rows"].get(f"{m}/{d}")
                if r is None:
                    kl.append("")
                    pt.append("")
                elif "kl" not in r:
                    kl.append("does not fit")
                    pt.append("—")
                else:
                    base = " (= base model)" if r["bytes"] == 0 else ""
                    kl.append(f"{r['kl'] * 1e3:.3f} ({r['bytes'] / 1e3:.0f}k){base}")
                    pt.append(f"{(r['ppl'] / res['full']['ppl'] - 1) * 100:+.2f}% · {r['top1'] * 100:.1f}%")
            name = f"**{m}**" if m in OURS else (f"*{m}*" if m in DIAGNOSTIC else m)
            out.append(f"| {name} | " + " | ".join(kl) + " |")
            second.append(f"| {name} | " + " | ".join(pt) + " |")
        out += [*second, ""]
    return "\n".join(out)


def aims(results: dict[str, Any], divisors: list[int]) -> str:
    """Per adapter and budget: ours vs the best peer; at /8 ours vs ¼ of the best rank-only; at /16 ppl."""
    lines = []
    for label, res in results.items():
        rows = res.get("rows", {})
        for who in OURS:
            for d in divisors:
                o = rows.get(f"{who}/{d}")
                if not o or "kl" not in o:
                    continue
                peers = [(rows[f"{p}/{d}"]["kl"], p) for p in PEERS if "kl" in rows.get(f"{p}/{d}", {})]
                ro = [(rows[f"{p}/{d}"]["kl"], p) for p in RANK_ONLY if "kl" in rows.get(f"{p}/{d}", {})]
                s = f"{label} {who} /{d}: KL {o['kl'] * 1e3:.3f}e-3"
                if peers:
                    bk, bp = min(peers)
                    s += f"; best peer {bp} {bk * 1e3:.3f}e-3 ({'beats' if o['kl'] < bk else 'MISSES'}, ratio {o['kl'] / bk:.2f})"
                if d == 8 and ro:
                    rk, rp = min(ro)
                    verdict = "holds" if o["kl"] <= rk / 4 else "MISSES"
                    s += f"; ¼ of best rank-only ({rp}) = {rk / 4 * 1e3:.3f}e-3 ({verdict}, ours/best rank-only {o['kl'] / rk:.2f})"
                if d == 16:
                    dp = (o["ppl"] / res["full"]["ppl"] - 1) * 100
                    s += f"; ppl {dp:+.2f}% ({'holds' if abs(dp) <= 0.5 else 'MISSES'} 0.5%)"
                lines.append("- " + s)
    return "\n".join(lines)


def resolve(name: str) -> tuple[str, Path]:
    from adapterpack.examples import example_path
    from tools.fixtures import smollm2

    if name == "example":
        return "bundled-r8-qkvo", example_path()
    if name == "r64":
        return "r64-all-linear", smollm2.cache_root() / "rerank-r64"
    if name.startswith("lora0"):
        return name, smollm2.cache_root() / "bank-loras" / name
    return Path(name).name, Path(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.experiments.compress_peers", description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", default="example", help="comma list: example, r64, lora00..lora04 or PEFT folders")
    ap.add_argument("--methods", default=",".join(METHODS), help="default: %(default)s")
    ap.add_argument("--divisors", default="4,8,16,32", help="budgets = fp16 factor bytes / each (default: %(default)s)")
    ap.add_argument("--blocks", type=int, default=16, help="held-out blocks (default: %(default)s)")
    ap.add_argument("--calibration", type=int, default=64, help="TRAIN blocks for importance (default: %(default)s)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "adapterpack" / "compress-peers"))
    ap.add_argument("--json", required=True, help="results file (read first: rows already measured are kept)")
    ap.add_argument("--markdown", help="write the tables here")
    ap.add_argument("--force", action="store_true", help="re-measure rows already in --json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tables-only", action="store_true", help="print the tables of the --json files (comma list) and exit")
    args = ap.parse_args(argv)

    if args.tables_only:  # no model: the tables of one or more result files (comma list)
        docs = [json.loads(Path(p).read_text()) for p in args.json.split(",") if Path(p).is_file()]
        merged: dict[str, Any] = {}
        for d in docs:  # rows of the same adapter from several files are put together
            for k, v in d["results"].items():
                if k in merged:
                    merged[k]["rows"].update(v["rows"])
                else:
                    merged[k] = v
        divs = [int(x) for x in args.divisors.split(",") if x]
        allm = [m for m in METHODS if any(f"{m}/{d}" in r.get("rows", {}) for r in merged.values() for d in divs)]
        print(markdown(merged, allm, divs, docs[0]["blocks"]) + "\n" + aims(merged, divs))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    divisors = [int(x) for x in args.divisors.split(",") if x]
    jpath = Path(args.json)
    doc = json.loads(jpath.read_text()) if jpath.is_file() else {"results": {}}
    if doc.get("blocks", args.blocks) != args.blocks:
        raise SystemExit(f"{jpath} holds {doc['blocks']} blocks, not {args.blocks}")
    doc["blocks"] = args.blocks
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    doc.setdefault("commands", []).append("python -m tools.experiments.compress_peers " + cmd)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        tmp = jpath.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, jpath)

    from tools.experiments.rerank_quality import Evaluator

    ev = Evaluator(args.blocks)
    for name in [a for a in args.adapters.split(",") if a]:
        label, path = resolve(name)
        if not (path / "adapter_model.safetensors").is_file() and not path.is_file():
            print(f"[skip] {label}: {path} not there (yet)", file=sys.stderr)
            continue
        run_adapter(ev, label, path, methods, divisors, args.calibration, cache, doc["results"], save, args.force)
    save()
    allm = [m for m in METHODS if any(f"{m}/{d}" in r.get("rows", {}) for r in doc["results"].values() for d in divisors)]
    md = markdown(doc["results"], allm, divisors, args.blocks) + "\n" + aims(doc["results"], divisors) + "\n"
    if args.markdown:
        Path(args.markdown).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
