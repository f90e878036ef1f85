"""Records of one encoding as records of another, through the :class:`Factors` hub.

``as_lora`` is what every exporter (PEFT, kohya, gguf, vLLM) calls, so any encoding reaches the
stacks that only know LoRA; ``as_svd`` and ``at_rank`` are the exact SVD conversions re-ranking
and progressive loading use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import Adapter, Module, tensor_info
from adapterpack.encodings.svd import from_spectrum
from adapterpack.errors import ConversionError, SizeLimitError
from adapterpack.factors import Factors
from adapterpack.limits import MAX_FACTOR_ELEMENTS
from adapterpack.linalg.lowrank import spectrum_of

#: Encodings whose rank-j truncation is a prefix of each tensor (their ``truncate`` reads nothing).
PREFIX_ENCODINGS = ("svd", "qsvd")


def main_dtype(module: Module) -> str:
    """The dtype of the module's largest float tensor (what an export keeps by default); float32 for qsvd,
    whose float tensors are scales and singular values, not the values of its factors."""
    if module.encoding == "qsvd":
        return "float32"
    best, size = "float32", -1
    for t in module.tensors.values():
        dt, shape = tensor_info(t)
        n = int(np.prod(shape, dtype=np.int64))
        if dtypes.by_name(dt).is_float and n > size:
            best, size = dt, n
    return best


def lora_from_factors(name: str, f: Factors, *, dtype: str) -> Module:
    """A ``lora`` record with A, B of ``f`` cast to ``dtype`` and alpha = scale·rank (so alpha/r is the scale).

    A rank-0 ΔW (all zeros) becomes rank 1 with zero factors: LoRA has no rank 0. Factors ``dtype``
    cannot hold (e.g. svd's √S·Vt past float16) are refused, naming the module, not written as inf.
    """
    a, b = f.A, f.B
    if f.rank == 0:
        if a.shape[1] + b.shape[0] > MAX_FACTOR_ELEMENTS:  # the zero factors are not backed by any bytes
            raise SizeLimitError(
                f"module {name!r}: a rank-0 ΔW of shape {list(f.base_shape)} as lora needs {a.shape[1] + b.shape[0]} "
                f"zero factor elements, over the limit of {MAX_FACTOR_ELEMENTS}"
            )
        a, b = np.zeros((1, a.shape[1]), a.dtype), np.zeros((b.shape[0], 1), b.dtype)
    r = int(a.shape[0])
    params: dict[str, Any] = {"rank": r, "alpha": float(f.scale) * r}
    if f.layout != "linear":
        params["layout"] = f.layout
    if f.fan_in_fan_out:
        params["fan_in_fan_out"] = True
    if f.layout == "conv":
        a = a.reshape((r, *f.base_shape[1:]))
        b = b.reshape((b.shape[0], r, *([1] * (len(f.base_shape) - 2))))
    tensors = {s: dtypes.cast_array(x, dtype, f"module {name!r} tensor {s!r}")[0] for s, x in (("A", a), ("B", b))}
    tensors = {s: np.ascontiguousarray(x) for s, x in tensors.items()}
    return Module(name, "lora", tuple(f.base_shape), params, tensors)


def svd_factors(f: Factors, *, where: str = "module", rank: int | None = None) -> Factors:
    """ΔW's exact SVD as factors B = U·√S, A = √S·Vᵀ (scale 1; zero singular values dropped, then at most
    ``rank``): orthonormal directions of balanced size, so casting them to a narrow float costs only its
    rounding of ΔW, whatever the conditioning of the factors ``f`` came as."""
    sp = spectrum_of(f, where=where)
    k = int(np.count_nonzero(sp.S > 0))
    k = k if rank is None else min(k, int(rank))
    u, vt = sp.vectors(k)
    root = np.sqrt(sp.S[:k])
    return Factors(A=root[:, None] * vt, B=u * root[None, :], scale=1.0, base_shape=tuple(f.base_shape), transpose=f.transpose,
                   layout=f.layout)


def as_lora(module: Module, *, dtype: str | None = None) -> Module:
    """``module`` as an equivalent ``lora`` record (itself when it already is one).

    For ``svd``: B = Utᵀ·√S, A = √S·Vt, alpha = rank (scale 1). For ``shared`` (bank members): ΔW's exact
    SVD (:func:`svd_factors`), since U·S and Vᵀ of a diagonal-form bank are far from orthogonal and would
    lose digits when cast. Exact up to the rounding of the output dtype (``dtype``; default the vectors'
    dtype for svd, float32 for other encodings).
    """
    if module.encoding == "lora":
        return module
    module.implementation.validate(module)
    # svd keeps its vectors' dtype; factors regenerated or rebuilt from bases (nola, shared) are float32,
    # whatever dtype their coefficients were stored in
    default = main_dtype(module) if module.encoding == "svd" else "float32"
    f = module.factors()
    if module.encoding == "shared":
        f = svd_factors(f, where=f"module {module.name!r}")
    return lora_from_factors(module.name, f, dtype=dtype or default)


def _no_dora(module: Module) -> None:
    if module.encoding == "lora" and module.params.get("dora", False):
        raise ConversionError(
            f"module {module.name!r} is DoRA: its magnitude rescaling needs the base weight, so it has no SVD of its own; "
            "keep it as lora"
        )


def as_svd(module: Module, *, rank: int | None = None, dtype: str | None = None) -> Module:
    """``module`` as an ``svd`` record (exact SVD from its factors, cut to ``rank`` when given)."""
    if module.encoding == "svd" and dtype is None:
        return module if rank is None else module.implementation.truncate(module, rank)
    _no_dora(module)
    module.implementation.validate(module)
    f = module.factors()
    return from_spectrum(
        module.name, spectrum_of(f, where=f"module {module.name!r}"), f, rank=rank, dtype=dtype or main_dtype(module)
    )


def at_rank(module: Module, rank: int) -> Module:
    """The best rank-``rank`` version of ``module``: a prefix view for ``svd`` records (reads only
    those bytes), an exact SVD truncation (reading the factors) for others; ranks at or below
    ``rank`` and DoRA records are kept as they are."""
    if module.encoding in PREFIX_ENCODINGS:
        return module.implementation.truncate(module, rank)  # type: ignore[attr-defined]
    if module.encoding == "lora" and module.params.get("dora", False):
        return module  # DoRA's magnitude needs the base weight: no SVD of its own (kept, as rerank keeps it)
    current = int(module.summary().get("rank", 0))
    if current <= rank:
        return module
    return as_svd(module, rank=rank)


def adapter_at_rank(adapter: Adapter, rank: int) -> Adapter:
    """``adapter`` with every module at most rank ``rank`` (see :func:`at_rank`).

    The result takes over ``adapter``'s file handle: close the result, not ``adapter``.
    """
    if rank < 0:
        raise ConversionError(f"rank must be >= 0, got {rank}")
    modules = {n: at_rank(m, rank) for n, m in adapter.modules.items()}
    out = adapter.derived(modules)
    out.closer, adapter.closer = adapter.closer, None
    return out
