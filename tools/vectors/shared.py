"""Golden vectors of the ``shared`` encoding (spec/shared.md): banks whose records share U and V blobs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from adapterpack.adapter import Adapter, Module
from adapterpack.bank.store import Bank, BankMember, BankModule, write_bank

ENCODING = "shared"


def _grid(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """k/16 for |k| < 32: exact in every float dtype."""
    return (rng.integers(-32, 32, shape) / 16).astype(dtype)


def full_bank(seed: int = 21) -> Bank:
    """Two adapters, full form: q (fp32, R=3) and v (fp16, R=2, the second adapter lacks it); U and V large enough
    (and of few distinct values) that byteplanes makes them smaller, so the byteplanes vector really holds byteplanes.
    The first adapter carries a pass-through tensor (a PEFT ``modules_to_save`` weight, spec/shared.md §2), the second none."""
    rng = np.random.default_rng(seed)
    q = BankModule("model.layers.0.self_attn.q_proj", _grid(rng, (64, 3), np.float32), _grid(rng, (96, 3), np.float32), "full")
    v = BankModule("model.layers.0.self_attn.v_proj", _grid(rng, (64, 2), np.float16), _grid(rng, (96, 2), np.float16), "full")
    en = BankMember(
        "en",
        {q.name: _grid(rng, (3, 3), np.float32), v.name: _grid(rng, (2, 2), np.float16)},
        "test/tiny-base",
        "LlamaForCausalLM",
        metadata={"bank.rel_error": '{"mean": 0.0, "max": 0.0}'},
    )
    de = BankMember("de", {q.name: _grid(rng, (3, 3), np.float32)}, "test/tiny-base", "LlamaForCausalLM")
    en.tensors["model.norm.weight"] = _grid(rng, (8,), np.float32)
    return Bank({q.name: q, v.name: v}, [en, de])


def diagonal_bank(seed: int = 22) -> Bank:
    """Three adapters, diagonal form, a GPT-2 style fan_in_fan_out module (base [in, out])."""
    rng = np.random.default_rng(seed)
    c = BankModule(
        "transformer.h.0.attn.c_attn",
        _grid(rng, (10, 4), np.float32),
        _grid(rng, (6, 4), np.float32),
        "diagonal",
        fan_in_fan_out=True,
    )
    members = [BankMember(f"task{i}", {c.name: _grid(rng, (4,), np.float32)}, "test/gpt2-tiny") for i in range(3)]
    return Bank({c.name: c}, members)


def adapters(bank: Bank) -> list[Adapter]:
    """The bank as :class:`Adapter` objects (what a reader must decode), records sharing the arrays."""
    out = []
    for mem in bank.members:
        mods = {}
        for name, S in mem.S.items():
            b = bank.modules[name]
            params: dict[str, Any] = {"rank": b.rank, "form": b.form}
            if b.fan_in_fan_out:
                params["fan_in_fan_out"] = True
            mods[name] = Module(name, "shared", b.base_shape, params, {"U": b.U, "V": b.V, "S": S})
        out.append(Adapter(mem.name, mem.base_model, mem.base_architecture, mods, dict(mem.tensors), metadata=dict(mem.metadata)))
    return out


def _as_bank(bank: Bank, codec: str) -> Callable[[Path], None]:
    def craft(path: Path) -> None:
        from tools.make_vectors import LEVELS

        write_bank(path, bank, codec=codec, level=LEVELS[codec])

    return craft


def _s_too_small(index: dict[str, Any]) -> None:
    index["adapters"][0]["modules"][0]["params"]["rank"] = 4  # U, V have 3 columns, S is 3x3


def build(readable: Callable[..., Any], refused: Callable[..., Any]) -> None:
    """shared_full_raw / shared_full_byteplanes, shared_diagonal_raw, shared_rank_mismatch (refused)."""
    from tools.make_vectors import _codec_check, _craft

    for codec in ("raw", "byteplanes"):
        bank = full_bank()
        path = readable(
            f"shared_full_{codec}",
            "a full-form bank of two adapters sharing U and V blobs (fp32 and fp16 modules; the second adapter lacks "
            "one module; the first carries a pass-through tensor, the second none); "
            f"codec {codec} (for U and V: S is too small to compress)",
            adapters(bank),
            codec,
            craft=_as_bank(bank, codec),
        )
        _codec_check(path, codec, ["U", "V"])
    bank = diagonal_bank()
    readable(
        "shared_diagonal_raw",
        "a diagonal-form bank of three adapters on a fan_in_fan_out module; codec raw",
        adapters(bank),
        "raw",
        craft=_as_bank(bank, "raw"),
    )
    bank = full_bank()

    def mismatch(path: Path) -> None:
        _as_bank(bank, "raw")(path)
        _craft(path, _s_too_small, minor=1)

    refused(
        "shared_rank_mismatch", "a shared record whose rank (4) does not fit U, V and S (3)", adapters(bank), "RankError", mismatch
    )
