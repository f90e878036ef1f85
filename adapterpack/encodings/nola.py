"""``nola``: ΔW from coefficients over seeded random bases (spec/nola.md).

``ΔW = s·(B0 + Σⱼ βⱼ·Bⱼ/√k_B)·(A0 + Σᵢ αᵢ·Aᵢ/√k_A)`` where every basis matrix Aᵢ ``[r, in]``,
Bⱼ ``[out, r]`` (and a generated A0/B0) is regenerated from the record's seed and stream by
the spec's Philox4x32-10 layout (:mod:`adapterpack.rng`), so a record stores only α, β and a
few integers. Decoding sums bases chunk by chunk (memory bounded by a budget in bytes), and
records that share a basis (same seed, stream and matrix size) are decoded together with one
matrix product per chunk (:func:`decode_many`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import tensor_info
from adapterpack.encodings.base import Encoding, register_encoding
from adapterpack.encodings.lora import _bool, _finite_number
from adapterpack.errors import GeneratorError, RankError, RecordError, SizeLimitError
from adapterpack.factors import Factors
from adapterpack.limits import MAX_FACTOR_ELEMENTS, MAX_NOLA_GENERATED, MAX_NOLA_GENERATED_TOTAL
from adapterpack.rng.basis import (
    DEFAULT_BUDGET,
    GENERATOR_ID,
    GENERATOR_VERSION,
    KIND_A,
    KIND_A0,
    KIND_B,
    KIND_B0,
    MAX_SEED,
    MAX_U32,
    basis_range,
)

if TYPE_CHECKING:
    from adapterpack.adapter import Module

FLOATS = dtypes.FLOATS
#: How A0 / B0 are given: regenerated from the seed, absent (zero), or stored in the file.
FIXED = ("generated", "zero", "stored")
DEFAULTS = {"A0": "generated", "B0": "zero"}


def _int(p: dict[str, Any], key: str, lo: int, hi: int, where: str, err: type[RecordError] = RecordError) -> int:
    v = p.get(key)
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or not lo <= v < hi:
        raise err(f"{where}: param {key!r} must be an integer in [{lo}, {hi}), got {v!r:.200}")
    return int(v)


@dataclass(frozen=True)
class NolaShape:
    """What a validated record's params and shapes say: dims, basis counts, how A0/B0 are given."""

    out: int
    inp: int
    rank: int
    k_A: int
    k_B: int
    seed: int
    stream: int
    scale: float
    A0: str
    B0: str
    transpose: bool


def nola_shape(module: Module) -> NolaShape:
    """Validate ``module`` from its params and tensor shapes alone (no data read)."""
    where = f"module {module.name!r}"
    p = module.params
    gen, ver = p.get("generator"), p.get("generator_version")
    if not isinstance(gen, str) or gen != GENERATOR_ID:
        raise GeneratorError(f"{where}: unknown basis generator {gen!r:.200} (this reader implements {GENERATOR_ID!r})")
    if not isinstance(ver, int) or isinstance(ver, bool) or ver != GENERATOR_VERSION:
        raise GeneratorError(
            f"{where}: unknown version {ver!r:.200} of generator {gen!r:.200} (this reader implements {GENERATOR_VERSION})"
        )
    seed = _int(p, "seed", 0, MAX_SEED, where)
    stream = _int(p, "stream", 0, MAX_U32, where)
    rank = _int(p, "rank", 1, MAX_U32, where, RankError)
    k_a = _int(p, "k_A", 0, MAX_U32, where)
    k_b = _int(p, "k_B", 0, MAX_U32, where)
    if not _finite_number(p.get("scale")):
        raise RecordError(f"{where}: scale must be a finite number, got {p.get('scale')!r:.200}")
    fixed = {}
    for slot in ("A0", "B0"):
        fixed[slot] = p.get(slot, DEFAULTS[slot])
        if not isinstance(fixed[slot], str) or fixed[slot] not in FIXED:
            raise RecordError(f"{where}: param {slot!r} must be one of {FIXED}, got {fixed[slot]!r:.200}")
    fifo = _bool(p, "fan_in_fan_out", where)
    allowed = {"alpha", "beta"} | {s for s in ("A0", "B0") if fixed[s] == "stored"}
    missing = sorted(allowed - set(module.tensors))
    extra = sorted(set(module.tensors) - allowed)
    if missing or extra:
        raise RecordError(f"{where}: nola needs tensors alpha, beta (and A0/B0 when stored); missing {missing}, unexpected {extra}")
    base = tuple(module.base_shape)
    if len(base) != 2:
        raise RecordError(f"{where}: nola needs a 2-D base_shape, got {list(base)}")
    out, inp = (base[1], base[0]) if fifo else base
    # nothing in the file backs the decoded size or the generator's work (bases come from the seed): bound both (spec §7)
    if rank > min(out, inp):
        raise RankError(f"{where}: rank {rank} exceeds min(out, in) = {min(out, inp)}")
    if rank * (out + inp) > MAX_FACTOR_ELEMENTS:
        raise RankError(
            f"{where}: rank {rank} on a {out}x{inp} weight makes A and B hold {rank * (out + inp)} elements, "
            f"over the limit of {MAX_FACTOR_ELEMENTS}"
        )
    generated = rank * (k_a * inp + k_b * out)
    if generated > MAX_NOLA_GENERATED:
        raise RecordError(
            f"{where}: k_A {k_a}, k_B {k_b} at rank {rank} on a {out}x{inp} weight need {generated} random values, "
            f"over the limit of {MAX_NOLA_GENERATED}"
        )
    for slot, k in (("alpha", k_a), ("beta", k_b)):
        dt, sh = tensor_info(module.tensors[slot])
        if dt not in FLOATS:
            raise RecordError(f"{where}: {slot} must be a float tensor, got {dt}")
        if sh != (k,):
            raise RecordError(
                f"{where}: {slot} holds {list(sh)} coefficients but the record states k = {k} (k_{'A' if slot == 'alpha' else 'B'})"
            )
    for slot, want in (("A0", (rank, inp)), ("B0", (out, rank))):
        if fixed[slot] == "stored":
            dt, sh = tensor_info(module.tensors[slot])
            if dt not in FLOATS or sh != want:
                raise RecordError(f"{where}: stored {slot} must be a float {list(want)} tensor, got {dt} {list(sh)}")
    return NolaShape(out, inp, rank, k_a, k_b, seed, stream, float(p["scale"]), fixed["A0"], fixed["B0"], fifo)


def coefficients(module: Module, slot: str) -> np.ndarray:
    """The record's α or β as a finite float array (a clear error for NaN / inf)."""
    c = np.asarray(module.array(slot))
    wide = c.astype(np.float64)
    if not np.all(np.isfinite(wide)):
        bad = int(np.count_nonzero(~np.isfinite(wide)))
        raise RecordError(f"module {module.name!r}: {bad} of {c.size} {slot} coefficients are not finite")
    return c


def combine(seed: int, stream: int, kind: int, coef: np.ndarray, n: int, budget: int = DEFAULT_BUDGET) -> np.ndarray:
    """``coef [M, k] @ basis [k, n]`` for the k bases of one kind, generated ``budget`` bytes at a time.

    Tiles over bases and, for very large matrices, over elements, so memory stays near
    ``budget`` plus the ``[M, n]`` result whatever k and n are. Accumulates in float32
    (float64 when ``coef`` is float64).
    """
    coef = np.atleast_2d(coef)
    m, k = coef.shape
    work = np.float64 if coef.dtype == np.float64 else np.float32
    out = np.zeros((m, n), work)
    if k == 0 or n == 0:
        return out
    per_value = 28  # float32 value + uint32 word + 4 counter words + products, roughly
    cols = n if per_value * n <= budget else max(4, (budget // per_value) // 4 * 4)
    rows = max(1, int(budget // (per_value * cols)))
    c = coef.astype(work, copy=False)
    for e0 in range(0, n, cols):
        e1 = min(n, e0 + cols)
        for i0 in range(0, k, rows):
            i1 = min(k, i0 + rows)
            vals = basis_range(seed, stream, kind, i0, i1, e0, e1)
            out[:, e0:e1] += c[:, i0:i1] @ vals.astype(work, copy=False)
    return out


def _fixed(module: Module, s: NolaShape, slot: str, work: type) -> np.ndarray | None:
    """A0 or B0 as an array (None when zero)."""
    mode = s.A0 if slot == "A0" else s.B0
    rows, cols = (s.rank, s.inp) if slot == "A0" else (s.out, s.rank)
    if mode == "zero":
        return None
    if mode == "stored":
        return np.asarray(module.array(slot)).astype(work)
    kind = KIND_A0 if slot == "A0" else KIND_B0
    u = basis_range(s.seed, s.stream, kind, 0, 1, 0, rows * cols).reshape(rows, cols)
    return (u.astype(np.float64) / math.sqrt(cols)).astype(work)


@dataclass(frozen=True)
class Batch:
    """Records' α (or β) slots decoded together: one basis (seed, stream, kind, ``n`` elements per matrix),
    bases ``0..k-1`` generated once for ``members`` (``(module name, slot, k)``; ``k`` the largest)."""

    seed: int
    stream: int
    kind: int
    n: int
    k: int
    members: tuple[tuple[str, str, int], ...]


#: Bytes per stacked coefficient of a batch: the float64 stack and its float32 working copy.
_STACK_BYTES = 12


def plan(shapes: dict[str, NolaShape], budget: int = DEFAULT_BUDGET) -> list[Batch]:
    """How :func:`decode_many` decodes records of these shapes: slots sharing a basis in batches whose stacked
    coefficients ``[members, k]`` stay within ``budget`` bytes (a single slot may exceed it: its blob backs it).

    Members are taken largest k first, so a batch generates few bases its smaller members do not use.
    """
    groups: dict[tuple[int, int, int, int], list[tuple[str, str, int]]] = {}
    for name, s in shapes.items():
        groups.setdefault((s.seed, s.stream, KIND_A, s.rank * s.inp), []).append((name, "alpha", s.k_A))
        groups.setdefault((s.seed, s.stream, KIND_B, s.rank * s.out), []).append((name, "beta", s.k_B))
    out = []
    for (seed, stream, kind, n), members in groups.items():
        members.sort(key=lambda m: -m[2])
        i = 0
        while i < len(members):
            k = members[i][2]
            rows = max(1, budget // max(1, _STACK_BYTES * k))
            out.append(Batch(seed, stream, kind, n, k, tuple(members[i : i + rows])))
            i += rows
    return out


def generated_values(shapes: dict[str, NolaShape], batches: list[Batch]) -> int:
    """Random values decoding ``batches`` generates: ``k · n`` per batch, plus every generated A0 and B0."""
    fixed = sum(s.rank * s.inp * (s.A0 == "generated") + s.out * s.rank * (s.B0 == "generated") for s in shapes.values())
    return sum(b.k * b.n for b in batches) + fixed


def check_total(shapes: dict[str, NolaShape], batches: list[Batch], limit: int | None = None) -> None:
    """Refuse (SizeLimitError) decoding records together whose generator work exceeds ``limit``
    (:data:`MAX_NOLA_GENERATED_TOTAL`): each record is within its own limit, but a file may hold many."""
    limit = MAX_NOLA_GENERATED_TOTAL if limit is None else limit
    total = generated_values(shapes, batches)
    if total > limit:
        worst = max(shapes, key=lambda n: generated_values({n: shapes[n]}, plan({n: shapes[n]})))
        one = generated_values({worst: shapes[worst]}, plan({worst: shapes[worst]}))
        raise SizeLimitError(
            f"decoding {len(shapes)} nola records together would generate {total} random values, over the limit of "
            f"{limit} (the most of one record: module {worst!r}, {one}); decode fewer records at a time"
        )


def decode_many(modules: Iterable[Module], budget: int = DEFAULT_BUDGET) -> dict[str, Factors]:
    """Factors of several nola records; those sharing a basis (same seed, stream, kind and matrix
    size) are decoded together: each chunk of bases is generated once and multiplied by the
    stacked coefficients of every sharing record (``[M, k] @ [k, n]``).

    Coefficients are decoded one batch at a time (:func:`plan`) and dropped after it, so memory is
    about ``budget`` for the generator, ``budget`` for a batch's coefficients and the factors returned.
    Refuses (SizeLimitError) records whose total generator work is over :data:`MAX_NOLA_GENERATED_TOTAL`.
    """
    mods = {m.name: m for m in modules}
    shapes = {name: nola_shape(m) for name, m in mods.items()}
    batches = plan(shapes, budget)
    check_total(shapes, batches)
    summed: dict[tuple[str, str], np.ndarray] = {}
    for b in batches:
        coefs = [coefficients(mods[name], slot) for name, slot, _k in b.members]
        wide = any(c.dtype == np.float64 for c in coefs)
        stack = np.zeros((len(coefs), b.k), np.float64)
        for row, c in enumerate(coefs):
            if c.shape[0]:
                stack[row, : c.shape[0]] = c.astype(np.float64) / math.sqrt(c.shape[0])
        del coefs
        res = combine(b.seed, b.stream, b.kind, stack if wide else stack.astype(np.float32), b.n, budget)
        del stack
        for row, (name, slot, _k) in enumerate(b.members):
            summed[(name, slot)] = res[row]
    out: dict[str, Factors] = {}
    for name, m in mods.items():
        s = shapes[name]
        a = summed.pop((name, "alpha")).reshape(s.rank, s.inp)
        b = summed.pop((name, "beta")).reshape(s.out, s.rank)
        for slot, mat in (("A0", a), ("B0", b)):
            fixed = _fixed(m, s, slot, mat.dtype.type)
            if fixed is not None:
                mat += fixed
        out[name] = Factors(A=a, B=b, scale=s.scale, base_shape=tuple(m.base_shape), transpose=s.transpose)
    return out


@register_encoding
class Nola(Encoding):
    """ΔW = s·(B0 + Σ βⱼBⱼ/√k_B)(A0 + Σ αᵢAᵢ/√k_A) over Philox-generated bases (spec/nola.md)."""

    encoding_id = "nola"
    slots: ClassVar[dict[str, bool]] = {"alpha": True, "beta": True, "A0": False, "B0": False}

    def validate(self, module: Module) -> None:
        nola_shape(module)

    def to_factors(self, module: Module) -> Factors:
        """A = A0 + Σ αᵢAᵢ/√k_A ``[r, in]`` and B ``[out, r]``, regenerating the bases (float32;
        float64 for float64 coefficients). Working memory: about :data:`DEFAULT_BUDGET` bytes."""
        return decode_many([module])[module.name]

    def summary(self, module: Module) -> dict[str, Any]:
        p = module.params
        return {
            "rank": p["rank"],
            "scale": p["scale"],
            "k_A": p["k_A"],
            "k_B": p["k_B"],
            "seed": p["seed"],
            "stream": p["stream"],
            "A0": p.get("A0", DEFAULTS["A0"]),
            "B0": p.get("B0", DEFAULTS["B0"]),
        }
