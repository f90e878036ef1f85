"""Test helpers that craft .apack files byte by byte, valid or broken on purpose.

A :class:`Parts` is a file taken apart: preamble fields, the index as a dict, and the data
section (everything from ``D``). Tests edit one thing and call :meth:`Parts.build`, which
recomputes the index CRC-32C and the padding unless told not to, so exactly one defect is
present (test-gguf.cpp's approach: start valid, corrupt one thing).
"""

from __future__ import annotations

import copy
import json
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from adapterpack.adapter import Adapter, Module
from adapterpack.checksum import crc32c
from adapterpack.container.index import fill_implied, index_text, plan_offsets
from adapterpack.container.preamble import FLAG_IMPLIED, FLAG_INDEX_ZSTD, FLAG_PACKED, MAGIC, PREAMBLE_SIZE, data_start
from adapterpack.container.writer import write_apack
from tools import fuzz_open

PREAMBLE = struct.Struct("<8sHHIQII")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def preamble(
    index_length: int,
    index_crc: int,
    *,
    magic: bytes = MAGIC,
    major: int = 1,
    minor: int = 0,
    flags: int = 0,
    reserved: int = 0,
) -> bytes:
    """32 preamble bytes with any field value (valid or not)."""
    return PREAMBLE.pack(magic, major, minor, flags, index_length, index_crc, reserved)


def index_bytes(index: dict[str, Any] | bytes | str) -> bytes:
    """Index bytes: a dict as compact JSON, a str as UTF-8, bytes as they are."""
    if isinstance(index, bytes):
        return index
    if isinstance(index, str):
        return index.encode("utf-8")
    return json.dumps(index, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def assemble(
    index: dict[str, Any] | bytes | str,
    data: bytes = b"",
    *,
    pad: bytes | None = None,
    index_length: int | None = None,
    index_crc: int | None = None,
    compress: bool | None = None,
    **fields: Any,
) -> bytes:
    """preamble + index + padding to D + data section.

    ``index_length``/``index_crc`` default to the true values (pass them to lie);
    ``pad`` replaces the zero padding between index and D; ``fields`` go to :func:`preamble`.
    The index is stored as one zstd frame when ``compress`` is true, by default when ``flags`` has the
    compressed-index bit (pass ``compress=False`` with that bit to store hand-made frame bytes).
    """
    ib = index_bytes(index)
    if compress if compress is not None else fields.get("flags", 0) & FLAG_INDEX_ZSTD:
        ib = zstd_frame(ib, level=19)
    length = len(ib) if index_length is None else index_length
    crc = crc32c(ib) if index_crc is None else index_crc
    if pad is None:
        pad = b"\0" * (data_start(len(ib), fields.get("flags", 0)) - PREAMBLE_SIZE - len(ib))
    return preamble(length, crc, **fields) + ib + pad + data


@dataclass
class Parts:
    """A file taken apart: edit any piece, then :meth:`build`."""

    index: dict[str, Any]
    data: bytes
    major: int = 1
    minor: int = 0
    flags: int = 0
    reserved: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> Parts:
        """A deep copy to mutate."""
        return replace(self, index=copy.deepcopy(self.index), extra=dict(self.extra))

    def build(self, **overrides: Any) -> bytes:
        """The file's bytes (CRC and padding recomputed unless ``overrides`` say otherwise).

        Under the implied flag (1.5) a BLOB ``offset`` or ``length`` equal to the value a reader derives is left out,
        as the writer leaves it out; one a test changed stays, so the reader checks it."""
        kw = {"major": self.major, "minor": self.minor, "flags": self.flags, "reserved": self.reserved} | self.extra | overrides
        flags = kw["flags"]
        return assemble(self._implied_left_out(flags) if flags & FLAG_IMPLIED else self.index, self.data, **kw)

    def _implied_left_out(self, flags: int) -> dict[str, Any]:
        blobs = self.index.get("blobs")
        if type(blobs) is not list or not all(type(b) is dict for b in blobs):
            return self.index
        derived = [dict(b) for b in blobs]
        try:
            for b in derived:
                b.pop("offset", None)
                b.pop("length", None)
            fill_implied(derived, bool(flags & FLAG_PACKED))
        except Exception:  # a blob table a test broke: written as it is
            return self.index
        out = []
        for b, want in zip(blobs, derived, strict=True):
            out.append({k: v for k, v in b.items() if k not in ("offset", "length") or v != want[k] or type(v) is not int})
        return self.index | {"blobs": out}

    def blob(self, i: int) -> bytes:
        """Stored bytes of blob ``i``."""
        b = self.index["blobs"][i]
        return self.data[b["offset"] : b["offset"] + b["stored_length"]]

    def set_blobs(self, stored: list[bytes]) -> None:
        """Replace every blob's stored bytes, re-laying the data section by the alignment rule."""
        packed = [b["codec"]["id"] == "raw" for b in self.index["blobs"]] if self.flags & FLAG_PACKED else None
        offsets = plan_offsets([len(s) for s in stored], packed)
        out = bytearray()
        for b, s, off in zip(self.index["blobs"], stored, offsets, strict=True):
            out += b"\0" * (off - len(out))
            out += s
            b["offset"] = off
            b["stored_length"] = len(s)
        self.data = bytes(out)

    def set_blob(self, i: int, stored: bytes, decoded: bytes | None = None) -> None:
        """Replace blob ``i``'s stored bytes (and, given ``decoded``, its length and CRC)."""
        blobs = [self.blob(k) for k in range(len(self.index["blobs"]))]
        blobs[i] = stored
        self.set_blobs(blobs)
        if decoded is not None:
            self.index["blobs"][i]["length"] = len(decoded)
            self.index["blobs"][i]["crc32c"] = crc32c(decoded)


def split(raw: bytes) -> Parts:
    """Take a well-formed file apart."""
    _, major, minor, flags, length, _, reserved = PREAMBLE.unpack_from(raw)
    index = json.loads(index_text(raw[PREAMBLE_SIZE : PREAMBLE_SIZE + length], bool(flags & FLAG_INDEX_ZSTD)))
    if flags & FLAG_IMPLIED:  # offsets and lengths written out again (still valid under the flag), so tests can edit them
        fill_implied(index["blobs"], bool(flags & FLAG_PACKED))
    start = data_start(length, flags)
    return Parts(index=index, data=raw[start:], major=major, minor=minor, flags=flags, reserved=reserved)


def zstd_frame(data: bytes, *, content_size: bool = True, level: int = 3, checksum: bool = False) -> bytes:
    """One real zstd frame of ``data``."""
    return zstandard.ZstdCompressor(level=level, write_content_size=content_size, write_checksum=checksum).compress(data)


def lying_frame(claimed: int, *, block: bytes = b"\x00", block_len: int = 1) -> bytes:
    """A tiny frame whose header claims ``claimed`` content bytes, followed by one RLE block.

    Frame header descriptor 0xE0: 8-byte Frame_Content_Size, single segment (window = content
    size, so nothing else in the header bounds it), no checksum, no dictionary.
    """
    header = ZSTD_MAGIC + bytes([0xE0]) + struct.pack("<Q", claimed)
    rle_last = (block_len << 3) | (1 << 1) | 1  # Block_Size, Block_Type=RLE, Last_Block
    return header + rle_last.to_bytes(3, "little") + block


def byteplanes(decoded: bytes, itemsize: int, *, frames: list[bytes] | None = None) -> bytes:
    """byteplanes stored bytes built by hand from spec §5.2 (or from given ``frames``)."""
    if frames is None:
        planes = [decoded[j::itemsize] for j in range(itemsize)]
        frames = [zstd_frame(p) for p in planes]
    return struct.pack(f"<{len(frames)}Q", *(len(f) for f in frames)) + b"".join(frames)


# --- adapters ------------------------------------------------------------------------------------


def lora_module(
    name: str,
    rank: int = 2,
    out_f: int = 4,
    in_f: int = 6,
    dtype: Any = np.float32,
    seed: int = 0,
    **params: Any,
) -> Module:
    """A linear lora module with random factors."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rank, in_f)).astype(dtype)
    b = rng.standard_normal((out_f, rank)).astype(dtype)
    return Module(name, "lora", (out_f, in_f), {"rank": rank, "alpha": 2.0 * rank, **params}, {"A": a, "B": b})


def small_adapter(name: str = "default", dtype: Any = np.float32) -> Adapter:
    """Two lora modules and one pass-through tensor: blobs 0–3 are A,B,A,B; blob 4 the tensor."""
    mods = {
        m.name: m
        for m in (lora_module("layers.0.q_proj", dtype=dtype, seed=1), lora_module("layers.0.v_proj", dtype=dtype, seed=2))
    }
    head = np.arange(12, dtype=np.float32).reshape(3, 4)
    return Adapter(name=name, base_model="tiny/base", modules=mods, tensors={"lm_head.weight": head})


def compressible_adapter(name: str = "default", dtype: Any = np.float32) -> Adapter:
    """Like :func:`small_adapter` with [8, 64]/[64, 8] factors of few distinct values, so zstd and byteplanes pay."""
    rng = np.random.default_rng(7)
    mods = {}
    for k, mname in enumerate(("layers.0.q_proj", "layers.0.v_proj")):
        a = (rng.integers(-2, 3, (8, 64)) * 0.5).astype(dtype)
        b = (rng.integers(-2, 3, (64, 8)) * 0.25).astype(dtype)
        mods[mname] = Module(mname, "lora", (64, 64), {"rank": 8, "alpha": 16.0 + k}, {"A": a, "B": b})
    head = np.repeat(np.arange(16, dtype=np.float32), 64).reshape(16, 64)
    return Adapter(name=name, base_model="tiny/base", modules=mods, tensors={"lm_head.weight": head})


def write(path: Path, raw: bytes) -> Path:
    """Write ``raw`` to ``path`` and return it."""
    path.write_bytes(raw)
    return path


def valid_parts(tmp_path: Path, codec: str = "raw", adapter: Adapter | None = None) -> Parts:
    """A valid file written by adapterpack, taken apart."""
    path = tmp_path / f"valid-{codec}.apack"
    write_apack(path, adapter or small_adapter(), codec=codec)
    return split(path.read_bytes())


# Open + build + decode everything, as a user of the file would: shared with the fuzz target.
load_everything = fuzz_open.load_everything


def nola_module(name: str, out: int, inp: int, r: int = 1, k_a: int = 4, k_b: int = 4) -> Module:
    """A ``nola`` record of rank ``r`` on an ``[out, in]`` weight with zero coefficients (k_A, k_B of them)."""
    p = {
        "generator": "philox4x32-10",
        "generator_version": 1,
        "seed": 7,
        "stream": 0,
        "rank": r,
        "k_A": k_a,
        "k_B": k_b,
        "scale": 1.0,
    }
    return Module(name, "nola", (out, inp), p, {"alpha": np.zeros(k_a, np.float32), "beta": np.zeros(k_b, np.float32)})


def edited(tmp: Path, module: Module, base_shape: list[int], **params: Any) -> Path:
    """``module`` written alone (zstd), then its base_shape and params edited in the index, as a hostile writer can."""
    src = tmp / "src.apack"
    write_apack(src, Adapter(modules={module.name: module}), codec="zstd")
    parts = split(src.read_bytes())
    record = parts.index["adapters"][0]["modules"][0]
    record["base_shape"] = base_shape
    record["params"].update(params)
    return write(tmp / "bomb.apack", parts.build(minor=parts.minor))


def lora_gguf(path: Path, tensors: dict[str, Any], *, arch: str = "llama", alpha: float = 4.0,
              extra: Any = None) -> Path:
    """A LoRA GGUF as llama.cpp's converter writes one (``general.type`` adapter, ``adapter.type`` lora, the alpha):
    ``tensors`` by GGUF name, each an array or ``(raw bytes, GGMLQuantizationType)``; ``extra(writer)`` adds more keys."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    if extra is not None:
        extra(w)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def lora_layers(layers: int = 6, *, seed: int = 0, name: str = "m{k}") -> Adapter:
    """``layers`` float32 lora records of [96, 128] at rank 8 with random factors, named ``name.format(k=k)``: enough
    blobs for the threaded CRC spans of the load tests."""
    rng = np.random.default_rng(seed)
    mods = {}
    for k in range(layers):
        n = name.format(k=k)
        a, b = rng.standard_normal((8, 128)).astype(np.float32), rng.standard_normal((96, 8)).astype(np.float32)
        mods[n] = Module(n, "lora", (96, 128), {"rank": 8, "alpha": 8.0}, {"A": a, "B": b})
    return Adapter(modules=mods)
