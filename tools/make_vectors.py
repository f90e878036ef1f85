"""Regenerate the golden vectors ``spec/vectors/NAME.apack`` + ``NAME.json`` (spec/format.md §9).

Run from the repository root::

    python -m tools.make_vectors              # rewrite spec/vectors/
    python -m tools.make_vectors --out DIR    # write elsewhere (tests/test_vectors.py compares)

Each JSON (format: spec/vectors.md) says what a reader must decode from its file — for every
adapter, module, slot and pass-through tensor: dtype, shape, codec, SHA-256 of the decoded bytes
and the values (bf16 as uint16 bit patterns in hex), and each module's ΔW (``delta``, computed
from the JSON alone by :mod:`tools.vectors._reference`) — or which error it must raise. Values come from fixed seeds and
are exact in every dtype used, and the writer id is pinned, so the output is byte-identical
from run to run (files holding zstd frames: for a given libzstd version, recorded in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import zstandard

from adapterpack import dtypes
from adapterpack.adapter import Adapter, Module
from adapterpack.checksum import crc32c
from adapterpack.container import writer
from adapterpack.container.index import dumps, fill_implied, index_text
from adapterpack.container.preamble import FLAG_IMPLIED, FLAG_INDEX_ZSTD, FLAG_PACKED, PREAMBLE_SIZE, Preamble, data_start
from tools.vectors import _reference as reference
from tools.vectors import modules as vector_modules

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "spec" / "vectors"
WRITER_ID = "adapterpack (spec vectors)"
ZSTD_VERSION = ".".join(map(str, zstandard.ZSTD_VERSION))
BF16 = np.dtype(ml_dtypes.bfloat16)
#: Compression level per codec, pinned here so the vectors do not follow the library's defaults.
#: The minor version of the forward-compatibility vectors: newer than any reader will be (spec §1.1).
FUTURE_MINOR = 0xFFFF
LEVELS: dict[str, int | None] = {"raw": None, "zstd": 3, "byteplanes": 1}


# --- adapters ------------------------------------------------------------------------------------


def _values(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any, levels: int = 64) -> np.ndarray:
    """k/32 for |k| < levels: exact in bf16, fp16, fp32 and fp64."""
    return (rng.integers(-levels, levels, shape) / 32).astype(dtype)


def _lora(
    name: str, rng: np.random.Generator, dtype: Any, out_f: int, in_f: int, rank: int = 2, levels: int = 64, **params: Any
) -> Module:
    a = _values(rng, (rank, in_f), dtype, levels)
    b = _values(rng, (out_f, rank), dtype, levels)
    return Module(name, "lora", (out_f, in_f), {"rank": rank, "alpha": 2.0 * rank, **params}, {"A": a, "B": b})


def basic(name: str = "default", seed: int = 0, out_f: int = 64, in_f: int = 96) -> Adapter:
    """q/k/v projections in float32, float16 and bfloat16; few distinct values, so compression pays."""
    rng = np.random.default_rng(seed)
    mods = [
        _lora("model.layers.0.self_attn.q_proj", rng, np.float32, out_f, in_f, levels=8),
        _lora("model.layers.0.self_attn.k_proj", rng, np.float16, out_f, in_f, levels=8),
        _lora("model.layers.0.self_attn.v_proj", rng, BF16, out_f, in_f, levels=8),
    ]
    return Adapter(name=name, base_model="test/tiny-base", base_architecture="LlamaForCausalLM", modules={m.name: m for m in mods})


def small(seed: int = 1, tensor: bool = False) -> Adapter:
    """One rank-2 module on a 4×6 weight, float32 (with ``tensor``, also a 2-element bool pass-through tensor)."""
    rng = np.random.default_rng(seed)
    m = _lora("model.layers.0.self_attn.q_proj", rng, np.float32, 4, 6)
    tensors = {"mask": np.array([True, False])} if tensor else {}
    return Adapter(name="default", base_model="test/tiny-base", modules={m.name: m}, tensors=tensors)


def small_padded(seed: int = 5) -> Adapter:
    """One rank-2 float16 module on a 4×3 weight: A is 12 bytes, so 4 padding bytes precede B."""
    rng = np.random.default_rng(seed)
    m = _lora("model.layers.0.self_attn.q_proj", rng, np.float16, 4, 3)
    return Adapter(name="default", base_model="test/tiny-base", modules={m.name: m})


def features(seed: int = 2) -> Adapter:
    """Every lora layout and option, pass-through tensors of several dtypes, provenance."""
    rng = np.random.default_rng(seed)
    emb = _lora("model.embed_tokens", rng, np.float32, 4, 10, layout="embedding")  # A [r, vocab], B [dim, r]
    emb.base_shape = (10, 4)
    fifo = _lora("transformer.h.0.attn.c_attn", rng, np.float32, 12, 6, fan_in_fan_out=True)  # GPT-2 Conv1D
    fifo.base_shape = (6, 12)
    dora = _lora("model.layers.0.mlp.down_proj", rng, np.float16, 6, 8, rank=4, rslora=True, dora=True)
    dora.tensors["magnitude"] = _values(rng, (6,), np.float32) + np.float32(4)
    conv = Module(
        "unet.down.0.conv",
        "lora",
        (5, 3, 3, 3),
        {"rank": 2, "alpha": 3, "layout": "conv"},
        {"A": _values(rng, (2, 3, 3, 3), BF16), "B": _values(rng, (5, 2, 1, 1), BF16)},
    )
    tensors = {
        "lm_head.weight": _values(rng, (16, 80), np.float32, levels=16),  # 5120 bytes: a 256-aligned blob
        "token_ids": np.array([0, 1, 2**40, -1, 7], np.int64),
        "mask": np.array([True, False, True]),
        "flags": np.array([1, 2, 255], np.uint8),  # 3 bytes: the next blob is preceded by padding
        "scores": np.array([-0.0, 1.5], np.float64),
    }
    source = {"format": "peft", "config": {"r": 2, "lora_alpha": 4, "use_rslora": False, "target_modules": ["q_proj"]}}
    return Adapter(
        name="features",
        base_model="HuggingFaceTB/SmolLM2-135M",
        base_architecture="LlamaForCausalLM",
        modules={m.name: m for m in (emb, fifo, dora, conv)},
        tensors=tensors,
        source=source,
        metadata={"note": "golden vector", "ünïcode": "✓"},
    )


# --- writing and crafting -------------------------------------------------------------------------


@contextlib.contextmanager
def _pinned_writer_id() -> Iterator[None]:
    """The index's ``writer`` names the vectors, not the package version, so a release does not change them."""
    saved = writer._writer_id
    writer._writer_id = lambda: WRITER_ID
    try:
        yield
    finally:
        writer._writer_id = saved


def _write(path: Path, adapters: Adapter | list[Adapter], codec: str) -> None:
    with _pinned_writer_id():
        writer.write_apack(path, adapters, codec=codec, level=LEVELS[codec])


def _read_index(raw: bytes) -> tuple[dict[str, Any], int, int]:
    """(index as a JSON object, preamble flags, stored index length) of a file's bytes; BLOB offsets and lengths a
    1.5 index left out (the implied flag) are written in, so the object reads under any flags."""
    flags, length = struct.unpack_from("<IQ", raw, 12)
    index = json.loads(index_text(raw[PREAMBLE_SIZE : PREAMBLE_SIZE + length], bool(flags & FLAG_INDEX_ZSTD)))
    if flags & FLAG_IMPLIED:
        fill_implied(index["blobs"], bool(flags & FLAG_PACKED))
    return index, flags, length


def _craft(path: Path, edit: Callable[[dict[str, Any]], None], major: int = 1, minor: int = 0) -> None:
    """Rewrite ``path``'s index with ``edit`` applied (and the preamble's version), keeping its blobs and layout
    (the packed flag stays as written); the new index is plain JSON text."""
    raw = path.read_bytes()
    index, flags, length = _read_index(raw)
    data = raw[data_start(length, flags) :]
    edit(index)
    text = dumps(index)
    pre = Preamble(major, minor, flags & FLAG_PACKED, len(text), crc32c(text))
    path.write_bytes(pre.pack() + text + b"\0" * (pre.data_start - PREAMBLE_SIZE - len(text)) + data)


def _future_encoding(required: bool) -> Callable[[dict[str, Any]], None]:
    def edit(index: dict[str, Any]) -> None:
        m = index["adapters"][0]["modules"][-1]
        m["encoding"] = "x-future-encoding"
        m["params"] = {"bits": 3, "codebook": [0.5, -0.5]}
        m["tensors"] = {"U": m["tensors"]["A"], "V": m["tensors"]["B"]}
        if not required:
            m["must_understand"] = False
            index["x-future-key"] = {"added_in": "1.2"}

    return edit


def _future_codec(required: bool) -> Callable[[dict[str, Any]], None]:
    def edit(index: dict[str, Any]) -> None:
        blob = index["adapters"][0]["modules"][-1]["tensors"]["B"]
        index["blobs"][blob]["codec"] = {"id": "x-future-codec"} | ({} if required else {"must_understand": False})

    return edit


def _future_codec_tensor(index: dict[str, Any]) -> None:
    """The pass-through tensor's blob in an unknown codec a reader may skip (§4: the tensor is skipped and reported)."""
    blob = index["adapters"][0]["tensors"][0]["blob"]
    index["blobs"][blob]["codec"] = {"id": "x-future-codec", "must_understand": False}


def _with_future_module(adapter: Adapter) -> Adapter:
    m = _lora("model.layers.0.self_attn.o_proj", np.random.default_rng(9), np.float32, 4, 6)
    adapter.modules[m.name] = m
    return adapter


# --- describing what a reader must decode --------------------------------------------------------------


def _hex_bits(arr: np.ndarray, keep: np.ndarray | None = None) -> Any:
    """Elements as "0x..." strings of their bits (lowercase, 2 digits a byte), except where ``keep`` holds: numbers."""
    width = arr.dtype.itemsize
    bits = arr.view(np.dtype(f"<u{width}"))
    keep = np.zeros(arr.shape, bool) if keep is None else keep
    text = np.vectorize(lambda b, k, v: float(v) if k else f"0x{int(b):0{2 * width}x}", otypes=[object])
    return text(bits, keep, arr.astype(np.float64) if keep.any() else bits).tolist()


def describe_tensor(arr: np.ndarray, codec: str) -> dict[str, Any]:
    """dtype, shape, codec, SHA-256 of the decoded bytes and the values (spec/vectors.md §4: bf16 and non-finite
    floats as bit patterns in hex)."""
    dt = dtypes.of_array(arr)
    raw = dtypes.as_bytes(arr).tobytes()
    if dt.name == "bfloat16":
        values: Any = _hex_bits(arr)
    elif dt.is_float and not np.all(np.isfinite(arr)):
        values = _hex_bits(arr, np.isfinite(arr))
    else:
        values = arr.tolist()
    return {"dtype": dt.name, "shape": list(arr.shape), "codec": codec, "sha256": hashlib.sha256(raw).hexdigest(), "values": values}


def delta_json(delta: np.ndarray) -> Any:
    """ΔW as nested lists of numbers, non-finite elements as the strings "NaN", "Infinity", "-Infinity" (JSON has none)."""
    if np.all(np.isfinite(delta)):
        return delta.tolist()
    word = np.vectorize(lambda v: float(v) if np.isfinite(v) else "NaN" if np.isnan(v) else "Infinity" if v > 0 else "-Infinity",
                        otypes=[object])  # fmt: skip
    return word(delta).tolist()


def describe_file(
    path: Path,
    adapters: list[Adapter],
    skipped: dict[str, list[str]] | None = None,
    skipped_tensors: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """The JSON for a readable vector: what each adapter must decode to."""
    codec_of = _codecs_by_tensor(path)
    out_adapters = []
    for a in adapters:
        gone = (skipped or {}).get(a.name, [])
        gone_tensors = (skipped_tensors or {}).get(a.name, [])
        modules = []
        for m in a.modules.values():
            if m.name in gone:
                continue
            slots = {s: describe_tensor(np.asarray(t), codec_of[(a.name, m.name, s)]) for s, t in m.tensors.items()}
            entry = {"name": m.name, "encoding": m.encoding, "base_shape": list(m.base_shape), "params": m.params, "tensors": slots}
            entry["delta"] = delta_json(reference.delta(entry))  # from the JSON just written, by the spec's formulas
            modules.append(entry)
        tensors = [
            {"name": n} | describe_tensor(np.asarray(t), codec_of[(a.name, None, n)])
            for n, t in a.tensors.items()
            if n not in gone_tensors
        ]
        entry = {"name": a.name, "base_model": a.base_model, "base_architecture": a.base_architecture, "metadata": a.metadata}
        entry |= {"source": a.source, "modules": modules, "tensors": tensors, "skipped_modules": gone}
        if gone_tensors:
            entry["skipped_tensors"] = gone_tensors
        out_adapters.append(entry)
    version = _version(path)
    doc: dict[str, Any] = {"file": path.name, "sha256": _sha(path), "version": version, "adapters": out_adapters}
    if any(c not in ("raw",) for c in codec_of.values()):
        doc["zstd_version"] = ZSTD_VERSION  # compressed bytes depend on the libzstd that wrote them
    return doc


def _codecs_by_tensor(path: Path) -> dict[tuple[str, str | None, str], str]:
    index, _, _ = _read_index(path.read_bytes())
    ids = [b["codec"]["id"] for b in index["blobs"]]
    out: dict[tuple[str, str | None, str], str] = {}
    for a in index["adapters"]:
        for m in a["modules"]:
            for slot, ref in m["tensors"].items():
                out[(a["name"], m["name"], slot)] = ids[ref]
        for t in a.get("tensors", []):
            out[(a["name"], None, t["name"])] = ids[t["blob"]]
    return out


def _version(path: Path) -> str:
    major, minor = struct.unpack_from("<HH", path.read_bytes(), 8)
    return f"{major}.{minor}"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def to_json(obj: Any, level: int = 0) -> str:
    """Indented JSON with every list of numbers on one line (so a matrix reads as one row per line)."""
    if isinstance(obj, dict) and obj:
        pad = " " * (level + 1)
        items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {to_json(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * level + "}"
    if isinstance(obj, list) and any(isinstance(x, (dict, list)) for x in obj):
        pad = " " * (level + 1)
        return "[\n" + ",\n".join(pad + to_json(x, level + 1) for x in obj) + "\n" + " " * level + "]"
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "), allow_nan=False)


# --- the vectors ------------------------------------------------------------------------------------


def _codec_check(path: Path, expect: str, names: list[str]) -> None:
    """Make sure the named tensors really use ``expect`` (compression paid), or the vector would not test it."""
    codec_of = _codecs_by_tensor(path)
    for key, codec in codec_of.items():
        if key[1] in names or key[2] in names:
            assert codec == expect, f"{path.name}: {key} stored as {codec}, wanted {expect}"


def build(out: Path) -> list[str]:
    """Write every vector into ``out``; returns their names."""
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.apack"), *out.glob("*.json")]:
        old.unlink()  # a vector dropped from this list must not linger
    docs: dict[str, tuple[str, dict[str, Any]]] = {}

    def readable(
        name: str, what: str, adapters: list[Adapter], codec: str, craft: Callable[[Path], None] | None = None, **kw: Any
    ) -> Path:
        path = out / f"{name}.apack"
        _write(path, adapters, codec)
        if craft is not None:
            craft(path)
        doc = describe_file(path, adapters, kw.get("skipped"), kw.get("skipped_tensors"))
        if kw.get("verify_problems"):
            doc["verify_problems"] = kw["verify_problems"]  # open accepts the file; verify reports these
        docs[name] = (what, doc)
        return path

    def refused(
        name: str, what: str, adapters: list[Adapter], error: str, craft: Callable[[Path], None], rank: int | None = None
    ) -> None:
        path = out / f"{name}.apack"
        _write(path, adapters, "raw")
        craft(path)
        doc = {"file": path.name, "sha256": _sha(path), "version": _version(path), "error": error}
        docs[name] = (what, doc | ({"rank": rank} if rank is not None else {}))  # refused when opened at this rank

    qkv = list(basic().modules)
    readable("lora_raw_4x6", "one rank-2 lora module on a 4×6 weight, float32, raw", [small()], "raw")
    for codec in ("raw", "zstd", "byteplanes"):
        path = readable(f"lora_{codec}", f"rank-2 q/k/v modules in float32/float16/bfloat16, codec {codec}", [basic()], codec)
        _codec_check(path, codec, qkv)
    for codec in ("raw", "byteplanes"):
        path = readable(
            f"features_{codec}",
            "embedding, fan_in_fan_out, DoRA + rsLoRA, conv, pass-through tensors of several dtypes, "
            f"8- and 256-byte blob alignment, provenance; codec {codec}",
            [features()],
            codec,
        )
        _codec_check(path, codec, ["lm_head.weight"])
    readable("multi_adapter_zstd", "two adapters in one file, codec zstd", [basic("en", 3), basic("de", 4, 32, 48)], "zstd")
    readable("empty_adapter", "an adapter with no modules: the file ends where the data section starts", [Adapter("empty")], "raw")

    def major2(path: Path) -> None:
        _craft(path, lambda index: None, major=2)

    refused("future_major", "a valid file whose preamble says version 2.0", [small()], "UnsupportedVersionError", major2)

    future = "model.layers.0.self_attn.o_proj"
    readable(
        "future_minor_optional_encoding",
        "version 1.65535 (newer than any reader), an unknown top-level key, an unknown encoding record (must_understand: false)",
        [_with_future_module(small())],
        "raw",
        craft=lambda p: _craft(p, _future_encoding(required=False), minor=FUTURE_MINOR),
        skipped={"default": [future]},
    )
    readable(
        "future_minor_optional_codec",
        "version 1.65535 (newer than any reader), a blob of an unknown codec marked must_understand: false; its record skipped",
        [_with_future_module(small())],
        "raw",
        craft=lambda p: _craft(p, _future_codec(required=False), minor=FUTURE_MINOR),
        skipped={"default": [future]},
    )
    readable(
        "future_minor_optional_codec_tensor",
        "version 1.65535, a pass-through tensor whose blob is of an unknown codec marked must_understand: false; the "
        "tensor skipped",
        [small(tensor=True)],
        "raw",
        craft=lambda p: _craft(p, _future_codec_tensor, minor=FUTURE_MINOR),
        skipped_tensors={"default": ["mask"]},
    )
    refused(
        "required_unknown_encoding",
        "a record of an unknown encoding without must_understand: false",
        [_with_future_module(small())],
        "UnknownEncodingError",
        lambda p: _craft(p, _future_encoding(required=True), minor=2),
    )
    refused(
        "required_unknown_codec",
        "a blob of an unknown codec without must_understand: false",
        [_with_future_module(small())],
        "UnknownCodecError",
        lambda p: _craft(p, _future_codec(required=True), minor=2),
    )

    for extra in vector_modules():  # encodings added after 1.0: tools/vectors/<encoding>.py
        extra.build(readable, refused)

    for name, (what, doc) in docs.items():
        doc = {"description": what} | doc
        (out / f"{name}.json").write_text(to_json(doc) + "\n", encoding="utf-8")
    return sorted(docs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT.relative_to(REPO)})")
    args = parser.parse_args(argv)
    names = build(args.out)
    print(f"wrote {len(names)} vectors to {args.out} (libzstd {ZSTD_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
