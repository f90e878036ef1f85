"""Torch decoder of ``nola`` records: bases generated on the device (no host round trip), summed in chunks.

:func:`decode_many` decodes several records at once; records sharing a basis (same seed, stream,
kind and matrix size, spec/nola.md §4) get each chunk of bases generated once and multiplied by
their stacked coefficients (``[records, k] @ [k, n]``). The registered per-record decoder is
:func:`decode_nola`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from adapterpack.adapter import Module
from adapterpack.encodings.nola import NolaShape, nola_shape
from adapterpack.errors import RecordError
from adapterpack.factors import Factors
from adapterpack.rng.basis import DEFAULT_BUDGET, KIND_A, KIND_A0, KIND_B, KIND_B0
from adapterpack.torch import rng as torch_rng
from adapterpack.torch.decoders.base import register_torch_decoder, slot


def combine(seed: int, stream: int, kind: int, coef: torch.Tensor, n: int, budget: int = DEFAULT_BUDGET) -> torch.Tensor:
    """``coef [M, k] @ basis [k, n]`` on ``coef``'s device, holding about ``budget`` bytes of generated
    values at a time (tiles over bases, and over elements for matrices larger than the budget)."""
    m, k = coef.shape
    out = torch.zeros((m, n), dtype=coef.dtype, device=coef.device)
    if k == 0 or n == 0:
        return out
    # the generator holds its int64 Philox state (about ten words per 4 values) and the values: ~40 bytes per
    # value on every device (the reviewer measured ~40 with the accelerator-sized step), so size tiles for that
    per_value = 40
    cols = n if per_value * n <= budget else max(4, (budget // per_value) // 4 * 4)
    rows = max(1, int(budget // (per_value * cols)))
    for e0 in range(0, n, cols):
        e1 = min(n, e0 + cols)
        for i0 in range(0, k, rows):
            i1 = min(k, i0 + rows)
            vals = torch_rng.basis(seed, stream, kind, i0, i1, e1, coef.device, first=e0)
            out[:, e0:e1] += coef[:, i0:i1] @ vals.to(coef.dtype)
    return out


def _coefficients(module: Module, name: str, device: torch.device) -> torch.Tensor:
    c = slot(module, name, device, None)
    if not bool(torch.isfinite(c.to(torch.float64)).all()):
        bad = int((~torch.isfinite(c.to(torch.float64))).sum())
        raise RecordError(f"module {module.name!r}: {bad} of {c.numel()} {name} coefficients are not finite")
    return c


def _fixed(module: Module, s: NolaShape, which: str, device: torch.device, work: torch.dtype) -> torch.Tensor | None:
    mode = s.A0 if which == "A0" else s.B0
    rows, cols = (s.rank, s.inp) if which == "A0" else (s.out, s.rank)
    if mode == "zero":
        return None
    if mode == "stored":
        return slot(module, which, device, None).to(work)
    u = torch_rng.basis(s.seed, s.stream, KIND_A0 if which == "A0" else KIND_B0, 0, 1, rows * cols, device).reshape(rows, cols)
    return (u.to(torch.float64) / math.sqrt(cols)).to(work)


def decode_many(
    modules: Iterable[Module], device: torch.device | str = "cpu", dtype: torch.dtype | None = None, budget: int = DEFAULT_BUDGET
) -> dict[str, Factors]:
    """:class:`Factors` of nola records on ``device``; shared bases generated once per chunk.

    Sums in float32 (float64 when a record's coefficients are float64; a group sharing a basis sums
    in float64 if any member needs it, and each record gets its own dtype back), then casts to
    ``dtype`` when given. Memory: about ``budget`` bytes of generated values plus the factors themselves.
    """
    dev = torch.device(device)
    mods = list(modules)
    shapes = {m.name: nola_shape(m) for m in mods}
    coefs = {(m.name, s): _coefficients(m, s, dev) for m in mods for s in ("alpha", "beta")}
    groups: dict[tuple[int, int, int, int], list[tuple[str, str]]] = {}
    for m in mods:
        s = shapes[m.name]
        groups.setdefault((s.seed, s.stream, KIND_A, s.rank * s.inp), []).append((m.name, "alpha"))
        groups.setdefault((s.seed, s.stream, KIND_B, s.rank * s.out), []).append((m.name, "beta"))
    summed: dict[tuple[str, str], torch.Tensor] = {}
    for (seed, stream, kind, n), members in groups.items():
        cs = [coefs[key] for key in members]
        work = torch.float64 if any(c.dtype == torch.float64 for c in cs) else torch.float32
        kmax = max(int(c.shape[0]) for c in cs)
        stack = torch.zeros((len(cs), kmax), dtype=torch.float64, device=dev)
        for row, c in enumerate(cs):
            if c.shape[0]:
                stack[row, : c.shape[0]] = c.to(torch.float64) / math.sqrt(c.shape[0])
        res = combine(seed, stream, kind, stack.to(work), n, budget)
        for row, key in enumerate(members):
            summed[key] = res[row]
    out: dict[str, Factors] = {}
    for m in mods:
        s = shapes[m.name]
        # a record sums in float64 only when its own coefficients are float64, whatever its group used
        own = {k: torch.float64 if coefs[(m.name, k)].dtype == torch.float64 else torch.float32 for k in ("alpha", "beta")}
        a = summed[(m.name, "alpha")].reshape(s.rank, s.inp).to(own["alpha"])
        b = summed[(m.name, "beta")].reshape(s.out, s.rank).to(own["beta"])
        for which, mat in (("A0", a), ("B0", b)):
            fixed = _fixed(m, s, which, dev, mat.dtype)
            if fixed is not None:
                mat += fixed
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        out[m.name] = Factors(A=a, B=b, scale=s.scale, base_shape=tuple(int(d) for d in m.base_shape), transpose=s.transpose)
    return out


@register_torch_decoder("nola", many=decode_many)
def decode_nola(module: Module, device: torch.device, dtype: torch.dtype | None) -> Factors:
    """One nola record's A ``[r, in]`` and B ``[out, r]`` generated and summed on ``device``."""
    return decode_many([module], device, dtype)[module.name]
