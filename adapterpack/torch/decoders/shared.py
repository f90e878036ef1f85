"""Torch decoder of ``shared`` records (one member of an adapter bank): B = U·S, A = Vᵀ on the device."""

from __future__ import annotations

import torch

from adapterpack.adapter import Module
from adapterpack.factors import Factors
from adapterpack.torch.decoders.base import register_torch_decoder, slot


@register_torch_decoder("shared", staged=True)
def decode_shared(module: Module, device: torch.device, dtype: torch.dtype | None) -> Factors:
    """ΔW = (U·S)·Vᵀ with scale 1; U·S is formed on the device in float32 (float64 for a float64 record or
    ``dtype``), then the factors are cast to ``dtype`` (casting U and S first would round three times)."""
    p = module.params
    u, v, s = (slot(module, k, device, None) for k in ("U", "V", "S"))
    if s.dim() == 1:  # diagonal form: U and V need not be orthogonal at all (see _balanced)
        b, a = _balanced(u.to(torch.float64) * s.to(torch.float64)[None, :], v.T.to(torch.float64))
        out = dtype if dtype is not None else (torch.float64 if u.dtype == torch.float64 else torch.float32)
        a, b = a.to(out), b.to(out)
    else:
        work = torch.float64 if torch.float64 in (u.dtype, dtype) else torch.float32
        u, v, s = u.to(work), v.to(work), s.to(work)
        b = u @ s
        a = v.T.contiguous()
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
    layout = p.get("layout", "linear")
    return Factors(
        A=a,
        B=b,
        scale=1.0,
        base_shape=tuple(int(d) for d in module.base_shape),
        transpose=layout == "embedding" or bool(p.get("fan_in_fan_out", False)),
        layout=layout,
    )


def _balanced(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``b @ a`` re-factored through its exact SVD, in float64: B = Q_B·u·√s, A = √s·vᵀ·Q_Aᵀ (orthonormal directions of
    balanced size). A diagonal-form bank's U·diag(σ) and V can be nearly collinear with large σ of both signs
    (a fit to a tight target error), so casting them as they are loses ΔW to cancellation (in bf16, entirely); as the
    numpy lowering (``encodings.lower.svd_factors``) does, only the rounding of the output dtype is left."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    uu, ss, vh = torch.linalg.svd(rb @ ra.T)
    root = ss.sqrt()
    return (qb @ uu) * root[None, :], root[:, None] * (vh @ qa.T)
