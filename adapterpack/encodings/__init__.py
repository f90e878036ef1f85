"""Encodings of ΔW, one registry: each encoding is one module with an :class:`Encoding`.

An encoding validates its records from the index alone (shapes, params) and turns a
record into ΔW. The encoding with id ``X`` is the module ``X.py`` here, imported on its first lookup
(:data:`adapterpack.plugins.ENCODINGS`), so importing this package is cheap. Adding one: its module here, its torch decoder in
``adapterpack/torch/decoders/``, its spec file and its vectors; or, from another package, an
entry point in the ``adapterpack.encodings`` group (README, "Extending: a new codec or encoding").
"""

from __future__ import annotations

from adapterpack.encodings.base import Encoding, encoding_ids, get_encoding, is_known, register_encoding
from adapterpack.factors import Factors

__all__ = ["Encoding", "Factors", "encoding_ids", "get_encoding", "is_known", "register_encoding"]
