"""A small stand-in for the qsvd encoding's interface (issue 14), for testing ops/compress before it lands.

Same names and contracts as ``adapterpack.encodings.qsvd``: per-component widths from BITS or FLOAT,
codes packed little-endian per component (u then v), one float16 scale per group, S in float32; the
table's bytes are exactly the record's bytes, its errors exactly each component's own error. The
record's encoding id is ``fakeq`` (registered here, test-only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from adapterpack.adapter import Module
from adapterpack.encodings.base import Encoding, register_encoding
from adapterpack.errors import RecordError
from adapterpack.factors import Factors

BITS = (1, 2, 3, 4, 8)
FLOAT = 16
DEFAULT_GROUP_SIZE = 32


@dataclass
class ComponentTable:
    bits: tuple[int, ...]
    nbytes: np.ndarray
    err: np.ndarray
    cut_err: np.ndarray
    fixed_nbytes: int


def _groups(n: int, g: int) -> int:
    return -(-n // g)


def _quant(x: np.ndarray, b: int, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, float16 scales, dequantized) of vector x at b bits, groups of g."""
    n = x.size
    pad = np.zeros(_groups(n, g) * g)
    pad[:n] = x
    grp = pad.reshape(-1, g)
    half = (2**b - 1) / 2
    if b == 1:
        scale = 2 * np.abs(grp).mean(axis=1)
    else:
        scale = np.abs(grp).max(axis=1) / half
    scale = scale.astype(np.float16)
    s64 = scale.astype(np.float64)
    safe = np.where(s64 > 0, s64, 1.0)
    q = np.clip(np.round(grp / safe[:, None] + half), 0, 2**b - 1).astype(np.int64)
    deq = ((q - half) * s64[:, None]).reshape(-1)[:n]
    return q.reshape(-1)[:n], scale, deq


def _pack(q: np.ndarray, b: int) -> np.ndarray:
    bits = ((q[:, None] >> np.arange(b)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bits, bitorder="little")


def _unpack(data: np.ndarray, n: int, b: int) -> np.ndarray:
    bits = np.unpackbits(data, bitorder="little")[: n * b].reshape(n, b).astype(np.int64)
    return (bits << np.arange(b)).sum(axis=1)


def _component(u: np.ndarray, v: np.ndarray, b: int, g: int) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    """(code bytes, scales, û, v̂) of one component."""
    if b == FLOAT:
        uh, vh = u.astype(np.float16), v.astype(np.float16)
        return uh.tobytes() + vh.tobytes(), np.zeros(0, np.float16), uh.astype(np.float64), vh.astype(np.float64)
    qu, su, du = _quant(u, b, g)
    qv, sv, dv = _quant(v, b, g)
    return _pack(np.concatenate([qu, qv]), b).tobytes(), np.concatenate([su, sv]), du, dv


def _nbytes(m: int, n: int, b: int, g: int) -> int:
    if b == FLOAT:
        return 2 * (m + n) + 4
    return -(-(m + n) * b // 8) + 2 * (_groups(m, g) + _groups(n, g)) + 4


def component_table(u: np.ndarray, s: np.ndarray, vt: np.ndarray, bits: Sequence[int] = (*BITS, FLOAT),
                    group_size: int = DEFAULT_GROUP_SIZE) -> ComponentTable:  # fmt: skip
    m, k = u.shape
    n = vt.shape[1]
    bits = tuple(bits)
    nb = np.zeros((k, len(bits)), np.int64)
    err = np.zeros((k, len(bits)))
    for j in range(k):
        for c, b in enumerate(bits):
            nb[j, c] = _nbytes(m, n, b, group_size)
            _, _, uh, vh = _component(u[:, j], vt[j], b, group_size)
            # ‖σ(u vᵀ − û v̂ᵀ)‖² with ‖u‖ = ‖v‖ = 1
            err[j, c] = s[j] ** 2 * max(1 - 2 * (u[:, j] @ uh) * (vt[j] @ vh) + (uh @ uh) * (vh @ vh), 0.0)
    return ComponentTable(bits, nb, err, np.asarray(s, np.float64) ** 2, 0)


def encode_qsvd(u: np.ndarray, s: np.ndarray, vt: np.ndarray, bits: Sequence[int], group_size: int = DEFAULT_GROUP_SIZE,
                *, template: Module) -> Module:  # fmt: skip
    m, n = u.shape[0], vt.shape[1]
    codes, scales = [], []
    for j, b in enumerate(bits):
        c, sc, _, _ = _component(u[:, j], vt[j], int(b), group_size)
        codes.append(c)
        scales.append(sc)
    params = {"rank": len(bits), "bits": [int(b) for b in bits], "group_size": group_size, "out": m, "in": n}
    tensors = {
        "codes": np.frombuffer(b"".join(codes), np.uint8).copy(),
        "scales": np.concatenate(scales) if scales else np.zeros(0, np.float16),
        "S": np.asarray(s, np.float32),
    }
    return Module(template.name, "fakeq", tuple(template.base_shape), params, tensors)


def _decode(module: Module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = module.params
    m, n, g = p["out"], p["in"], p["group_size"]
    codes = np.asarray(module.array("codes"))
    scales = np.asarray(module.array("scales")).astype(np.float64)
    u = np.zeros((m, len(p["bits"])))
    vt = np.zeros((len(p["bits"]), n))
    at, sat = 0, 0
    for j, b in enumerate(p["bits"]):
        if b == FLOAT:
            raw = codes[at : at + 2 * (m + n)].view(np.float16).astype(np.float64)
            u[:, j], vt[j] = raw[:m], raw[m:]
            at += 2 * (m + n)
            continue
        size = -(-(m + n) * b // 8)
        q = _unpack(codes[at : at + size], m + n, b)
        at += size
        half = (2**b - 1) / 2
        gu, gv = _groups(m, g), _groups(n, g)
        su, sv = scales[sat : sat + gu], scales[sat + gu : sat + gu + gv]
        sat += gu + gv
        u[:, j] = (q[:m] - half) * np.repeat(su, g)[:m]
        vt[j] = (q[m:] - half) * np.repeat(sv, g)[:n]
    return u, np.asarray(module.array("S"), np.float64), vt


def relative_error(module: Module, u: np.ndarray, s: np.ndarray, vt: np.ndarray) -> float:
    uh, sh, vth = _decode(module)
    e0 = float(np.sum(s**2))
    cross = float(np.trace(np.diag(s) @ (u.T @ uh) @ np.diag(sh) @ (vth @ vt.T)))
    e1 = float(np.trace(np.diag(sh) @ (uh.T @ uh) @ np.diag(sh) @ (vth @ vth.T)))
    return float(np.sqrt(max(e0 - 2 * cross + e1, 0.0) / e0)) if e0 else 0.0


@register_encoding
class FakeQ(Encoding):
    encoding_id = "fakeq"
    slots: ClassVar[dict[str, bool]] = {"codes": True, "scales": True, "S": True}

    def validate(self, module: Module) -> None:
        if not isinstance(module.params.get("bits"), list):
            raise RecordError("fakeq needs bits")

    def to_factors(self, module: Module) -> Factors:
        u, s, vt = _decode(module)
        return Factors(A=s[:, None] * vt, B=u, scale=1.0, base_shape=tuple(module.base_shape))

    def summary(self, module: Module) -> dict[str, Any]:
        return {"rank": module.params["rank"], "scale": 1.0, "layout": "linear"}
