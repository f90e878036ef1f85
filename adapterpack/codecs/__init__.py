"""Lossless codecs, one registry (numcodecs style): bytes ↔ stored bytes.

Each codec is one module holding a :class:`Codec` subclass registered under its spec id; it
declares its id, its parameters (``__init__``'s, kept as attributes) and encode/check/decode.
``get_codec(config)`` builds one from the JSON object stored in the index;
``codec.get_config()`` gives that object back. Other packages add codecs through entry points
in the ``adapterpack.codecs`` group (see README, "Extending").
"""

from __future__ import annotations

from adapterpack.codecs import byteplanes, pco, raw, zstd  # noqa: F401  (importing registers them)
from adapterpack.codecs.base import Codec, codec_ids, get_codec, register_codec

__all__ = ["Codec", "codec_ids", "get_codec", "register_codec"]
