"""Torch decoder of ``qsvd`` records: codes unpacked and dequantized on the device, bit-identical to the numpy ``to_factors``.

Every step is integer arithmetic or one correctly rounded binary32 operation (the level times its
binary16 scale is exact; times √S_j is one rounding), so any IEEE device gives numpy's bits.
"""

from __future__ import annotations

import torch

from adapterpack.adapter import Module
from adapterpack.encodings.qsvd import FLOAT, record_plan
from adapterpack.errors import RecordError
from adapterpack.factors import Factors
from adapterpack.torch.decoders.base import register_torch_decoder, slot


def _view(data: torch.Tensor, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Bytes ``[start, end)`` of ``data`` as little-endian ``dtype`` values (copied: the offset may be unaligned)."""
    return data[start:end].clone().view(dtype)


def _check(module: Module, name: str, x: torch.Tensor) -> None:
    x64 = x.to(torch.float64)
    if x64.numel() and (not bool(torch.isfinite(x64).all()) or bool((x64 < 0).any())):
        raise RecordError(f"module {module.name!r}: {name} must be finite and >= 0")


def _unpack(seg: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Codes of width ``bits`` (LSB first) of packed bytes ``seg``, as int32 on ``seg``'s device."""
    shifts = torch.arange(8, device=seg.device, dtype=torch.int32)
    stream = ((seg.to(torch.int32)[:, None] >> shifts) & 1).reshape(-1)[: count * bits].reshape(count, bits)
    weights = torch.ones(bits, device=seg.device, dtype=torch.int32) << torch.arange(bits, device=seg.device, dtype=torch.int32)
    return (stream * weights).sum(dim=1, dtype=torch.int32)


@register_torch_decoder("qsvd", staged=True)
def decode_qsvd(module: Module, device: torch.device, dtype: torch.dtype | None) -> Factors:
    """A ``[k, n]`` and B ``[out, k]`` in float32 on ``device`` (cast to ``dtype`` afterwards when one is asked for)."""
    plan = record_plan(module)
    out, n, g = plan.out, plan.n, plan.group_size
    data = slot(module, "data", device, None)
    if data.dtype != torch.uint8:
        raise RecordError(f"module {module.name!r}: qsvd data must be uint8, got {data.dtype}")
    plan.check_data(f"module {module.name!r}", "uint8", tuple(data.shape))
    a = torch.zeros((plan.rank, n), dtype=torch.float32, device=device)
    b = torch.zeros((out, plan.rank), dtype=torch.float32, device=device)
    for j, (w, (s0, su, sv, cu, cv, end)) in enumerate(zip(plan.bits, plan.spans(), strict=True)):
        s = _view(data, s0, su, torch.float32)
        _check(module, f"component {j}: singular value", s)
        scales = _view(data, su, cu, torch.float16)
        _check(module, f"component {j}: scales", scales)
        scales32 = scales.to(torch.float32)
        vecs = []
        for count, (c0, c1), (g0, g1) in ((out, (cu, cv), (su, sv)), (n, (cv, end), (sv, cu))):
            if w == FLOAT:
                x = _view(data, c0, c1, torch.float16).to(torch.float32)
                if not bool(torch.isfinite(x).all()):
                    raise RecordError(f"module {module.name!r}: component {j} holds non-finite float values")
            else:
                levels = (2 * _unpack(data[c0:c1], w, count) - ((1 << w) - 1)).to(torch.float32)
                per_group = scales32[(g0 - su) // 2 : (g1 - su) // 2]
                x = levels * per_group.repeat_interleave(min(g, count))[:count]
            vecs.append(x)
        root = s.to(torch.float64).sqrt().to(torch.float32)
        b[:, j] = vecs[0] * root
        a[j] = root * vecs[1]
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    transpose = plan.layout == "embedding" or plan.fan_in_fan_out
    return Factors(
        A=a, B=b, scale=1.0, base_shape=tuple(int(d) for d in module.base_shape), transpose=transpose, layout=plan.layout
    )
