"""Low-rank factors: the hub representation every encoding converts to and from.

``ΔW = scale · B · A`` with A ``[r, n]`` and B ``[m, r]`` as 2-D matrices; ``layout`` says how
that m×n product maps onto the base weight (transposed for embeddings and fan_in_fan_out,
reshaped for convolutions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Factors:
    """ΔW = scale · B · A, mapped onto ``base_shape`` by ``transpose`` / reshape."""

    A: np.ndarray
    B: np.ndarray
    scale: float
    base_shape: tuple[int, ...]
    transpose: bool = False
    #: The base weight's kind (``linear``, ``embedding``, ``conv``), so an encoding built from these
    #: factors keeps PEFT's layout; with ``transpose`` and ``linear`` it is ``fan_in_fan_out``.
    layout: str = "linear"

    @property
    def fan_in_fan_out(self) -> bool:
        """The base weight is stored [in, out] (GPT-2 Conv1D)."""
        return self.transpose and self.layout == "linear"

    @property
    def rank(self) -> int:
        """Inner dimension r."""
        return int(self.A.shape[0])

    def delta(self) -> np.ndarray:
        """Dense ΔW in the base weight's layout; float32 (float64 if a factor is float64)."""
        work = np.float64 if np.float64 in (self.A.dtype, self.B.dtype) else np.float32
        a = self.A.astype(work, copy=False)
        b = self.B.astype(work, copy=False)
        with np.errstate(invalid="ignore"):  # NaN/inf factors are stored bit-exact (spec §3): their ΔW is IEEE's, not a warning
            prod = (b @ a) * work(self.scale)
        if self.transpose:
            prod = prod.T
        return np.ascontiguousarray(prod).reshape(self.base_shape)
