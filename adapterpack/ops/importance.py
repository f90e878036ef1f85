"""How much each singular component of an adapter matters to the model: weights for budget re-ranking.

Re-ranking keeps each module's leading singular triplets (σ_l, u_l, v_l) of ΔW. Write
``W = W0 + Σ c_l u_l v_lᵀ`` (``c_l = σ_l``); cutting module i to rank j sets ``c_l = 0`` for l ≥ j and
moves the model's output distribution, to second order, by
``KL ≈ ½·σ_{≥j}ᵀ F_{≥j,≥j} σ_{≥j}``, where ``F`` is the Fisher information matrix of the module's
coefficients. A byte budget that keeps the most of ``Σ_i cost_i(0) − cost_i(j_i)`` therefore minimises the
KL it costs (to that order, modules weighed independently of each other), while the data-free budget
(``Σ σ_l²`` kept) treats every module as equally sensitive, which training with Adam does not make
true. ``F`` needs the base model and some text: :func:`adapterpack.torch.fit.fisher.component_fisher`
measures it; this module holds the result, writes and reads it (a safetensors file, never pickle), and
checks it belongs to the adapter being re-ranked (its singular values are stored beside it).

``fisher[name]`` is the k×k matrix (a module's components are not independent: the cross terms
lowered the re-ranked KL against the diagonal on SmolLM2, BENCHMARKS.md) or, as version 1 files hold, its
diagonal [k].

File layout: per module ``<name>.fisher`` ([k, k], or [k] in version 1) and ``<name>.S`` ([k], the
adapter's exact singular values descending), float64, and the metadata key ``adapterpack.importance`` =
``"2"`` (``"1"`` is read too).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adapterpack.atomic import atomic_file
from adapterpack.errors import ConversionError, InputError
from adapterpack.formats.peft import read_safetensors

META_KEY = "adapterpack.importance"
VERSION = "2"
#: Versions :func:`load_importance` reads (1: diagonal Fisher only).
READABLE = ("1", "2")
#: Next-token labels of the measurement: drawn from the adapted model (the Fisher of the KL) or the text's own.
LABELS = ("sample", "data")
#: Singular values of the adapter being re-ranked must match the stored ones to this, relative to σ₁.
MATCH_RTOL = 1e-5
#: Asymmetry and negative eigenvalues a Fisher matrix may show from rounding, relative to its largest diagonal entry.
PSD_RTOL = 1e-10


@dataclass
class Importance:
    """Per-module Fisher information of the singular components (``fisher[name]``: k×k, symmetric
    with a non-negative diagonal, or its diagonal [k]) and the singular values they were measured
    for; ``info`` says how (labels, sequences, tokens, seed)."""

    fisher: dict[str, np.ndarray]
    singular_values: dict[str, np.ndarray]
    info: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.fisher) != set(self.singular_values):
            raise ConversionError("importance: every module needs both its Fisher values and its singular values")
        try:
            self.fisher = {n: np.asarray(f, dtype=np.float64) for n, f in self.fisher.items()}
            self.singular_values = {n: np.asarray(s, dtype=np.float64) for n, s in self.singular_values.items()}
        except (TypeError, ValueError) as e:
            raise ConversionError(f"importance: values must be float arrays ({e})") from None
        for name, f in self.fisher.items():
            s = self.singular_values[name]
            k = s.shape[0] if s.ndim == 1 else -1
            if k < 0 or f.shape not in ((k,), (k, k)):
                raise ConversionError(
                    f"importance: module {name!r}: fisher {list(f.shape)} must be [k] or [k, k] for S {list(s.shape)}"
                )
            d = f if f.ndim == 1 else np.diagonal(f)
            if not (np.all(np.isfinite(f)) and np.all(d >= 0) and np.all(np.isfinite(s)) and np.all(s >= 0)):
                raise ConversionError(f"importance: module {name!r}: values must be finite, S and F's diagonal non-negative")
            if f.ndim == 2 and k:
                tol = PSD_RTOL * float(d.max())
                if not np.allclose(f, f.T, rtol=0, atol=tol):
                    raise ConversionError(f"importance: module {name!r}: the Fisher matrix must be symmetric")
                if np.linalg.eigvalsh(f).min() < -tol:  # a Fisher matrix is a second moment: PSD
                    raise ConversionError(f"importance: module {name!r}: the Fisher matrix must be positive semi-definite")

    def cut_costs(self, name: str, S: np.ndarray) -> np.ndarray:
        """``cost[j] = ½·σ_{≥j}ᵀ F_{≥j,≥j} σ_{≥j}`` for j = 0..k of module ``name`` (``cost[k] = 0``): the
        second-order KL per calibration sequence of cutting it to rank j, for its exact singular values ``S``.

        Refuses a module the file lacks, or singular values that differ from the stored ones (the
        importance was measured for another adapter, or before it was changed)."""
        if name not in self.fisher:
            raise ConversionError(f"importance has no values for module {name!r} (measured for another adapter?)")
        f, s = self.fisher[name], self.singular_values[name]
        k = int(S.size)
        top = float(S[0]) if k else 0.0
        if s.size < k or not np.allclose(s[:k], S, rtol=0, atol=MATCH_RTOL * top):
            raise ConversionError(
                f"importance for module {name!r} was measured for other singular values "
                "(another adapter, or this one changed since): measure it again"
            )
        sig = np.asarray(S, dtype=np.float64)
        if f.ndim == 1:
            tail = np.cumsum((f[:k] * sig**2)[::-1])[::-1]
        else:  # Σ of the trailing square blocks of F ⊙ σσᵀ: reversed 2-D cumulative sums, read on the diagonal
            a = f[:k, :k] * np.outer(sig, sig)
            tail = np.diagonal(a[::-1, ::-1].cumsum(0).cumsum(1)[::-1, ::-1]).copy()
        return np.append(0.5 * np.maximum(tail, 0.0), 0.0)  # F is PSD: a negative tail is rounding

    def values(self, name: str, S: np.ndarray) -> np.ndarray:
        """What keeping each component is worth to a budget, additive over a kept prefix:
        ``cost[l] − cost[l+1]`` (so ranks j keep ``cost[0] − cost[j]``; an off-diagonal F can make one
        negative)."""
        c = self.cut_costs(name, S)
        return c[:-1] - c[1:]

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
        """Write as a safetensors file (atomic; ``overwrite`` false: OutputExistsError if it exists)."""
        from safetensors.numpy import save  # safetensors: only writing one

        tensors = {}
        for name in self.fisher:
            tensors[f"{name}.fisher"] = np.ascontiguousarray(self.fisher[name], dtype=np.float64)
            tensors[f"{name}.S"] = np.ascontiguousarray(self.singular_values[name], dtype=np.float64)
        meta = {META_KEY: VERSION, "adapterpack.importance.info": json.dumps(self.info, sort_keys=True)}
        path = Path(path)
        with atomic_file(path, overwrite=overwrite) as f:
            f.write(save(tensors, metadata=meta))
        return path


def load_importance(path: str | os.PathLike[str]) -> Importance:
    """Read a file written by :meth:`Importance.save` (InputError naming what is wrong otherwise)."""
    path = Path(path)
    arrays, meta = read_safetensors(path)  # InputError for anything safetensors cannot read
    meta = meta or {}
    if meta.get(META_KEY) not in READABLE:
        raise InputError(
            f"{path}: not an adapterpack importance file this version reads "
            f"(metadata {META_KEY!r} = {meta.get(META_KEY)!r}, expected one of {', '.join(READABLE)})"
        )
    fisher, svals = {}, {}
    for key, arr in arrays.items():
        name, _, part = key.rpartition(".")
        if part not in ("fisher", "S") or not name or arr.dtype != np.float64:
            raise InputError(
                f"{path}: unexpected tensor {key!r} ({arr.dtype}); it holds <module>.fisher and <module>.S in float64"
            )
        (fisher if part == "fisher" else svals)[name] = arr
    try:
        info = json.loads(meta.get("adapterpack.importance.info", "{}"))
    except (ValueError, RecursionError):  # informational only: a bad value is dropped
        info = {}
    if meta[META_KEY] == "1" and any(f.ndim != 1 for f in fisher.values()):
        raise InputError(f"{path}: a version 1 importance file holds Fisher diagonals ([k]), not matrices")
    try:
        return Importance(fisher, svals, {str(k): str(v) for k, v in info.items()} if isinstance(info, dict) else {})
    except ConversionError as e:
        raise InputError(f"{path}: {e}") from None
