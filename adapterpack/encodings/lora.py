"""``lora``: the factors A, B, alpha and scaling rule, stored bit-exact (spec §6.1)."""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import tensor_info
from adapterpack.encodings.base import LAYOUTS, Encoding, check_slots, register_encoding, validate_unread
from adapterpack.errors import RankError, RecordError
from adapterpack.factors import Factors

if TYPE_CHECKING:
    from adapterpack.adapter import Module

FLOATS = dtypes.FLOATS


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's scaling: alpha/r, or alpha/sqrt(r) for rsLoRA (binary64)."""
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def _bool(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, (bool, np.bool_)):
        raise RecordError(f"{where}: param {key!r} must be true or false, got {value!r:.200}")
    return bool(value)


def _finite_number(value: Any) -> bool:
    """A real number (Python or numpy; not a bool) that a binary64 holds finitely."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond binary64's range
        return False


@register_encoding
class Lora(Encoding):
    """ΔW = s·B·A with PEFT's conventions (rsLoRA, embeddings, fan_in_fan_out, conv, DoRA)."""

    encoding_id = "lora"
    slots: ClassVar[dict[str, bool]] = {"A": True, "B": True, "magnitude": False}

    def validate(self, module: Module) -> None:
        where = f"module {module.name!r}"
        p = module.params
        check_slots(module, self.slots, "lora needs tensors A and B (optional magnitude)")
        rank = p.get("rank")  # numpy integers too: an in-memory record may hold them, and the index writes them as ints
        if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
            raise RankError(f"{where}: rank must be an integer >= 1, got {rank!r:.200}")
        alpha = p.get("alpha")
        if not _finite_number(alpha):
            raise RecordError(f"{where}: alpha must be a finite number, got {alpha!r:.200}")
        layout = p.get("layout", "linear")  # fan_in_fan_out with another layout: refused per layout below
        if not isinstance(layout, str) or layout not in LAYOUTS:
            raise RecordError(f"{where}: layout must be one of {LAYOUTS}, got {layout!r:.200}")
        fifo = _bool(p, "fan_in_fan_out", where)
        _bool(p, "rslora", where)
        dora = _bool(p, "dora", where)
        (adt, ash), (bdt, bsh) = tensor_info(module.tensors["A"]), tensor_info(module.tensors["B"])
        if adt not in FLOATS or adt != bdt:
            raise RecordError(f"{where}: A and B must share one float dtype, got {adt} and {bdt}")
        if len(ash) < 2 or len(bsh) < 2:
            raise RecordError(f"{where}: A and B must have at least 2 dimensions, got {list(ash)} and {list(bsh)}")
        if ash[0] != rank or bsh[1] != rank:
            raise RankError(
                f"{where}: rank {rank} does not fit A {list(ash)} and B {list(bsh)} "
                "(A's rows and B's columns must equal the rank)"
            )
        out = bsh[0]
        base = tuple(module.base_shape)
        if layout == "linear":
            if len(ash) != 2 or len(bsh) != 2:
                raise RecordError(f"{where}: linear lora needs 2-D A and B")
            expect = (ash[1], out) if fifo else (out, ash[1])
        elif layout == "embedding":
            if len(ash) != 2 or len(bsh) != 2 or fifo:
                raise RecordError(f"{where}: embedding lora needs 2-D A and B and no fan_in_fan_out")
            expect = (ash[1], out)
        else:
            if any(d != 1 for d in bsh[2:]) or len(bsh) != len(ash) or fifo:
                raise RecordError(f"{where}: conv lora needs B [out, r, 1, ...] matching A's dimensions")
            expect = (out, *ash[1:])
        if base != expect:
            raise RecordError(f"{where}: base_shape {list(base)} disagrees with A {list(ash)}, B {list(bsh)} ({layout})")
        has_mag = "magnitude" in module.tensors
        if dora != has_mag:
            raise RecordError(f"{where}: dora is {dora} but the magnitude tensor is {'present' if has_mag else 'absent'}")
        if has_mag:
            mdt, msh = tensor_info(module.tensors["magnitude"])
            if mdt not in FLOATS or msh != (out,):
                raise RecordError(f"{where}: magnitude must be a float vector of B's {out} rows, got {mdt} {list(msh)}")

    def scale(self, module: Module) -> float:
        """The module's effective LoRA scale s."""
        p = module.params
        return lora_scale(p["alpha"], p["rank"], p.get("rslora", False))

    def to_factors(self, module: Module) -> Factors:
        """A and B as 2-D matrices with the scale and layout (reads the tensors)."""
        validate_unread(self, module)
        a = module.array("A")
        b = module.array("B")
        p = module.params
        layout = p.get("layout", "linear")
        transpose = layout == "embedding" or bool(p.get("fan_in_fan_out", False))
        return Factors(
            A=a.reshape(a.shape[0], -1),
            B=b.reshape(b.shape[0], b.shape[1]),  # [out, r, 1, ...]: -1 is ambiguous when out == 0
            scale=self.scale(module),
            base_shape=tuple(module.base_shape),
            transpose=transpose,
            layout=layout,
        )

    def summary(self, module: Module) -> dict[str, Any]:
        p = module.params
        return {
            "rank": p["rank"],
            "alpha": p["alpha"],
            "scale": self.scale(module),
            "rslora": bool(p.get("rslora", False)),
            "layout": p.get("layout", "linear"),
            "dora": bool(p.get("dora", False)),
        }
