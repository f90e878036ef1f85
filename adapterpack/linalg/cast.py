"""Casting an adapter's tensors to another dtype, and the exact ΔW error that costs, from the factors.

The error of a cast (or of any change of factors) is ‖ΔW − ΔW'‖_F computed through k×k Gram matrices,
never forming the out×in ΔW; ``convert --dtype``, ``check`` and the exporters report it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import Adapter, Module, TensorLike, as_array
from adapterpack.errors import ConversionError
from adapterpack.factors import Factors
from adapterpack.linalg.finite import check_product

__all__ = ["CastReport", "ModuleCast", "cast_adapter", "delta_error"]


# --- ΔW error of a cast, from the factors --------------------------------------------------------


def _gram_sq_norm(q: np.ndarray, p: np.ndarray) -> float:
    """‖Q·P‖_F² as trace((P·Pᵀ)(Qᵀ·Q)): only k×k Gram matrices (k = Q's columns), in float64."""
    g_p = p @ p.T
    g_q = q.T @ q
    return max(float(np.sum(g_p * g_q)), 0.0)  # both symmetric: trace(X·Y) = Σ X⊙Y


def delta_error(before: Factors, after: Factors) -> tuple[float, float]:
    """(‖ΔW − ΔW'‖_F, ‖ΔW‖_F) for ΔW = s·B·A and ΔW' = s'·B'·A', exactly, without forming ΔW.

    ΔW − ΔW' = Q·P with Q = [s·B, s·B − s'·B'] and P = [A − A'; A'] (same ranks; the difference
    form avoids the cancellation of Q = [s·B, −s'·B'], P = [A; A']), or that plain form when the
    ranks differ. Transposes and conv reshapes of the base layout do not change Frobenius norms.
    """
    if tuple(before.base_shape) != tuple(after.base_shape):
        raise ConversionError(f"cannot compare ΔW of shapes {list(before.base_shape)} and {list(after.base_shape)}")
    a, b = before.A.astype(np.float64), before.B.astype(np.float64) * before.scale
    a2, b2 = after.A.astype(np.float64), after.B.astype(np.float64) * after.scale
    if a.shape == a2.shape and b.shape == b2.shape:
        q, p = np.concatenate([b, b - b2], axis=1), np.concatenate([a - a2, a2], axis=0)
    else:
        q, p = np.concatenate([b, -b2], axis=1), np.concatenate([a, a2], axis=0)
    return math.sqrt(_gram_sq_norm(q, p)), math.sqrt(_gram_sq_norm(b, a))


# --- casting ----------------------------------------------------------------------------------


@dataclass
class ModuleCast:
    """What casting one module cost."""

    module: str
    max_abs_error: float
    delta_error: float
    delta_norm: float

    @property
    def delta_rel_error(self) -> float:
        """‖ΔW − ΔW'‖_F / ‖ΔW‖_F (0 when both are zero, inf when only ΔW is)."""
        if self.delta_norm == 0:
            return 0.0 if self.delta_error == 0 else math.inf
        return self.delta_error / self.delta_norm


@dataclass
class CastReport:
    """What casting one adapter cost: worst value change and ΔW errors (whole adapter and per module)."""

    adapter: str
    dtype: str
    tensors_cast: int = 0
    max_abs_error: float = 0.0
    modules: list[ModuleCast] = field(default_factory=list)

    @property
    def delta_rel_error(self) -> float:
        """‖ΔW − ΔW'‖_F / ‖ΔW‖_F over all modules together (their ΔW stacked as one vector)."""
        err = math.sqrt(sum(m.delta_error**2 for m in self.modules))
        norm = math.sqrt(sum(m.delta_norm**2 for m in self.modules))
        if norm == 0:
            return 0.0 if err == 0 else math.inf
        return err / norm

    @property
    def worst_module(self) -> ModuleCast | None:
        """The module whose ΔW changed most, relatively."""
        return max(self.modules, key=lambda m: m.delta_rel_error, default=None)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        worst = self.worst_module
        return {
            "adapter": self.adapter,
            "dtype": self.dtype,
            "tensors_cast": self.tensors_cast,
            "max_abs_error": self.max_abs_error,
            "delta_rel_error": self.delta_rel_error,
            "worst_module": worst.module if worst else None,
            "worst_module_rel_error": worst.delta_rel_error if worst else None,
            "modules": [asdict(m) | {"delta_rel_error": m.delta_rel_error} for m in self.modules],
        }


def cast_adapter(adapter: Adapter, dtype: str) -> tuple[Adapter, CastReport]:
    """A copy of ``adapter`` with every float tensor cast to ``dtype`` (loaded into memory), and what that cost.

    Not bit-exact, and measured: factors holding NaN or inf, or a ΔW too large for binary64, are refused
    (:func:`~adapterpack.linalg.finite.check_product`)."""
    name = dtypes.by_name(dtype).name
    report = CastReport(adapter=adapter.name, dtype=name)

    def cast(t: TensorLike, where: str) -> tuple[np.ndarray, float]:
        arr = as_array(t)
        out, err = dtypes.cast_array(arr, name, where)
        report.tensors_cast += out.dtype != arr.dtype
        report.max_abs_error = max(report.max_abs_error, err)
        return out, err

    modules: dict[str, Module] = {}
    for m in adapter:
        cast_slots = {slot: cast(t, f"module {m.name!r} tensor {slot!r}") for slot, t in m.tensors.items()}
        new = Module(
            name=m.name,
            encoding=m.encoding,
            base_shape=tuple(m.base_shape),
            params=dict(m.params),
            tensors={slot: arr for slot, (arr, _) in cast_slots.items()},
            must_understand=m.must_understand,
        )
        new.implementation.validate(new)
        before = m.factors()  # measuring the ΔW error needs finite factors of a size binary64 holds
        check_product(before.A, before.B, before.scale, where=f"adapter {adapter.name!r} module {m.name!r}")
        err, norm = delta_error(before, new.factors())
        worst = max((e for _, e in cast_slots.values()), default=0.0)
        report.modules.append(ModuleCast(m.name, max_abs_error=worst, delta_error=err, delta_norm=norm))
        modules[m.name] = new
    tensors = {k: cast(t, f"tensor {k!r}")[0] for k, t in adapter.tensors.items()}
    return adapter.derived(modules, tensors), report
