"""Low-rank factors: the hub representation every encoding converts to and from, in numpy or torch.

``ΔW = scale · B · A`` with A ``[r, n]`` and B ``[m, r]`` as 2-D matrices; ``layout`` says how
that m×n product maps onto the base weight (transposed for embeddings and fan_in_fan_out,
reshaped for convolutions). One type for both array libraries: the numpy encodings return
numpy arrays, ``adapterpack.torch.load`` returns torch tensors (``adapterpack.torch.materialize``
forms their ΔW). This module imports neither torch nor anything above the encodings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from adapterpack.errors import ConversionError


@dataclass
class Factors:
    """ΔW = scale · B · A, mapped onto ``base_shape`` by ``transpose`` / reshape.

    ``A`` and ``B`` are numpy arrays or torch tensors (never mixed). They are 2-D, except that
    ``adapterpack.torch.load`` gives a conv record's factors in their stored shapes (A ``[r, in, *k]``,
    B ``[out, r, 1, ...]``), whose :meth:`matrices` are the 2-D ones. ``magnitude`` is DoRA's
    magnitude vector (torch loads only; else None).
    """

    A: Any
    B: Any
    scale: float
    base_shape: tuple[int, ...]
    transpose: bool = False
    #: The base weight's kind (``linear``, ``embedding``, ``conv``), so an encoding built from these
    #: factors keeps PEFT's layout; with ``transpose`` and ``linear`` it is ``fan_in_fan_out``.
    layout: str = "linear"
    magnitude: Any = None

    @property
    def fan_in_fan_out(self) -> bool:
        """The base weight is stored [in, out] (GPT-2 Conv1D)."""
        return self.transpose and self.layout == "linear"

    @property
    def record_params(self) -> dict[str, Any]:
        """The layout params (``layout``, ``fan_in_fan_out``) of an svd or qsvd record of this ΔW; none for ``linear``.

        A conv without kernel dimensions (lora allows it, spec/format.md §6.1) is written ``linear``: its ΔW is the
        2-D product itself, and svd and qsvd records need a kernel dimension for ``conv`` (svd.md §2, qsvd.md §1)."""
        params: dict[str, Any] = {}
        if self.layout != "linear" and not (self.layout == "conv" and len(self.base_shape) < 3):
            params["layout"] = self.layout
        if self.fan_in_fan_out:
            params["fan_in_fan_out"] = True
        return params

    @property
    def rank(self) -> int:
        """Inner dimension r."""
        return int(self.A.shape[0])

    def matrices(self) -> tuple[Any, Any]:
        """A ``[r, n]`` and B ``[m, r]`` as 2-D views (explicit sizes: -1 is ambiguous when a dimension is 0)."""
        a, b = self.A, self.B
        return a.reshape(a.shape[0], math.prod(a.shape[1:])), b.reshape(b.shape[0], b.shape[1])

    def delta(self) -> np.ndarray:
        """Dense ΔW in the base weight's layout; float32 (float64 if a factor is float64). numpy factors only:
        for torch factors use ``adapterpack.torch.materialize`` (on their device)."""
        if not isinstance(self.A, np.ndarray) or not isinstance(self.B, np.ndarray):
            raise ConversionError("Factors.delta() takes numpy factors; use adapterpack.torch.materialize for torch tensors")
        work = np.float64 if np.float64 in (self.A.dtype, self.B.dtype) else np.float32
        a, b = self.matrices()
        a = a.astype(work, copy=False)
        b = b.astype(work, copy=False)
        with np.errstate(invalid="ignore"):  # NaN/inf factors are stored bit-exact (spec §3): their ΔW is IEEE's, not a warning
            prod = (b @ a) * work(self.scale)
        if self.transpose:
            prod = prod.T
        return np.ascontiguousarray(prod).reshape(self.base_shape)
