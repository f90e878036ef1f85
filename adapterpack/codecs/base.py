"""The codec interface and registry."""

from __future__ import annotations

from typing import Any, ClassVar

from adapterpack.errors import IndexFormatError, UnknownCodecError

_REGISTRY: dict[str, type[Codec]] = {}


class Codec:
    """Turns a blob's decoded bytes into stored bytes and back, losslessly.

    ``itemsize`` is the element size of the tensor, for codecs that exploit it.
    Decoding is two steps so that a lying header costs nothing (spec §5.1): :meth:`check`
    validates the stored bytes' headers against the decoded length the validated index
    states, without allocating; only then is the output buffer allocated (exactly that
    length) and filled by :meth:`decode_into`. :meth:`decode_new` does both in that order.
    """

    codec_id: ClassVar[str]

    def get_config(self) -> dict[str, Any]:
        """The JSON object stored in the index (always has ``id``)."""
        return {"id": self.codec_id}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Codec:
        """Build the codec from its index object (unknown keys ignored)."""
        return cls()

    def encode(self, data: memoryview, itemsize: int) -> bytes:
        """Stored bytes for ``data``."""
        raise NotImplementedError

    def check(self, stored: memoryview, length: int, itemsize: int) -> None:
        """Refuse (CodecError) stored bytes whose headers disagree with ``length`` decoded bytes; allocates nothing."""
        raise NotImplementedError

    def decode_into(self, stored: memoryview, out: memoryview, itemsize: int) -> None:
        """Fill ``out`` from stored bytes that passed :meth:`check`; raise CodecError if they decode otherwise."""
        raise NotImplementedError

    def decode(self, stored: memoryview, out: memoryview, itemsize: int) -> None:
        """Check ``stored`` against ``len(out)``, then fill ``out`` (exactly the decoded length)."""
        self.check(stored, len(out), itemsize)
        self.decode_into(stored, out, itemsize)

    def decode_new(self, stored: memoryview, length: int, itemsize: int) -> bytearray:
        """Check ``stored`` against ``length`` first, then allocate exactly ``length`` bytes and decode into them."""
        self.check(stored, length, itemsize)
        buf = bytearray(length)
        self.decode_into(stored, memoryview(buf), itemsize)
        return buf

    def max_expansion(self) -> int | None:
        """Largest possible decoded/stored size ratio, or None when decoded == stored."""
        return None


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` available under ``cls.codec_id``."""
    _REGISTRY[cls.codec_id] = cls
    return cls


def codec_ids() -> list[str]:
    """Ids of every registered codec."""
    return list(_REGISTRY)


def is_known(codec_id: str) -> bool:
    """Whether a codec id is implemented here."""
    return codec_id in _REGISTRY


def get_codec(config: dict[str, Any] | str) -> Codec:
    """A codec instance from an index object such as ``{"id": "zstd", "level": 3}`` or an id."""
    if isinstance(config, str):
        config = {"id": config}
    if not isinstance(config, dict) or not isinstance(config.get("id"), str):
        raise IndexFormatError(f"codec must be an object with a string 'id', got {config!r}")
    cls = _REGISTRY.get(config["id"])
    if cls is None:
        raise UnknownCodecError(f"unknown codec {config['id']!r} (known: {', '.join(_REGISTRY)})")
    return cls.from_config(config)
