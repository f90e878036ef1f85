"""Torch decoders, one module per encoding (see ``base.py``); importing this package registers them.

Add a decoder: a new module here with ``@register_torch_decoder("<id>")`` and one import line below,
or, from another package, an entry point in the ``adapterpack.torch_decoders`` group named after the
encoding id (a module that registers it, or the decoder function itself), loaded on first lookup.
"""

from __future__ import annotations

from typing import Any

from adapterpack.plugins import Registry
from adapterpack.torch.decoders import base as _base
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


def _adopt(name: str, obj: Any) -> None:
    """Register the function an entry point names as the (unstaged) decoder of the encoding it is named after."""
    if callable(obj) and not isinstance(obj, type):
        register_torch_decoder(name)(obj)


# base.py keeps a plain dict; make it the plugin-aware registry (the built-ins above are in it already).
# TODO(lead): declare it this way in base.py itself and drop this swap.
if not isinstance(_base._REGISTRY, Registry):
    _registry: Registry[Any] = Registry("adapterpack.torch_decoders", "torch decoder", _adopt)
    dict.update(_registry, _base._REGISTRY)
    _base._REGISTRY = _registry  # type: ignore[assignment]

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
