"""Torch decoder of ``lora`` records: the stored factors as they are (bit-exact), scale from alpha and rank."""

from __future__ import annotations

import torch

from adapterpack.adapter import Module
from adapterpack.encodings.lora import lora_scale
from adapterpack.factors import Factors
from adapterpack.torch.decoders.base import as_2d, register_torch_decoder, slot


@register_torch_decoder("lora", staged=True)
def decode_lora(module: Module, device: torch.device, dtype: torch.dtype | None) -> Factors:
    """A ``[r, n]`` and B ``[m, r]`` as 2-D views of the stored tensors; DoRA's magnitude kept as is."""
    p = module.params
    a, b = as_2d(slot(module, "A", device, dtype), slot(module, "B", device, dtype))
    layout = p.get("layout", "linear")
    return Factors(
        A=a,
        B=b,
        scale=lora_scale(p["alpha"], p["rank"], p.get("rslora", False)),
        base_shape=tuple(int(d) for d in module.base_shape),
        transpose=layout == "embedding" or bool(p.get("fan_in_fan_out", False)),
        layout=layout,
        magnitude=slot(module, "magnitude", device, dtype) if "magnitude" in module.tensors else None,
    )
