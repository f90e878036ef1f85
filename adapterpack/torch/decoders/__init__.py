"""Torch decoders, one module per encoding (see ``base.py``): the decoder of encoding ``X`` is ``X.py`` here,
imported on the first lookup of ``X``.

Add a decoder: a new module here named after the encoding, with ``@register_torch_decoder("<id>")``;
or, from another package, an entry point in the ``adapterpack.torch_decoders`` group named after the
encoding id (a module that registers it, or the decoder function itself), loaded on first lookup.
"""

from __future__ import annotations

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
