"""Golden vectors of non-finite values (spec/format.md §3): stored bit-exact and decoded where they are data,
refused where the format depends on them (svd S, nola coefficients).

Values are written to the JSON as bit patterns (spec/vectors.md §4) and ΔW holds NaN and infinities
where IEEE 754 arithmetic puts them ("NaN", "Infinity", "-Infinity").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from adapterpack.adapter import Adapter, Module

NAN = np.float32("nan")
INF = np.float32("inf")


def _grid(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """k/8 for |k| < 16 in float32: exact, and far from overflow."""
    return (rng.integers(-16, 16, shape) / 8).astype(np.float32)


def adapter(seed: int = 31) -> Adapter:
    """lora A with NaN, +inf and a NaN with a payload, B with a zero; a DoRA magnitude with NaN and -inf; svd Vt
    with NaN; shared S with +inf; nola stored A0 with NaN."""
    rng = np.random.default_rng(seed)
    a, b = _grid(rng, (2, 6)), _grid(rng, (4, 2))
    a[0, 1], a[1, 2] = NAN, INF
    a[1, 4] = np.array(0x7FC0_1234, np.uint32).view(np.float32)  # a quiet NaN with a payload: bits survive
    b[2, 1] = 0.0  # inf · 0 is NaN in ΔW
    lora = Module("model.layers.0.self_attn.q_proj", "lora", (4, 6), {"rank": 2, "alpha": 4.0}, {"A": a, "B": b})
    mag = np.array([1.0, NAN, -INF, 2.0], np.float32)
    dora = Module("model.layers.0.self_attn.k_proj", "lora", (4, 6), {"rank": 2, "alpha": 4.0, "dora": True},
                  {"A": _grid(rng, (2, 6)), "B": _grid(rng, (4, 2)), "magnitude": mag})  # fmt: skip
    vt = np.linalg.qr(rng.standard_normal((6, 2)))[0].T.astype(np.float32)
    vt[1, 3] = NAN
    ut = np.linalg.qr(rng.standard_normal((4, 2)))[0].T.astype(np.float32)
    svd = Module("model.layers.0.self_attn.v_proj", "svd", (4, 6), {"rank": 2},
                 {"S": np.array([2.0, 1.0], np.float32), "Ut": ut, "Vt": vt})  # fmt: skip
    s = _grid(rng, (2, 2))
    s[1, 0] = INF
    shared = Module("model.layers.0.self_attn.o_proj", "shared", (4, 6), {"rank": 2, "form": "full"},
                    {"U": _grid(rng, (4, 2)), "V": _grid(rng, (6, 2)), "S": s})  # fmt: skip
    a0 = _grid(rng, (2, 6))
    a0[0, 0] = NAN
    nola_params = {"generator": "philox4x32-10", "generator_version": 1, "seed": 3, "stream": 0, "rank": 2, "k_A": 2, "k_B": 2,
                   "scale": 0.5, "A0": "stored"}  # fmt: skip
    nola = Module("model.layers.0.mlp.up_proj", "nola", (4, 6), nola_params,
                  {"alpha": _grid(rng, (2,)), "beta": _grid(rng, (2,)), "A0": a0})  # fmt: skip
    mods = [lora, dora, svd, shared, nola]
    return Adapter("default", "test/tiny-base", modules={m.name: m for m in mods}, tensors={"scores": np.array([NAN, -INF, 1.5])})


def _refusal(slot: str, name: str, value: float) -> Adapter:
    """:func:`adapter` reduced to module ``name`` with element 0 of ``slot`` set to ``value``."""
    full = adapter()
    m = full.modules[name]
    m.tensors[slot] = m.tensors[slot].copy()
    m.tensors[slot].reshape(-1)[0] = value
    return Adapter("default", "test/tiny-base", modules={name: m})


def build(readable: Callable[..., Any], refused: Callable[..., Any]) -> None:
    """non_finite_values (readable) and two refusals: a NaN in svd S, an infinite nola coefficient."""
    readable(
        "non_finite_values",
        "NaN (one with a payload) and infinities in lora A, a DoRA magnitude, svd Vt, shared S, stored nola A0 and a "
        "pass-through tensor: stored bit-exact and read without refusal; ΔW holds NaN and infinities as IEEE 754 "
        "arithmetic gives them; codec raw",
        [adapter()],
        "raw",
    )
    refused("svd_s_not_finite", "an svd record whose first singular value is NaN", [_refusal("S", "model.layers.0.self_attn.v_proj",
            NAN)], "RecordError", lambda p: None)  # fmt: skip
    refused("nola_coefficient_not_finite", "a nola record whose first alpha coefficient is +inf",
            [_refusal("alpha", "model.layers.0.mlp.up_proj", INF)], "RecordError", lambda p: None)  # fmt: skip
