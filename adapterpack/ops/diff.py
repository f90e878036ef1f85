"""Compare two adapters module by module: relative ΔW error, cosine and norms, without forming ΔW.

For each module both adapters hold, ΔW = L·R in the base weight's layout (L = s·B, R = A; a transposed
record gives L = Aᵀ, R = s·Bᵀ), so ``ΔW_a − ΔW_b = [L_a, −L_b]·[R_a; R_b]``. A QR of the stacked left
factor (out × 2r) gives ``‖ΔW_a − ΔW_b‖_F = ‖R_Q·[R_a; R_b]‖_F`` from a 2r × in product, in float64:
small differences come out accurate (no cancellation of ‖a‖² + ‖b‖² − 2⟨a, b⟩), and nothing out × in is
formed. The cosine is ⟨ΔW_a, ΔW_b⟩ / (‖ΔW_a‖·‖ΔW_b‖) with the inner product from the same three norms.

A is the reference: ``rel_error = ‖ΔW_a − ΔW_b‖ / ‖ΔW_a‖``. A module in only one of them counts with
ΔW = 0 on the other side. DoRA records compare their direction updates only (the magnitudes need the
base weight), which a note says.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adapterpack import progress
from adapterpack.adapter import Adapter, Module
from adapterpack.errors import ConversionError
from adapterpack.linalg.finite import check_product
from adapterpack.names import natural_key
from adapterpack.ops.files import open as open_adapter


def base_factors(m: Module, where: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(L, R) in float64 with ΔW = L·R as the 2-D base-layout matrix (base_shape[0] × the rest). Factors
    holding NaN/inf, or whose product overflows, are refused naming ``where`` (default: the module)."""
    f = m.factors()
    a, b = f.matrices()
    check_product(a, b, f.scale, where=where or f"module {m.name!r}")
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if f.transpose:
        return a64.T, b64.T * f.scale
    return b64 * f.scale, a64


def _norm(left: np.ndarray, right: np.ndarray) -> float:
    """‖left·right‖_F through a QR of ``left`` (no out × in product)."""
    if left.shape[1] == 0:
        return 0.0
    if left.shape[1] > left.shape[0]:
        return float(np.linalg.norm(left @ right))  # fewer rows than the rank: the product is the small side
    r = np.linalg.qr(left, mode="r")
    return float(np.linalg.norm(r @ right))


@dataclass
class ModuleDiff:
    """One module's comparison (``only_in`` names the side that has it when the other does not)."""

    name: str
    norm_a: float
    norm_b: float
    diff: float
    only_in: str | None = None
    shape_a: list[int] = field(default_factory=list)
    shape_b: list[int] = field(default_factory=list)

    @property
    def rel_error(self) -> float | None:
        return self.diff / self.norm_a if self.norm_a > 0 else (0.0 if self.diff == 0 else None)

    @property
    def inner(self) -> float:
        return (self.norm_a**2 + self.norm_b**2 - self.diff**2) / 2

    @property
    def cosine(self) -> float | None:
        if self.norm_a == 0 or self.norm_b == 0:
            return None
        if self.diff == 0:
            return 1.0
        return max(-1.0, min(1.0, self.inner / (self.norm_a * self.norm_b)))

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "rel_error": self.rel_error,
            "cosine": self.cosine,
            "norm_a": self.norm_a,
            "norm_b": self.norm_b,
            "norm_diff": self.diff,
        }
        if self.only_in:
            d["only_in"] = self.only_in
        return d


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A base shape without trailing 1s: a 1×1 conv [out, in, 1, 1] is the linear [out, in] it acts as, while
    [out, c, kh, kw] and [out, c·kh·kw] are different weights whose ΔW merely has the same size."""
    s = tuple(int(x) for x in shape)
    while len(s) > 2 and s[-1] == 1:
        s = s[:-1]
    return s


def module_diff(name: str, a: Module | None, b: Module | None) -> ModuleDiff:
    """Norms and difference of one module's ΔW in two adapters (None: the adapter does not have it)."""
    if a is None or b is None:
        m = a if a is not None else b
        assert m is not None
        n = _norm(*base_factors(m, f"module {name!r} of the {'first' if a is not None else 'second'} input"))
        return ModuleDiff(name, n if a else 0.0, n if b else 0.0, n, only_in="a" if a is not None else "b")
    la, ra = base_factors(a, f"module {name!r} of the first input")
    lb, rb = base_factors(b, f"module {name!r} of the second input")
    if la.shape[0] != lb.shape[0] or ra.shape[1] != rb.shape[1] or _squeezed(a.base_shape) != _squeezed(b.base_shape):
        raise ConversionError(f"module {name!r}: ΔW is {list(a.base_shape)} in one adapter and {list(b.base_shape)} in the other")
    na = _norm(la, ra)
    if np.array_equal(la, lb) and np.array_equal(ra, rb):  # the same factors: exactly no difference
        return ModuleDiff(name, na, na, 0.0)
    diff = _norm(np.concatenate([la, -lb], axis=1), np.concatenate([ra, rb], axis=0))
    return ModuleDiff(name, na, _norm(lb, rb), diff)


@dataclass
class DiffReport:
    """Per-module comparison of two adapters and the whole-adapter figures."""

    a: str
    b: str
    modules: list[ModuleDiff]
    notes: list[str]
    model: dict[str, Any] | None = None

    def total(self) -> dict[str, Any]:
        """Whole-adapter figures: the norms of all modules' ΔW taken together."""
        na = math.sqrt(sum(m.norm_a**2 for m in self.modules))
        nb = math.sqrt(sum(m.norm_b**2 for m in self.modules))
        nd = math.sqrt(sum(m.diff**2 for m in self.modules))
        inner = sum(m.inner for m in self.modules)
        return {
            "module_count": len(self.modules),
            "rel_error": nd / na if na > 0 else (0.0 if nd == 0 else None),
            "cosine": max(-1.0, min(1.0, inner / (na * nb))) if na > 0 and nb > 0 else None,
            "norm_a": na,
            "norm_b": nb,
            "norm_diff": nd,
            "only_in_a": sum(m.only_in == "a" for m in self.modules),
            "only_in_b": sum(m.only_in == "b" for m in self.modules),
        }

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = {"a": self.a, "b": self.b, "modules": [m.as_dict() for m in self.modules], "total": self.total(), "notes": self.notes}
        if self.model is not None:
            d["model"] = self.model
        return d


def diff_adapters(a: Adapter, b: Adapter, *, a_name: str = "a", b_name: str = "b") -> DiffReport:
    """Compare every module of ``a`` and ``b`` (their union, in natural order)."""
    names = sorted(set(a.modules) | set(b.modules), key=natural_key)
    out = []
    with progress.task("comparing", total=len(names), unit="modules") as bar:
        for n in names:
            out.append(module_diff(n, a.modules.get(n), b.modules.get(n)))
            bar.advance()
    notes = []
    dora = [n for n in names if any(m is not None and m.params.get("dora") for m in (a.modules.get(n), b.modules.get(n)))]
    if dora:
        notes.append(f"{len(dora)} DoRA module(s): their direction updates are compared; magnitudes need the base weight")
    only_a, only_b = [m.name for m in out if m.only_in == "a"], [m.name for m in out if m.only_in == "b"]
    if only_a:
        notes.append(f"{len(only_a)} module(s) only in A (compared with ΔW = 0): {', '.join(only_a[:3])}")
    if only_b:
        notes.append(f"{len(only_b)} module(s) only in B (compared with ΔW = 0): {', '.join(only_b[:3])}")
    return DiffReport(a_name, b_name, out, notes)


def diff_paths(
    a: str | os.PathLike[str], b: str | os.PathLike[str], *, adapter_a: str | None = None, adapter_b: str | None = None
) -> DiffReport:
    """:func:`diff_adapters` of two files or folders any reader opens."""
    with open_adapter(a, adapter=adapter_a) as ad_a, open_adapter(b, adapter=adapter_b) as ad_b:
        return diff_adapters(ad_a, ad_b, a_name=str(a), b_name=str(b))


__all__ = ["DiffReport", "ModuleDiff", "base_factors", "diff_adapters", "diff_paths", "module_diff"]
