"""Torch decoders, one module per encoding (see ``base.py``); importing this package registers them.

Add a decoder: a new module here with ``@register_torch_decoder("<id>")`` and one import line below.
"""

from __future__ import annotations

from adapterpack.torch.decoders import lora, nola, shared, svd  # noqa: F401  (registers the lora, nola, shared and svd decoders)
from adapterpack.torch.decoders.base import (
    TorchDecoder,
    TorchFactors,
    decode,
    decode_all,
    get_torch_decoder,
    is_staged,
    numpy_fallback,
    register_torch_decoder,
    slot,
    torch_decoder_ids,
)

__all__ = [
    "TorchDecoder",
    "TorchFactors",
    "decode",
    "decode_all",
    "get_torch_decoder",
    "is_staged",
    "numpy_fallback",
    "register_torch_decoder",
    "slot",
    "torch_decoder_ids",
]
