"""Golden vectors of the ``qsvd`` encoding (spec/qsvd.md): every width, layouts, short last groups, rank 0, refusals."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from adapterpack.adapter import Adapter, Module
from adapterpack.container.preamble import data_start
from adapterpack.container.prefix import KEY
from adapterpack.encodings.qsvd import encode_qsvd

ENCODING = "qsvd"


def _qsvd(
    name: str, rng: np.random.Generator, out: int, n: int, bits: list[int], g: int, base: tuple[int, ...], **params: Any
) -> Module:
    """Orthonormal vectors from a QR of random draws, S = 2, 1, 1/2, ..., encoded by the library's writer."""
    k = max(len(bits), 1)
    u = np.linalg.qr(rng.standard_normal((out, k)))[0]
    vt = np.linalg.qr(rng.standard_normal((n, k)))[0].T
    s = 2.0 ** -np.arange(-1, k - 1, dtype=np.float64)
    template = Module(name, ENCODING, base, params, {})
    return encode_qsvd(u, s, vt, bits, g, template=template)


def adapter(seed: int = 14) -> Adapter:
    """Every width 1–8 and float (q_proj), groups with a short last group, embedding, fan_in_fan_out, conv, rank 0."""
    rng = np.random.default_rng(seed)
    mods = [
        _qsvd("model.layers.0.self_attn.q_proj", rng, 64, 96, [16, 8, 7, 6, 5, 4, 3, 2, 1], 16, (64, 96)),
        _qsvd("model.layers.0.self_attn.k_proj", rng, 33, 50, [3, 1, 16], 7, (33, 50)),
        _qsvd("model.embed_tokens", rng, 16, 50, [4, 2], 64, (50, 16), layout="embedding"),
        _qsvd("transformer.h.0.attn.c_attn", rng, 24, 8, [6, 1], 5, (8, 24), fan_in_fan_out=True),
        _qsvd("unet.conv_in", rng, 8, 4 * 3 * 3, [8, 3], 10, (8, 4, 3, 3), layout="conv"),
        _qsvd("model.layers.0.self_attn.v_proj", rng, 32, 96, [], 64, (32, 96)),
    ]
    return Adapter(
        name="default", base_model="test/tiny-base", base_architecture="LlamaForCausalLM", modules={m.name: m for m in mods}
    )


def _module(index: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return index["adapters"][0]["modules"][i]


def _set_param(key: str, value: Any, i: int = 0) -> Callable[[dict[str, Any]], None]:
    def edit(index: dict[str, Any]) -> None:
        _module(index, i)["params"][key] = value

    return edit


def _huge(index: dict[str, Any]) -> None:
    _module(index, 1)["base_shape"] = [1 << 40, 1 << 40]


def _flip_in_first_component(path: Path) -> None:
    """Flip one bit of q_proj's data inside its first component (float, 324 bytes): the bytes a rank-1 read returns."""
    from tools.make_vectors import _read_index

    raw = bytearray(path.read_bytes())
    index, flags, length = _read_index(bytes(raw))
    blob = index["blobs"][_module(index)["tensors"]["data"]]
    assert blob["codec"]["id"] == "raw" and KEY in blob, blob
    raw[data_start(length, flags) + blob["offset"] + 101] ^= 0x04
    path.write_bytes(bytes(raw))


def _with_bytes(offset: int, value: bytes) -> Adapter:
    """The adapter with k_proj's data bytes at ``offset`` replaced by ``value`` (a valid record on open)."""
    a = adapter()
    m = a.modules["model.layers.0.self_attn.k_proj"]
    data = m.tensors["data"].copy()
    data[offset : offset + len(value)] = np.frombuffer(value, dtype=np.uint8)
    m.tensors["data"] = data
    return a


def build(readable: Callable[..., Any], refused: Callable[..., Any]) -> None:
    """qsvd_raw (every width, layouts, short last groups, rank 0; a raw data blob with prefix checkpoints)
    and the refusals: bad width, bits miscounted, group size 0, data not matching the params, a huge shape,
    negative S, a non-finite scale, a damaged rank-1 prefix."""
    from tools.make_vectors import _craft

    readable(
        "qsvd_raw",
        "qsvd records: widths 1-8 and float (16), group sizes 5/7/10/16/64 with short last groups, linear, embedding, "
        "fan_in_fan_out, conv, rank 0; raw data blobs with prefix_crc32c",
        [adapter()],
        "raw",
    )
    refused(
        "qsvd_bits_invalid",
        "a qsvd record with a component width of 0 (widths are 1-8 or 16)",
        [adapter()],
        "RecordError",
        lambda p: _craft(p, _set_param("bits", [16, 8, 7, 6, 5, 4, 3, 2, 0]), minor=4),
    )
    refused(
        "qsvd_bits_count",
        "a qsvd record of rank 9 whose bits list holds 8 widths",
        [adapter()],
        "RecordError",
        lambda p: _craft(p, _set_param("bits", [16, 8, 7, 6, 5, 4, 3, 2]), minor=4),
    )
    refused(
        "qsvd_group_size_zero",
        "a qsvd record with group_size 0",
        [adapter()],
        "RecordError",
        lambda p: _craft(p, _set_param("group_size", 0), minor=4),
    )
    refused(
        "qsvd_codes_short",
        "a qsvd record whose widths need more bytes than its data blob holds (the last width raised 1 -> 2)",
        [adapter()],
        "RecordError",
        lambda p: _craft(p, _set_param("bits", [16, 8, 7, 6, 5, 4, 3, 2, 2]), minor=4),
    )
    refused(
        "qsvd_huge_shape",
        "a qsvd record claiming a 2^40 x 2^40 ΔW (its factors would exceed the factor element limit)",
        [adapter()],
        "RankError",
        lambda p: _craft(p, _huge, minor=4),
    )
    refused(
        "qsvd_s_negative",
        "a qsvd record with a negative singular value (readers must refuse S when they read it)",
        [_with_bytes(0, np.array([-0.5], "<f4").tobytes())],  # component 0's singular value
        "RecordError",
        lambda p: None,
    )
    refused(
        "qsvd_scale_not_finite",
        "a qsvd record with an infinite scale (readers must refuse scales when they read them)",
        [_with_bytes(4, np.array([np.inf], "<f2").tobytes())],  # component 0's first scale
        "RecordError",
        lambda p: None,
    )
    refused(
        "qsvd_prefix_bit_flip",
        "one bit flipped in the first component of a raw data blob (prefix_crc32c): refused when opened at rank 1, "
        "by its first checkpoints, as by a whole read",
        [adapter()],
        "ChecksumError",
        _flip_in_first_component,
        rank=1,
    )
