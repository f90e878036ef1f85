"""The adapter and module records of a validated index: fields, encodings (spec §2.2, §2.3, §4; stage 7 of §10.2).

The reader runs these on every adapter it opens and the writer on every index it is about
to write, so the writer can never produce a file the reader refuses. References and names
(stage 6) are checked with the index (:func:`adapterpack.container.index.read_index`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from msgspec import UNSET

from adapterpack.adapter import Adapter, Module, TensorLike
from adapterpack.container.index import AdapterRecord, BlobEntry, check_references, get, get_shape
from adapterpack.encodings import get_encoding, is_known
from adapterpack.errors import IndexFormatError, UnknownEncodingError

__all__ = ["build_adapter", "check_references"]


def _typed(value: Any, key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    """``value`` (``UNSET`` when the key is absent) checked by :func:`adapterpack.container.index.get`, the one rule."""
    if type(value) is kind:
        return value
    return get({} if value is UNSET else {key: value}, key, kind, where, default)


_NULLABLE_STR = (str, type(None))


def build_adapter(
    record: AdapterRecord | dict[str, Any], blobs: list[BlobEntry], tensor: Callable[[int], TensorLike]
) -> Adapter:
    """The :class:`Adapter` an ADAPTER record (of an index whose references are checked) describes.

    Validates its fields and every record it understands (the encoding's ``validate`` sees
    only dtypes and shapes); ``tensor(i)`` gives the tensor object for blob ``i``. Records
    and tensors it cannot read but may skip (``must_understand: false``) are listed in
    ``skipped``. ``record`` may also be the ADAPTER's JSON object.
    """
    rec = AdapterRecord.from_raw(record) if isinstance(record, dict) else record
    aw = f"adapter {rec.name!r}"
    base_model = _typed(rec.base_model, "base_model", _NULLABLE_STR, aw, None)
    arch = _typed(rec.base_architecture, "base_architecture", _NULLABLE_STR, aw, None)
    source = _typed(rec.source, "source", dict, aw, {})
    metadata = _typed(rec.metadata, "metadata", dict, aw, {})
    if not all(type(v) is str for v in metadata.values()):
        raise IndexFormatError(f"{aw}: metadata values must be strings")
    adapter = Adapter(name=rec.name, base_model=base_model, base_architecture=arch, source=source, metadata=metadata)
    modules = adapter.modules
    every_codec_known = all([b.known_codec for b in blobs])
    signature = [(b.dtype, b.shape) for b in blobs].__getitem__
    known_ids: dict[Any, bool] = {}
    #: records already validated, by what validation sees: many records of an adapter share encoding,
    #: params, base shape and slot dtypes and shapes (every layer's q_proj), and are validated once
    valid: set[tuple[Any, ...]] = set()
    for m in rec.modules:
        enc_id = m.encoding
        if type(enc_id) is not str:
            enc_id = _typed(enc_id, "encoding", str, _where(aw, m))
        must = m.must_understand
        if must is UNSET:
            must = True
        elif type(must) is not bool:
            must = _typed(must, "must_understand", bool, _where(aw, m), True)
        refs = m.tensors
        known = known_ids.get(enc_id)
        if known is None:
            known = known_ids[enc_id] = is_known(enc_id)
        unreadable = [] if every_codec_known else [blobs[r].codec_id for r in refs.values() if not blobs[r].known_codec]
        if not known or unreadable:
            what = f"encoding {enc_id!r:.200}" if not known else f"codec {unreadable[0]!r:.200}"
            if must and not known:
                raise UnknownEncodingError(f"{_where(aw, m)}: unknown encoding {enc_id!r:.200} marked must_understand")
            adapter.skipped.append(f"module {m.name!r}: {what} not understood, skipped")
            continue
        base_shape = m.base_shape
        if type(base_shape) is not tuple:  # the fast path decoded a checked tuple; JSON objects hold a list
            base_shape = get_shape({} if base_shape is UNSET else {"base_shape": base_shape}, "base_shape", _where(aw, m))
        params = m.params
        if type(params) is not dict:
            params = _typed(params, "params", dict, _where(aw, m))
        module = Module(m.name, enc_id, base_shape, params, {slot: tensor(r) for slot, r in refs.items()}, must)
        key = _validation_key(enc_id, must, base_shape, params, refs, signature)
        if key is None or key not in valid:
            get_encoding(enc_id).validate(module)
            if key is not None:
                valid.add(key)
        modules[module.name] = module
    if rec.tensors is not UNSET:
        for t in rec.tensors:
            b = blobs[t.blob]
            if not b.known_codec:
                adapter.skipped.append(f"tensor {t.name!r}: codec {b.codec_id!r:.200} not understood, skipped")
                continue
            adapter.tensors[t.name] = tensor(t.blob)
    return adapter


def _where(aw: str, m: Any) -> str:
    """How errors name module record ``m`` of the adapter ``aw`` names (built only for an error)."""
    return f"{aw} module {m.name!r}"


_PARAMS_TEXT = msgspec.json.Encoder().encode


def _validation_key(
    enc_id: str,
    must: bool,
    base_shape: tuple[int, ...],
    params: dict[str, Any],
    refs: dict[str, int],
    signature: Callable[[int], tuple[str, tuple[int, ...]]],
) -> tuple[Any, ...] | None:
    """What an encoding's ``validate`` sees of a record read from an index (dtypes and shapes, never values), hashable;
    ``signature(i)`` is blob ``i``'s (dtype, shape). The params are JSON values (decoded from the index), so their JSON
    text tells them apart, types included (``1``, ``1.0`` and ``true`` are equal in Python); None where they have none."""
    try:
        text = _PARAMS_TEXT(params)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        return None
    return (enc_id, must, base_shape, text, tuple(refs), tuple(map(signature, refs.values())))
