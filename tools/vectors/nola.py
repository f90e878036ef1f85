"""Golden vectors of the ``nola`` encoding (spec/nola.md), with a reference decoder written from the spec.

The reference (:func:`reference_delta`) regenerates bases with a plain-Python, one-counter-at-a-time
Philox4x32-10 (:func:`philox_word`), independent of the library's vectorized numpy and torch
generators, so the vectors check those against the spec. Each vector's adapter metadata carries
``nola.basis_values``: generated words and values an implementation can check its generator with.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from adapterpack.adapter import Adapter, Module

ENCODING = "nola"
BF16 = np.dtype(ml_dtypes.bfloat16)
MASK = 0xFFFFFFFF
KIND = {"A": 0, "B": 1, "A0": 2, "B0": 3}


# --- spec §2, one counter at a time -------------------------------------------------------------------


def philox(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 of one counter, as spec/nola.md §2 writes it."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK
    return c0, c1, c2, c3


def philox_word(seed: int, stream: int, kind: int, index: int, e: int) -> int:
    """The word behind element ``e`` of a matrix (spec §2.1)."""
    return philox((e // 4, index, stream, kind), (seed & MASK, seed >> 32))[e % 4]


def value(word: int) -> float:
    """spec §2.2: (x >> 8)·2⁻²³ − 1 (exact in binary32 and binary64)."""
    return (word >> 8) * 2.0**-23 - 1.0


def matrix(seed: int, stream: int, kind: int, index: int, rows: int, cols: int) -> np.ndarray:
    """One basis (or generated A0/B0 before its 1/√cols) as float64 ``[rows, cols]``."""
    return np.array([value(philox_word(seed, stream, kind, index, e)) for e in range(rows * cols)]).reshape(rows, cols)


def reference_delta(m: dict[str, Any], array: Callable[[dict[str, Any]], np.ndarray]) -> np.ndarray:
    """ΔW from spec/nola.md §3, in float64, from the vector's JSON alone."""
    p, t = m["params"], m["tensors"]
    fifo = p.get("fan_in_fan_out", False)
    out, inp = (m["base_shape"][1], m["base_shape"][0]) if fifo else m["base_shape"]
    r, seed, stream = p["rank"], p["seed"], p["stream"]
    factors = {}
    for side, rows, cols, coef_slot, k_key in (("A", r, inp, "alpha", "k_A"), ("B", out, r, "beta", "k_B")):
        fixed = p.get(f"{side}0", "generated" if side == "A" else "zero")
        if fixed == "stored":
            mat = array(t[f"{side}0"]).astype(np.float64)
        elif fixed == "generated":
            mat = matrix(seed, stream, KIND[f"{side}0"], 0, rows, cols) / math.sqrt(cols)
        else:
            mat = np.zeros((rows, cols))
        coef = array(t[coef_slot]).astype(np.float64)
        k = p[k_key]
        for i in range(k):
            mat = mat + coef[i] / math.sqrt(k) * matrix(seed, stream, KIND[side], i, rows, cols)
        factors[side] = mat
    d = p["scale"] * factors["B"] @ factors["A"]
    return (d.T if fifo else d).reshape(m["base_shape"])


# --- the vectors ----------------------------------------------------------------------------------------


def _coef(rng: np.random.Generator, k: int, dtype: Any) -> np.ndarray:
    """k/16 for |k| < 32: exact in every float dtype."""
    return (rng.integers(-32, 32, k) / 16).astype(dtype)


def _nola(
    name: str, rng: np.random.Generator, base: tuple[int, int], r: int, k_a: int, k_b: int, dtype: Any, **params: Any
) -> Module:
    p = {
        "generator": "philox4x32-10",
        "generator_version": 1,
        "seed": 7,
        "stream": 0,
        "rank": r,
        "k_A": k_a,
        "k_B": k_b,
        "scale": 2.0,
    }
    p |= params
    tensors: dict[str, np.ndarray] = {"alpha": _coef(rng, k_a, dtype), "beta": _coef(rng, k_b, dtype)}
    out, inp = (base[1], base[0]) if p.get("fan_in_fan_out") else base
    if p.get("A0") == "stored":
        tensors["A0"] = (rng.integers(-8, 8, (r, inp)) / 64).astype(np.float32)
    if p.get("B0") == "stored":
        tensors["B0"] = (rng.integers(-8, 8, (out, r)) / 64).astype(np.float32)
    return Module(name, "nola", base, p, tensors)


def basis_values() -> list[dict[str, Any]]:
    """Words and float32 values of a few basis stretches (spec §5), from :func:`philox_word`."""
    picks = [(0, 0, 0, 0, 0, 8), (7, 0, 0, 3, 0, 8), (7, 0, 1, 1, 13, 6), (2**40 + 5, 2**32 - 1, 2, 0, 1001, 5), (7, 3, 3, 0, 0, 4)]
    out = []
    for seed, stream, kind, index, first, n in picks:
        words = [philox_word(seed, stream, kind, index, e) for e in range(first, first + n)]
        floats = [struct.unpack("<f", struct.pack("<f", value(w)))[0] for w in words]
        out.append({"seed": seed, "stream": stream, "kind": kind, "index": index, "first": first,
                    "words": [f"{w:08x}" for w in words], "values": floats})  # fmt: skip
    return out


def adapter(seed: int = 21) -> Adapter:
    """Shared and separate bases, generated/zero/stored A0 and B0, fp32/fp16/bf16 coefficients,
    fan_in_fan_out, k_A = 0, and a seed above 2^32."""
    rng = np.random.default_rng(seed)
    mods = [
        _nola("model.layers.0.self_attn.q_proj", rng, (8, 12), 2, 5, 7, np.float32),
        _nola("model.layers.0.self_attn.k_proj", rng, (8, 12), 2, 3, 7, np.float16),  # shares q's basis (seed 7, stream 0)
        _nola("model.layers.0.self_attn.v_proj", rng, (4, 12), 2, 4, 2, BF16, stream=1, A0="stored", B0="stored"),
        _nola("transformer.h.0.attn.c_attn", rng, (6, 10), 3, 0, 4, np.float32, stream=2, B0="generated", fan_in_fan_out=True),
        _nola(
            "model.layers.0.mlp.up_proj", rng, (5, 9), 1, 6, 3, np.float64, seed=2**40 + 5, stream=2**32 - 1, A0="zero", scale=-0.75
        ),
    ]
    meta = {"nola.basis_values": json.dumps(basis_values(), separators=(",", ":"))}
    return Adapter(
        name="default",
        base_model="test/tiny-base",
        base_architecture="LlamaForCausalLM",
        modules={m.name: m for m in mods},
        metadata=meta,
    )


def _set_param(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(index: dict[str, Any]) -> None:
        index["adapters"][0]["modules"][0]["params"][key] = value

    return edit


def build(readable: Callable[..., Any], refused: Callable[..., Any]) -> None:
    """nola_raw and four refusals (unknown generator, unknown version, count mismatch, rank too large)."""
    readable(
        "nola_raw",
        "nola records: shared basis, generated/zero/stored A0 and B0, fp32/fp16/bf16/fp64 coefficients, fan_in_fan_out, "
        "k_A = 0, a seed above 2^32; metadata nola.basis_values lists generated words and values; codec raw (the "
        "blobs are too small for compression to pay)",
        [adapter()],
        "raw",
    )
    from tools.make_vectors import _craft

    for name, what, error, key, val in (
        ("nola_unknown_generator", "a nola record naming generator 'mt19937'", "GeneratorError", "generator", "mt19937"),
        ("nola_unknown_generator_version", "a nola record naming generator_version 2", "GeneratorError", "generator_version", 2),
        ("nola_count_mismatch", "a nola record stating k_A = 6 with 5 alpha coefficients", "RecordError", "k_A", 6),
        ("nola_rank_too_large", "a nola record of rank 2^20 on a small weight", "RankError", "rank", 1 << 20),
    ):
        refused(name, what, [adapter()], error, lambda p, k=key, v=val: _craft(p, _set_param(k, v), minor=1))
