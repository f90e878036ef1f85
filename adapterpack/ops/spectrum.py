"""Singular-value spectra of an adapter's ΔW, module by module: the data behind ``inspect --spectrum``.

Spectra come from the low-rank factors through the exact QR + r×r-core SVD
(:func:`adapterpack.linalg.lowrank.factors_svd`, float64, never forming the out×in ΔW); ``svd``
records already store their singular values, so S is read directly (their vectors are not read).
A DoRA record's spectrum is that of its direction update ``s·B·A`` (the magnitude rescaling needs
the base weight), and says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from adapterpack.adapter import Adapter, Module, tensor_info
from adapterpack.atomic import atomic_file
from adapterpack.encodings.svd import singular_values
from adapterpack.errors import ConversionError, MissingDependencyError
from adapterpack.linalg.finite import MAX_NORM
from adapterpack.linalg.lowrank import Spectrum, spectrum_of
from adapterpack.names import natural_key

#: Energy fractions whose ranks are reported (``r90``, ``r95``, ``r99``).
ENERGY_LEVELS = (0.90, 0.95, 0.99)


def _is_dora(module: Module) -> bool:
    return module.encoding == "lora" and bool(module.params.get("dora", False))


def module_spectrum(module: Module) -> Spectrum:
    """The exact SVD of ``module``'s 2-D ΔW (in the factors' [out, in] orientation).

    For ``svd`` records only S is read (the result holds values only) — use
    :func:`adapterpack.encodings.lower.at_rank` for their truncations.
    """
    if module.encoding == "svd":
        module.implementation.validate(module)
        s = singular_values(module)
        # the rule of every other analysis (linalg.finite): a ΔW whose energy binary64 cannot hold is refused
        with np.errstate(over="ignore"):
            norm = math.sqrt(float(s @ s))
        if norm > MAX_NORM:
            raise ConversionError(
                f"module {module.name!r}: ΔW is too large (‖ΔW‖_F = {norm:.6g} from its singular values exceeds {MAX_NORM:.6g}, "
                "the limit for binary64 fits)"
            )
        (_, ut), (_, vt) = tensor_info(module.tensors["Ut"]), tensor_info(module.tensors["Vt"])
        return Spectrum.values_only(s, (int(ut[1]), int(vt[1])))
    return spectrum_of(module.factors(), where=f"module {module.name!r}")


@dataclass(frozen=True)
class ModuleSpectrum:
    """What ``inspect --spectrum`` shows for one module."""

    module: str
    encoding: str
    rank: int
    shape: tuple[int, int]
    singular_values: np.ndarray  # float64, descending
    dora: bool = False

    @classmethod
    def of(cls, module: Module) -> ModuleSpectrum:
        """Compute it from ``module`` (see :func:`module_spectrum`)."""
        sp = module_spectrum(module)
        rank = module.summary().get("rank")
        return cls(
            module=module.name,
            encoding=module.encoding,
            rank=int(rank) if rank is not None else int(sp.S.size),
            shape=sp.shape,
            singular_values=np.asarray(sp.S, dtype=np.float64),
            dora=_is_dora(module),
        )

    @property
    def _sp(self) -> Spectrum:
        return Spectrum.values_only(self.singular_values, self.shape)

    @property
    def energy(self) -> float:
        """‖ΔW‖²_F = Σ σᵢ²."""
        return self._sp.energy

    @property
    def energy_curve(self) -> np.ndarray:
        """Fraction of ‖ΔW‖²_F kept by rank 1, 2, …, k (all zeros for a zero module)."""
        total = self.energy
        cum = np.cumsum(self.singular_values**2)
        return cum / total if total > 0 else np.zeros_like(cum)

    @property
    def numerical_rank(self) -> int:
        """Singular values above max(out, in)·eps·σ₁ (numpy's matrix_rank rule)."""
        return self._sp.numerical_rank()

    def rank_for_energy(self, fraction: float) -> int:
        """Smallest rank keeping ``fraction`` of ‖ΔW‖²_F (0 for a zero module)."""
        return self._sp.rank_for_energy(fraction)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (singular values and the energy curve in full)."""
        return {
            "module": self.module,
            "encoding": self.encoding,
            "rank": self.rank,
            "shape": list(self.shape),
            "dora": self.dora,
            "norm": math.sqrt(self.energy),
            "numerical_rank": self.numerical_rank,
            **{f"rank_{round(f * 100)}": self.rank_for_energy(f) for f in ENERGY_LEVELS},
            "singular_values": [float(x) for x in self.singular_values],
            "energy_curve": [float(x) for x in self.energy_curve],
        }


def adapter_spectra(adapter: Adapter) -> list[ModuleSpectrum]:
    """Spectra of every module of ``adapter``, in natural name order (``layers.2`` before ``layers.10``)."""
    return [ModuleSpectrum.of(m) for m in sorted(adapter, key=lambda m: natural_key(m.name))]


def distribution(values: Iterable[int]) -> dict[str, int] | None:
    """``{"min", "median", "max"}`` of integers (the lower median, so it is one of them); None when empty."""
    v = sorted(int(x) for x in values)
    if not v:
        return None
    return {"min": v[0], "median": v[(len(v) - 1) // 2], "max": v[-1]}


def spectra_summary(spectra: list[ModuleSpectrum]) -> dict[str, Any]:
    """Rank distributions over modules: stored rank, numerical rank and the energy ranks."""
    out: dict[str, Any] = {
        "modules": len(spectra),
        "rank": distribution(s.rank for s in spectra),
        "numerical_rank": distribution(s.numerical_rank for s in spectra),
    }
    for f in ENERGY_LEVELS:
        out[f"rank_{round(f * 100)}"] = distribution(s.rank_for_energy(f) for s in spectra)
    out["dora_modules"] = sum(s.dora for s in spectra)
    return out


def spectrum_report(adapter: Adapter) -> dict[str, Any]:
    """Per-module spectra (as dicts) and their summary, for one adapter."""
    spectra = adapter_spectra(adapter)
    return {"modules": [s.as_dict() for s in spectra], "summary": spectra_summary(spectra)}


# --- plotting (optional extra: matplotlib) -------------------------------------------------------------


def require_matplotlib() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib: optional (the plot extra)
        from matplotlib.figure import Figure  # matplotlib, as above
    except ImportError:
        raise MissingDependencyError("--plot needs matplotlib: pip install 'adapterpack[plot]'") from None
    return Figure, FigureCanvasAgg


def _family(name: str) -> str:
    """The module's kind for colouring: its last name part (``q_proj``, ``down_proj``, ...)."""
    return name.rsplit(".", 1)[-1]


#: Adapters drawn by :func:`plot_spectra` (one row of two panels each); later ones are left out and the title says so.
MAX_PLOT_ADAPTERS = 8


def plot_spectra(adapters: list[tuple[str, list[dict[str, Any]]]], path: str | Any, *, title: str = "") -> None:
    """Draw singular values (log scale) and cumulative energy curves per module to a PNG at ``path``.

    ``adapters`` is ``[(adapter name, module dicts from ModuleSpectrum.as_dict())]``; modules of one
    kind (q_proj, v_proj, ...) share a colour. Written atomically; needs matplotlib (the ``plot`` extra).
    """
    figure_cls, canvas_cls = require_matplotlib()
    if len(adapters) > MAX_PLOT_ADAPTERS:
        title = f"{title} (first {MAX_PLOT_ADAPTERS} of {len(adapters)} adapters)".strip()
        adapters = adapters[:MAX_PLOT_ADAPTERS]
    rows = max(len(adapters), 1)
    fig = figure_cls(figsize=(11, 3.6 * rows), layout="constrained")
    canvas_cls(fig)
    axes = fig.subplots(rows, 2, squeeze=False)
    palette = [f"C{i}" for i in range(10)]
    for row, (name, modules) in enumerate(adapters):
        families = list(dict.fromkeys(_family(m["module"]) for m in modules))
        colour = {f: palette[i % len(palette)] for i, f in enumerate(families)}
        ax_s, ax_e = axes[row]
        seen: set[str] = set()
        for m in modules:
            s = np.asarray(m["singular_values"], dtype=np.float64)
            if s.size == 0 or s[0] <= 0:
                continue
            fam = _family(m["module"])
            label = fam if fam not in seen else None
            seen.add(fam)
            ranks = np.arange(1, s.size + 1)
            positive = s > 0
            ax_s.plot(ranks[positive], s[positive], color=colour[fam], alpha=0.35, lw=0.8, label=label)
            ax_e.plot(
                np.concatenate([[0], ranks]), np.concatenate([[0.0], m["energy_curve"]]), color=colour[fam], alpha=0.35, lw=0.8
            )
        ax_s.set_yscale("log")
        ax_s.set_xlabel("index i")
        ax_s.set_ylabel("singular value σᵢ")
        ax_s.set_title(f"{name}: singular values ({len(modules)} modules)")
        if seen:
            ax_s.legend(fontsize="small", ncols=2)
        for f in ENERGY_LEVELS:
            ax_e.axhline(f, color="grey", lw=0.6, ls="--")
        ax_e.set_ylim(0, 1.02)
        ax_e.set_xlabel("rank")
        ax_e.set_ylabel("fraction of ‖ΔW‖² (Frobenius) kept")
        ax_e.set_title(f"{name}: energy kept by rank (dashed: {', '.join(f'{f:.0%}' for f in ENERGY_LEVELS)})")
    if title:
        fig.suptitle(title)
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
