"""Torch decoder of ``svd`` records: B = Utᵀ·√S, A = √S·Vt on the device, bit-identical to the numpy ``to_factors``."""

from __future__ import annotations

import torch

from adapterpack.adapter import Module
from adapterpack.errors import RecordError
from adapterpack.factors import Factors
from adapterpack.torch.decoders.base import register_torch_decoder, slot


@register_torch_decoder("svd", staged=True)
def decode_svd(module: Module, device: torch.device, dtype: torch.dtype | None) -> Factors:
    """√S computed in float64 and rounded to the vectors' working dtype (float32, or float64), as numpy does;
    the factors are cast to ``dtype`` afterwards when one is asked for."""
    s = slot(module, "S", device, None)
    ut, vt = slot(module, "Ut", device, None), slot(module, "Vt", device, None)
    work = torch.float64 if ut.dtype == torch.float64 else torch.float32
    s64 = s.to(torch.float64)
    if s64.numel() and (not bool(torch.isfinite(s64).all()) or bool((s64 < 0).any()) or bool((s64.diff() > 0).any())):
        raise RecordError(f"module {module.name!r}: singular values S must be finite, >= 0 and descending")
    root = s64.sqrt().to(work)
    a = root[:, None] * vt.to(work)
    b = ut.to(work).T * root[None, :]
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    p = module.params
    layout = p.get("layout", "linear")
    return Factors(
        A=a,
        B=b,
        scale=1.0,
        base_shape=tuple(int(d) for d in module.base_shape),
        transpose=layout == "embedding" or bool(p.get("fan_in_fan_out", False)),
        layout=layout,
    )
