"""Golden vectors of the ``svd`` encoding (spec/svd.md): layouts, dtypes, rank 0, prefix checkpoints, refusals."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from adapterpack.adapter import Adapter, Module
from adapterpack.container.index import fill_implied, index_text
from adapterpack.container.preamble import FLAG_INDEX_ZSTD, FLAG_PACKED, PREAMBLE_SIZE, data_start
from adapterpack.container.prefix import KEY

ENCODING = "svd"
BF16 = np.dtype(ml_dtypes.bfloat16)


def _svd(name: str, rng: np.random.Generator, out: int, n: int, k: int, dtype: Any, base: tuple[int, ...], **params: Any) -> Module:
    """Orthonormal Ut, Vt from a QR of random draws; S = 2, 1, 1/2, ... (exact in every dtype)."""
    ut = np.linalg.qr(rng.standard_normal((out, k)))[0].T
    vt = np.linalg.qr(rng.standard_normal((n, k)))[0].T
    s = 2.0 ** -np.arange(-1, k - 1, dtype=np.float64)
    tensors = {"S": s.astype(np.float32), "Ut": ut.astype(dtype), "Vt": vt.astype(dtype)}
    return Module(name, "svd", base, {"rank": k, **params}, tensors)


def adapter(seed: int = 11) -> Adapter:
    """q (fp32), k (bf16), an embedding, a GPT-2 style fan_in_fan_out, a conv, and a rank-0 module."""
    rng = np.random.default_rng(seed)
    mods = [
        _svd("model.layers.0.self_attn.q_proj", rng, 64, 96, 4, np.float32, (64, 96)),
        _svd("model.layers.0.self_attn.k_proj", rng, 32, 96, 3, BF16, (32, 96)),
        _svd("model.embed_tokens", rng, 16, 50, 2, np.float32, (50, 16), layout="embedding"),
        _svd("transformer.h.0.attn.c_attn", rng, 24, 8, 2, np.float16, (8, 24), fan_in_fan_out=True),
        _svd("unet.conv_in", rng, 8, 4 * 3 * 3, 2, np.float32, (8, 4, 3, 3), layout="conv"),
        _svd("model.layers.0.self_attn.v_proj", rng, 32, 96, 0, np.float32, (32, 96)),
    ]
    return Adapter(
        name="default", base_model="test/tiny-base", base_architecture="LlamaForCausalLM", modules={m.name: m for m in mods}
    )


def _rank_too_large(index: dict[str, Any]) -> None:
    index["adapters"][0]["modules"][0]["params"]["rank"] = 5


def _q_blob(index: dict[str, Any], slot: str) -> dict[str, Any]:
    """The BLOB object of q_proj's ``slot`` (the first module: rank 4, float32, 64 and 96 columns)."""
    return index["blobs"][index["adapters"][0]["modules"][0]["tensors"][slot]]


def _flip_in_first_row(path: Path) -> None:
    """Flip one bit of q_proj's Vt inside its first row: the bytes a rank-1 read returns."""
    raw = bytearray(path.read_bytes())
    flags, length = struct.unpack_from("<IQ", raw, 12)
    index = json.loads(index_text(bytes(raw[PREAMBLE_SIZE : PREAMBLE_SIZE + length]), bool(flags & FLAG_INDEX_ZSTD)))
    fill_implied(index["blobs"], bool(flags & FLAG_PACKED))
    vt = _q_blob(index, "Vt")
    assert vt["codec"]["id"] == "raw" and len(vt[KEY]) == 2, vt  # checkpoints at rows 1 and 2 of 4
    raw[data_start(length, flags) + vt["offset"] + 41] ^= 0x10
    path.write_bytes(bytes(raw))


def _checkpoints_miscounted(index: dict[str, Any]) -> None:
    _q_blob(index, "Ut")[KEY].append(0)  # 4 rows have 2 checkpoints (rows 1 and 2), not 3


def build(readable: Callable[..., Any], refused: Callable[..., Any]) -> None:
    """svd_raw / svd_byteplanes (every layout, fp32/bf16/fp16, rank 0; raw Ut and Vt with prefix checkpoints)
    and the refusals: S increasing, rank mismatch, a damaged rank-1 prefix, a miscounted ``prefix_crc32c``."""
    for codec in ("raw", "byteplanes"):
        readable(
            f"svd_{codec}",
            f"svd records: linear, embedding, fan_in_fan_out, conv, rank 0; fp32/bf16/fp16; codec {codec}; "
            "raw Ut and Vt blobs with prefix_crc32c",
            [adapter()],
            codec,
        )
    from tools.make_vectors import _craft

    increasing = adapter()
    q = increasing.modules["model.layers.0.self_attn.q_proj"]
    q.tensors["S"] = q.tensors["S"][::-1].copy()
    refused(
        "svd_s_increasing",
        "an svd record whose singular values increase (readers must refuse S when they read it)",
        [increasing],
        "RecordError",
        lambda p: None,
    )
    refused(
        "svd_rank_mismatch",
        "an svd record whose rank (5) is not its tensors' first dimension (4)",
        [adapter()],
        "RankError",
        lambda p: _craft(p, _rank_too_large, minor=2),
    )
    refused(
        "svd_prefix_bit_flip",
        "one bit flipped in the first row of a raw Vt (4 rows, prefix_crc32c): refused when opened at rank 1, "
        "by its first checkpoint, as by a whole read",
        [adapter()],
        "ChecksumError",
        _flip_in_first_row,
        rank=1,
    )
    refused(
        "svd_prefix_crc_count",
        "a raw Ut of 4 rows whose prefix_crc32c holds 3 CRCs instead of 2",
        [adapter()],
        "IndexFormatError",
        lambda p: _craft(p, _checkpoints_miscounted, minor=2),
    )
