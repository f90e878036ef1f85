"""How much each singular component of an adapter matters to the model: weights for budget re-ranking.

Re-ranking keeps each module's leading singular triplets (σ_l, u_l, v_l) of ΔW. Cutting component l
moves the model's output distribution, to second order, by ``KL ≈ ½·F_l·σ_l²``, where ``F_l`` is the
Fisher information of the component's coefficient ``c_l`` in ``W = W0 + Σ c_l u_l v_lᵀ``. A byte budget
that maximises ``Σ F_l σ_l²`` kept therefore minimises the KL it costs (to that order), while the
data-free budget (``Σ σ_l²`` kept) treats every module as equally sensitive, which training with Adam
does not make true. ``F`` needs the base model and some text: :func:`adapterpack.torch.importance.component_fisher`
measures it (a diagonal approximation: components are weighed independently of each other);
this module holds the result, writes and reads it (a safetensors file, never pickle), and
checks it belongs to the adapter being re-ranked (its singular values are stored beside it).

File layout: per module ``<name>.fisher`` and ``<name>.S`` (float64, one value per component, the
adapter's exact singular values descending) and the metadata key ``adapterpack.importance`` = ``"1"``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_file
from .errors import ConversionError, InputError

META_KEY = "adapterpack.importance"
VERSION = "1"
#: Next-token labels of the measurement: drawn from the adapted model (the Fisher of the KL) or the text's own.
LABELS = ("sample", "data")
#: Singular values of the adapter being re-ranked must match the stored ones to this, relative to σ₁.
MATCH_RTOL = 1e-5


@dataclass
class Importance:
    """Per-module Fisher information of each singular component (``fisher[name][l]``, ≥ 0) and the
    singular values they were measured for; ``info`` says how (labels, sequences, tokens, seed)."""

    fisher: dict[str, np.ndarray]
    singular_values: dict[str, np.ndarray]
    info: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.fisher) != set(self.singular_values):
            raise ConversionError("importance: every module needs both its Fisher values and its singular values")
        for name, f in self.fisher.items():
            s = self.singular_values[name]
            if f.ndim != 1 or s.ndim != 1 or f.shape != s.shape:
                raise ConversionError(
                    f"importance: module {name!r}: fisher {list(f.shape)} and S {list(s.shape)} must be equal-length vectors"
                )
            if not (np.all(np.isfinite(f)) and np.all(f >= 0) and np.all(np.isfinite(s)) and np.all(s >= 0)):
                raise ConversionError(f"importance: module {name!r}: values must be finite and non-negative")

    def weights(self, name: str, S: np.ndarray) -> np.ndarray:
        """``F_l`` for the components of module ``name`` whose exact singular values are ``S`` (descending).

        Refuses a module the file lacks, or singular values that differ from the stored ones (the
        importance was measured for another adapter, or before it was changed)."""
        if name not in self.fisher:
            raise ConversionError(f"importance has no values for module {name!r} (measured for another adapter?)")
        f, s = self.fisher[name], self.singular_values[name]
        k = int(S.size)
        top = float(S[0]) if k else 0.0
        if f.size < k or not np.allclose(s[:k], S, rtol=0, atol=MATCH_RTOL * top):
            raise ConversionError(
                f"importance for module {name!r} was measured for other singular values "
                "(another adapter, or this one changed since): measure it again"
            )
        return f[:k]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as a safetensors file (atomic)."""
        from safetensors.numpy import save

        tensors = {}
        for name in self.fisher:
            tensors[f"{name}.fisher"] = np.ascontiguousarray(self.fisher[name], dtype=np.float64)
            tensors[f"{name}.S"] = np.ascontiguousarray(self.singular_values[name], dtype=np.float64)
        meta = {META_KEY: VERSION, "adapterpack.importance.info": json.dumps(self.info, sort_keys=True)}
        path = Path(path)
        with atomic_file(path) as f:
            f.write(save(tensors, metadata=meta))
        return path


def load_importance(path: str | os.PathLike[str]) -> Importance:
    """Read a file written by :meth:`Importance.save` (InputError naming what is wrong otherwise)."""
    from .interop.peft import read_safetensors

    path = Path(path)
    arrays, meta = read_safetensors(path)  # InputError for anything safetensors cannot read
    meta = meta or {}
    if meta.get(META_KEY) != VERSION:
        raise InputError(f"{path}: not an adapterpack importance file (metadata {META_KEY!r} = {VERSION!r} missing)")
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
    try:
        return Importance(fisher, svals, {str(k): str(v) for k, v in info.items()} if isinstance(info, dict) else {})
    except ConversionError as e:
        raise InputError(f"{path}: {e}") from None
