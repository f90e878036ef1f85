"""The codec interface and registry.

A codec declares its id, its parameters and encode/decode; the rest comes from here by
introspection, as in numcodecs: every parameter of ``__init__`` is kept as the attribute of
the same name, and is the config key of the same name in the index (after ``id``, in the
order of the signature). :meth:`Codec.get_config`, :meth:`Codec.from_config`, ``==`` and
``repr`` are built from them.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from adapterpack.errors import IndexFormatError, SizeLimitError, UnknownCodecError
from adapterpack.plugins import Registry

_NO_DEFAULT: Any = inspect.Parameter.empty


class Codec:
    """Turns a blob's decoded bytes into stored bytes and back, losslessly.

    ``itemsize`` is the element size of the tensor, for codecs that exploit it.
    Decoding is two steps so that a lying header costs nothing (spec §5.1): :meth:`check`
    validates the stored bytes' headers against the decoded length the validated index
    states, without allocating; only then is the output buffer allocated (exactly that
    length) and filled by :meth:`decode_into`. :meth:`decode_new` does both in that order.
    """

    codec_id: ClassVar[str]
    #: ``(name, default, accepted types or None)`` of each ``__init__`` parameter, in order (set for each subclass).
    _params: ClassVar[tuple[tuple[str, Any, Any], ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        params = []
        if cls.__init__ is not object.__init__:
            for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY) or p.name in ("id", "must_understand"):
                    raise TypeError(f"{cls.__qualname__}.__init__: parameter {p.name!r} cannot be a codec config key")
                d = p.default
                types = None if d is _NO_DEFAULT or d is None else (int, float) if type(d) is float else type(d)
                params.append((p.name, d, types))  # an int is also a float (JSON may write 2.0 as 2)
        cls._params = tuple(params)

    def get_config(self) -> dict[str, Any]:
        """The JSON object stored in the index: ``id``, then each parameter."""
        config: dict[str, Any] = {"id": self.codec_id}
        for name, *_ in self._params:
            config[name] = getattr(self, name)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Codec:
        """Build the codec from its index object: unknown keys are ignored, and a parameter that is
        missing or not of its default's type takes the default (parameters only steer encoding)."""
        kwargs = {}
        for name, default, types in cls._params:
            value = config.get(name, default)
            if value is _NO_DEFAULT:
                raise IndexFormatError(f"codec {cls.codec_id!r}: config needs {name!r}")
            kwargs[name] = default if types is not None and not isinstance(value, types) else value
        return cls(**kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and type(other) is type(self) and other.get_config() == self.get_config()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name, *_ in self._params)
        return f"{type(self).__name__}({args})"

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
        """Check ``stored`` against ``length`` first, then allocate exactly ``length`` bytes and decode into them.

        A legal blob may decode to up to 32768 times its stored bytes (spec §7): one the process cannot allocate is a
        SizeLimitError naming both sizes, not a bare MemoryError.
        """
        self.check(stored, length, itemsize)
        try:
            buf = bytearray(length)
            self.decode_into(stored, memoryview(buf), itemsize)
        except MemoryError:
            raise SizeLimitError(
                f"out of memory decoding a {self.codec_id} blob of {length} bytes (stored in {len(stored)} bytes)"
            ) from None
        return buf

    def max_expansion(self) -> int | None:
        """Largest possible decoded/stored size ratio, or None when decoded == stored."""
        return None


def _adopt(name: str, obj: Any) -> None:
    """Register the Codec subclass an entry point names, if its id is the entry point's name."""
    if isinstance(obj, type) and issubclass(obj, Codec) and getattr(obj, "codec_id", None) == name:
        register_codec(obj)


#: Built-ins register on import; other ids come from entry points of this group, loaded on first lookup.
_REGISTRY: Registry[type[Codec]] = Registry("adapterpack.codecs", "codec", _adopt)


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` available under ``cls.codec_id``."""
    _REGISTRY[cls.codec_id] = cls
    return cls


def codec_ids(plugins: bool = False) -> list[str]:
    """Ids of every registered codec; with ``plugins``, also those installed plugins offer (reads the entry points)."""
    ids = list(_REGISTRY)
    return ids + [i for i in _REGISTRY.plugin_ids() if i not in ids] if plugins else ids


def is_known(codec_id: str) -> bool:
    """Whether a codec id is implemented here or by an installed plugin (loaded now if so)."""
    return codec_id in _REGISTRY or _REGISTRY.load(codec_id)


def get_codec(config: dict[str, Any] | str) -> Codec:
    """A codec instance from an index object such as ``{"id": "zstd", "level": 3}`` or an id."""
    if isinstance(config, str):
        config = {"id": config}
    if not isinstance(config, dict) or not isinstance(config.get("id"), str):
        raise IndexFormatError(f"codec must be an object with a string 'id', got {config!r}")
    cls = dict.get(_REGISTRY, config["id"]) or _REGISTRY.get(config["id"])  # (the plain dict look-up first: a hot path)
    if cls is None:
        raise UnknownCodecError(f"unknown codec {config['id']!r} (known: {', '.join(_REGISTRY)})")
    return cls.from_config(config)
