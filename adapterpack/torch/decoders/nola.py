"""Torch decoder of ``nola`` records: bases generated on the device (no host round trip), summed in chunks.

:func:`decode_many` decodes several records at once; records sharing a basis (same seed, stream,
kind and matrix size, spec/nola.md §4) get each chunk of bases generated once and multiplied by
their stacked coefficients (``[records, k] @ [k, n]``). The registered per-record decoder is
:func:`decode_nola`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from adapterpack.adapter import Module, as_array
from adapterpack.encodings.nola import NolaShape, check_total, nola_shape, plan
from adapterpack.errors import RecordError
from adapterpack.factors import Factors
from adapterpack.rng.basis import DEFAULT_BUDGET, KIND_A0, KIND_B0
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


_CHECK = 1 << 16


def _coefficients(module: Module, name: str, device: torch.device, into: torch.Tensor) -> torch.dtype:
    """Slot ``name`` (α or β) copied into the float64 row ``into`` (a clear error for NaN / inf); its stored dtype."""
    t = module.tensors[name]
    if into.device.type == "cpu" and not isinstance(t, torch.Tensor):
        arr = as_array(t)  # straight into the row: no torch copy of the blob per reference to it
        np.copyto(into.numpy(), arr, casting="unsafe")  # every spec float dtype widens to float64 exactly
        dt = torch.float64 if arr.dtype == np.float64 else torch.float32
    else:
        c = slot(module, name, device, None)
        into.copy_(c)
        dt = c.dtype
    # checked a piece at a time: one bool tensor of the slot's size per record fragments the heap (resident memory grew
    # by about its size per record decoded)
    if not all(bool(torch.isfinite(into[i : i + _CHECK]).all()) for i in range(0, into.numel(), _CHECK)):
        bad = int((~torch.isfinite(into)).sum())
        raise RecordError(f"module {module.name!r}: {bad} of {into.numel()} {name} coefficients are not finite")
    return dt


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

    Sums in float32 (float64 when a record's coefficients are float64; a batch sharing a basis sums
    in float64 if any member needs it, and each record gets its own dtype back), then casts to
    ``dtype`` when given. Coefficients are decoded one batch at a time (:func:`adapterpack.encodings.nola.plan`)
    and dropped after it: memory is about ``budget`` bytes of generated values, ``budget`` of a batch's
    coefficients, and the factors themselves. Refuses (SizeLimitError) records whose total generator
    work is over ``MAX_NOLA_GENERATED_TOTAL``, before generating anything.
    """
    dev = torch.device(device)
    mods = {m.name: m for m in modules}
    shapes = {name: nola_shape(m) for name, m in mods.items()}
    batches = plan(shapes, budget)
    check_total(shapes, batches)
    summed: dict[tuple[str, str], torch.Tensor] = {}
    own: dict[tuple[str, str], torch.dtype] = {}
    # one float64 stack and one working copy for every batch: the process allocator keeps what it has, where
    # buffers of varying sizes freed per batch leave the heap fragmented (resident memory grew with the batch count)
    size = max((len(bt.members) * bt.k for bt in batches), default=0)
    wide_buf = torch.empty(size, dtype=torch.float64, device=dev)
    work_buf: dict[torch.dtype, torch.Tensor] = {}
    for bt in batches:
        stack = wide_buf[: len(bt.members) * bt.k].view(len(bt.members), bt.k).zero_()
        work = torch.float32
        for row, (name, which, k) in enumerate(bt.members):
            stored = _coefficients(mods[name], which, dev, stack[row, :k])
            own[(name, which)] = torch.float64 if stored == torch.float64 else torch.float32
            if own[(name, which)] == torch.float64:
                work = torch.float64
            if k:
                stack[row, :k].div_(math.sqrt(k))
        if work == torch.float64:
            coef = stack
        else:
            if work not in work_buf:
                work_buf[work] = torch.empty(size, dtype=work, device=dev)
            buf = work_buf[work]
            coef = buf[: stack.numel()].view(stack.shape).copy_(stack)
        res = combine(bt.seed, bt.stream, bt.kind, coef, bt.n, budget)
        for row, (name, which, _k) in enumerate(bt.members):
            summed[(name, which)] = res[row]
    del wide_buf, work_buf
    out: dict[str, Factors] = {}
    for name, m in mods.items():
        s = shapes[name]
        # a record sums in float64 only when its own coefficients are float64, whatever its batch used
        a = summed.pop((name, "alpha")).reshape(s.rank, s.inp).to(own[(name, "alpha")])
        b = summed.pop((name, "beta")).reshape(s.out, s.rank).to(own[(name, "beta")])
        for which, mat in (("A0", a), ("B0", b)):
            fixed = _fixed(m, s, which, dev, mat.dtype)
            if fixed is not None:
                mat += fixed
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        out[name] = Factors(A=a, B=b, scale=s.scale, base_shape=tuple(int(d) for d in m.base_shape), transpose=s.transpose)
    return out


@register_torch_decoder("nola", many=decode_many)
def decode_nola(module: Module, device: torch.device, dtype: torch.dtype | None) -> Factors:
    """One nola record's A ``[r, in]`` and B ``[out, r]`` generated and summed on ``device``."""
    return decode_many([module], device, dtype)[module.name]
