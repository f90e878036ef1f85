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

#: The codec the writers use for compressed output when none is named (convert, save, rerank, bank):
#: the smallest payload on real adapters in bf16, fp16 and fp32 (BENCHMARKS.md, tools/bench/bench_codecs.py).
DEFAULT_CODEC = "pco"

__all__ = ["DEFAULT_CODEC", "Codec", "codec_ids", "get_codec", "register_codec"]
