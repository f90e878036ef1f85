"""Golden vectors of the ``nola`` encoding (spec/nola.md).

Their ΔW comes from :mod:`tools.vectors._reference`, which regenerates bases with a plain-Python,
one-counter-at-a-time Philox4x32-10, independent of the library's vectorized numpy and torch
generators, so the vectors check those against the spec. Each vector's adapter metadata carries
``nola.basis_values``: generated words and values an implementation can check its generator with.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from adapterpack.adapter import Adapter, Module
from tools.vectors._reference import basis_value, philox_word
from tools.vectors._reference import nola_delta as reference_delta

__all__ = ["adapter", "basis_values", "build", "reference_delta"]

ENCODING = "nola"
BF16 = np.dtype(ml_dtypes.bfloat16)


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
        floats = [struct.unpack("<f", struct.pack("<f", basis_value(w)))[0] for w in words]
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


def _set_base_shape(shape: list[int]) -> Callable[[dict[str, Any]], None]:
    def edit(index: dict[str, Any]) -> None:
        index["adapters"][0]["modules"][0]["base_shape"] = shape

    return edit


def build(readable: Callable[..., Any], refused: Callable[..., Any]) -> None:
    """nola_raw and five refusals (unknown generator, unknown version, count mismatch, rank too large, too many
    generated values)."""
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
    # rank 2, k_A 5, k_B 7 on a 2^26 x 2^26 weight: 2 · 12 · 2^26 = 1.6e9 generated values, over 2^30 (within the 2^32 of
    # format 1.4) while the factors, 2^28 elements, are within theirs
    refused(
        "nola_generated_over_limit",
        "a nola record whose decode would generate 1.6e9 random values (rank 2, k_A 5, k_B 7 on a 2^26 x 2^26 weight)",
        [adapter()],
        "RecordError",
        lambda p: _craft(p, _set_base_shape([1 << 26, 1 << 26]), minor=1),
    )
