"""The adapter and module records of a parsed index: references, names, encodings (spec §2.2, §2.3, §4).

The reader runs these on every file it opens and the writer on every index it is about
to write, so the writer can never produce a file the reader refuses.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from adapterpack.adapter import Adapter, Module, TensorLike
from adapterpack.container.index import BlobEntry, Index, get, get_name, get_shape
from adapterpack.encodings import get_encoding, is_known
from adapterpack.errors import DuplicateNameError, IndexFormatError, UnknownEncodingError


def _blob_ref(value: Any, n_blobs: int, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_blobs:
        raise IndexFormatError(f"{where}: blob reference {value!r:.200} is not a blob index")
    return value


def _named_entries(entries: list[Any], kind: str, where: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, entry) of a list of objects that must each have a unique ``name``."""
    seen: set[str] = set()
    out = []
    for k, e in enumerate(entries):
        if not isinstance(e, dict):
            raise IndexFormatError(f"{where} {kind} {k}: must be an object")
        name = get_name(e, "name", f"{where} {kind} {k}")
        if name in seen:
            raise DuplicateNameError(f"{where}: two {kind}s are named {name!r}")
        seen.add(name)
        out.append((name, e))
    return out


def check_references(index: Index) -> Counter[int]:
    """Module and tensor entries well formed, uniquely named, referencing existing blobs; every blob referenced.

    Returns how many records and tensor entries reference each blob (a bank's U and V: one per member).
    """
    n_blobs = len(index.blobs)
    used: Counter[int] = Counter()
    for a in index.adapters:
        aw = f"adapter {a['name']!r}"
        for name, m in _named_entries(get(a, "modules", list, aw), "module", aw):
            for slot, ref in get(m, "tensors", dict, f"{aw} module {name!r}").items():
                used[_blob_ref(ref, n_blobs, f"{aw} module {name!r} tensor {slot!r}")] += 1
        for name, t in _named_entries(get(a, "tensors", list, aw, []), "tensor", aw):
            used[_blob_ref(t.get("blob"), n_blobs, f"{aw} tensor {name!r}")] += 1
    unused = set(range(n_blobs)) - set(used)
    if unused:
        raise IndexFormatError(f"blob {min(unused)} is not referenced by any record ({len(unused)} unreferenced)")
    return used


def build_adapter(raw: dict[str, Any], blobs: list[BlobEntry], tensor: Callable[[int], TensorLike]) -> Adapter:
    """The :class:`Adapter` an ADAPTER object (already through :func:`check_references`) describes.

    Validates its fields and every record it understands (the encoding's ``validate`` sees
    only dtypes and shapes); ``tensor(i)`` gives the tensor object for blob ``i``. Records
    and tensors it cannot read but may skip (``must_understand: false``) are listed in
    ``skipped``.
    """
    aw = f"adapter {raw['name']!r}"
    base_model = get(raw, "base_model", (str, type(None)), aw, None)
    arch = get(raw, "base_architecture", (str, type(None)), aw, None)
    source = get(raw, "source", dict, aw, {})
    metadata = get(raw, "metadata", dict, aw, {})
    if not all(isinstance(v, str) for v in metadata.values()):
        raise IndexFormatError(f"{aw}: metadata values must be strings")
    adapter = Adapter(name=raw["name"], base_model=base_model, base_architecture=arch, source=source, metadata=metadata)
    for m in raw["modules"]:
        mw = f"{aw} module {m['name']!r}"
        enc_id = get(m, "encoding", str, mw)
        must = get(m, "must_understand", bool, mw, True)
        refs = m["tensors"]
        unreadable = [blobs[r].codec_id for r in refs.values() if not blobs[r].known_codec]
        if not is_known(enc_id) or unreadable:
            what = f"encoding {enc_id!r:.200}" if not is_known(enc_id) else f"codec {unreadable[0]!r:.200}"
            if must and not is_known(enc_id):
                raise UnknownEncodingError(f"{mw}: unknown encoding {enc_id!r:.200} marked must_understand")
            adapter.skipped.append(f"module {m['name']!r}: {what} not understood, skipped")
            continue
        module = Module(
            name=m["name"],
            encoding=enc_id,
            base_shape=get_shape(m, "base_shape", mw),
            params=get(m, "params", dict, mw),
            tensors={slot: tensor(r) for slot, r in refs.items()},
            must_understand=must,
        )
        get_encoding(enc_id).validate(module)
        adapter.modules[module.name] = module
    for t in raw.get("tensors", []):
        b = blobs[t["blob"]]
        if not b.known_codec:
            adapter.skipped.append(f"tensor {t['name']!r}: codec {b.codec_id!r:.200} not understood, skipped")
            continue
        adapter.tensors[t["name"]] = tensor(t["blob"])
    return adapter
