"""Torch decoder of ``qsvd`` records: codes unpacked and dequantized on the device, bit-identical to the numpy ``to_factors``.

Every step is integer arithmetic or one correctly rounded binary32 operation (the level times its
binary16 scale is exact; times √S_j is one rounding), so any IEEE device gives numpy's bits.
"""

from __future__ import annotations

import torch

from adapterpack.adapter import Module
from adapterpack.encodings.qsvd import FLOAT, code_bytes, record_plan
from adapterpack.errors import RecordError
from adapterpack.factors import Factors
from adapterpack.linalg.quantize import n_groups
from adapterpack.torch.decoders.base import register_torch_decoder, slot


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
    layout, fifo, out, n, bits, g = plan.layout, plan.fan_in_fan_out, plan.out, plan.n, plan.bits, plan.group_size
    s = slot(module, "S", device, None)
    scales = slot(module, "scales", device, None)
    codes = slot(module, "codes", device, None)
    if (s.dtype, codes.dtype, scales.dtype) != (torch.float32, torch.uint8, torch.float16):
        raise RecordError(f"module {module.name!r}: S must be float32, codes uint8 and scales float16")
    plan.check_shapes(f"module {module.name!r}", s.shape, codes.shape, scales.shape)
    _check(module, "singular values S", s)
    _check(module, "scales", scales)
    root = s.to(torch.float64).sqrt().to(torch.float32)
    scales32 = scales.to(torch.float32)
    a = torch.zeros((len(bits), n), dtype=torch.float32, device=device)
    b = torch.zeros((out, len(bits)), dtype=torch.float32, device=device)
    at = st = 0
    for j, w in enumerate(bits):
        vecs = []
        for count in (out, n):
            nb = code_bytes(w, count)
            seg = codes[at : at + nb]
            at += nb
            if w == FLOAT:
                x = seg.clone().view(torch.float16).to(torch.float32)
                if not bool(torch.isfinite(x).all()):
                    raise RecordError(f"module {module.name!r}: component {j} holds non-finite float values")
            else:
                ns = n_groups(count, g)
                levels = (2 * _unpack(seg, w, count) - ((1 << w) - 1)).to(torch.float32)
                x = levels * scales32[st : st + ns].repeat_interleave(min(g, count))[:count]
                st += ns
            vecs.append(x)
        b[:, j] = vecs[0] * root[j]
        a[j] = root[j] * vecs[1]
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    return Factors(
        A=a,
        B=b,
        scale=1.0,
        base_shape=tuple(int(d) for d in module.base_shape),
        transpose=layout == "embedding" or fifo,
        layout=layout,
    )
