"""Torch decoder of ``shared`` records (one member of an adapter bank): B = U·S, A = Vᵀ on the device."""

from __future__ import annotations

import torch

from adapterpack.adapter import Module
from adapterpack.factors import Factors
from adapterpack.torch.decoders.base import register_torch_decoder, slot


@register_torch_decoder("shared", staged=True)
def decode_shared(module: Module, device: torch.device, dtype: torch.dtype | None) -> Factors:
    """ΔW = (U·S)·Vᵀ with scale 1; U·S is formed on the device in float32 (float64 for a float64 record or
    ``dtype``), then the factors are cast to ``dtype`` (casting U and S first would round three times)."""
    p = module.params
    u, v, s = (slot(module, k, device, None) for k in ("U", "V", "S"))
    work = torch.float64 if torch.float64 in (u.dtype, dtype) else torch.float32
    u, v, s = u.to(work), v.to(work), s.to(work)
    b = u * s[None, :] if s.dim() == 1 else u @ s
    a = v.T.contiguous()
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    layout = p.get("layout", "linear")
    return Factors(
        A=a,
        B=b,
        scale=1.0,
        base_shape=tuple(int(d) for d in module.base_shape),
        transpose=layout == "embedding" or bool(p.get("fan_in_fan_out", False)),
        layout=layout,
    )
