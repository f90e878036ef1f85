"""Torch decoder of ``qsvd`` records: codes unpacked and dequantized on the device, bit-identical to the numpy ``to_factors``.

Every step is integer arithmetic or one correctly rounded binary32 operation (the level times its
binary16 scale is exact; times √S_j is one rounding), so any IEEE device gives numpy's bits.
"""

from __future__ import annotations

import torch

from adapterpack.adapter import Module
from adapterpack.encodings.base import check_slots
from adapterpack.encodings.qsvd import FLOAT, Qsvd, record_plan
from adapterpack.errors import RecordError
from adapterpack.factors import Factors
from adapterpack.linalg.quantize import CODE_BLOCK, SMALL_BLOCK
from adapterpack.torch.decoders.base import register_torch_decoder, slot


def _view(data: torch.Tensor, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Bytes ``[start, end)`` of ``data`` as little-endian ``dtype`` values (copied: the offset may be unaligned)."""
    return data[start:end].clone().view(dtype)


def _check(module: Module, name: str, seg: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse non-finite or negative values among the little-endian ``dtype`` values of bytes ``seg`` (read in blocks)."""
    step = CODE_BLOCK * dtype.itemsize
    for i in range(0, seg.numel(), step):
        part = _view(seg, i, i + step, dtype)
        if not bool(torch.isfinite(part).all()) or bool((part < 0).any()):
            raise RecordError(f"module {module.name!r}: {name} must be finite and >= 0")


def _unpack(seg: torch.Tensor, bits: int, start: int, stop: int) -> torch.Tensor:
    """Codes ``[start, stop)`` (``start`` a multiple of 8) of width ``bits`` (LSB first) of packed bytes ``seg``,
    as int32 on ``seg``'s device: eight codes fill ``bits`` bytes, each code is cut from at most two of them."""
    if bits == 8:
        return seg[start:stop].to(torch.int32)
    first = start * bits // 8
    if stop - start <= SMALL_BLOCK:  # few codes: one int32 per bit is small here, and fewer kernels
        count = stop - start
        part = seg[first : first + -(-count * bits // 8)].to(torch.int32)
        shifts = torch.arange(8, device=seg.device, dtype=torch.int32)
        stream = ((part[:, None] >> shifts) & 1).reshape(-1)[: count * bits].reshape(count, bits)
        return (stream << shifts[:bits]).sum(dim=1, dtype=torch.int32)
    rows_n = -(-(stop - start) // 8)
    chunk = seg[first : first + rows_n * bits].to(torch.int32)
    if chunk.numel() < rows_n * bits:  # the last block of a vector: its final byte may be partly padding
        chunk = torch.cat([chunk, chunk.new_zeros(rows_n * bits - chunk.numel())])
    rows = chunk.reshape(rows_n, bits)
    codes = torch.empty((rows_n, 8), dtype=torch.int32, device=seg.device)
    for k in range(8):
        byte, off = divmod(k * bits, 8)
        col = rows[:, byte] >> off
        if off + bits > 8:
            col = col | (rows[:, byte + 1] << (8 - off))
        codes[:, k] = col & ((1 << bits) - 1)
    return codes.reshape(-1)[: stop - start]


def _group_scales(scales: torch.Tensor, group_size: int, start: int, stop: int) -> torch.Tensor:
    """float32 scale of each value in ``[start, stop)``: value ``i`` has the ``i // group_size``-th binary16
    scale of bytes ``scales`` (only the block's scales are read)."""
    g0, g1 = start // group_size, (stop - 1) // group_size + 1
    sc = _view(scales, 2 * g0, 2 * g1, torch.float16).to(torch.float32)
    if group_size < stop - start:  # many groups: repeat each, cut the partial ones at the ends (< 3 blocks)
        return sc.repeat_interleave(group_size)[start - g0 * group_size : stop - g0 * group_size]
    bounds = torch.arange(g0, g1 + 1, dtype=torch.int64, device=scales.device) * group_size  # one or two groups
    reps = bounds[1:].clamp(max=stop) - bounds[:-1].clamp(min=start)
    return sc.repeat_interleave(reps, output_size=stop - start)


def _decode_into(
    module: Module, j: int, dst: torch.Tensor, seg: torch.Tensor, w: int, scales: torch.Tensor, g: int, root: torch.Tensor
) -> None:
    """``dst = values · root`` for one stored vector (codes ``seg``, scale bytes ``scales``), block by block."""
    count = dst.shape[0]
    for i0 in range(0, count, CODE_BLOCK):
        i1 = min(i0 + CODE_BLOCK, count)
        if w == FLOAT:
            x = _view(seg, 2 * i0, 2 * i1, torch.float16).to(torch.float32)
            if not bool(torch.isfinite(x).all()):
                raise RecordError(f"module {module.name!r}: component {j} holds non-finite float values")
        else:
            x = (2 * _unpack(seg, w, i0, i1) - ((1 << w) - 1)).to(torch.float32)
            x *= _group_scales(scales, g, i0, i1)
        dst[i0:i1] = x * root


@register_torch_decoder("qsvd", staged=True)
def decode_qsvd(module: Module, device: torch.device, dtype: torch.dtype | None) -> Factors:
    """A ``[k, n]`` and B ``[out, k]`` in float32 on ``device`` (cast to ``dtype`` afterwards when one is asked for)."""
    check_slots(module, Qsvd.slots, "qsvd needs one tensor, data")  # as numpy's to_factors: in-memory records too
    plan = record_plan(module)
    out, n, g = plan.out, plan.n, plan.group_size
    data = slot(module, "data", device, None)
    if data.dtype != torch.uint8:
        raise RecordError(f"module {module.name!r}: qsvd data must be uint8, got {data.dtype}")
    plan.check_data(f"module {module.name!r}", "uint8", tuple(data.shape))
    a = torch.zeros((plan.rank, n), dtype=torch.float32, device=device)
    b = torch.zeros((out, plan.rank), dtype=torch.float32, device=device)
    for j, (w, (s0, su, sv, cu, cv, end)) in enumerate(zip(plan.bits, plan.spans(), strict=True)):
        _check(module, f"component {j}: singular value", data[s0:su], torch.float32)
        _check(module, f"component {j}: scales", data[su:cu], torch.float16)
        root = _view(data, s0, su, torch.float32).to(torch.float64).sqrt().to(torch.float32)
        # decoded block by block straight into the factors: temporaries bounded whatever the vector's length
        for dst, (c0, c1), (g0, g1) in ((b[:, j], (cu, cv), (su, sv)), (a[j], (cv, end), (sv, cu))):
            _decode_into(module, j, dst, data[c0:c1], w, data[g0:g1], g, root)
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    transpose = plan.layout == "embedding" or plan.fan_in_fan_out
    return Factors(
        A=a, B=b, scale=1.0, base_shape=tuple(int(d) for d in module.base_shape), transpose=transpose, layout=plan.layout
    )
