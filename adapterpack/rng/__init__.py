"""The spec's portable random numbers: Philox4x32-10 and NOLA's basis layout (pure numpy).

The torch twin, bit-identical on every device, is :mod:`adapterpack.torch.rng`.
"""

from __future__ import annotations

from adapterpack.rng.basis import GENERATOR_ID, GENERATOR_VERSION, KINDS, basis, basis_bits, iter_bases, seed_key, uniform
from adapterpack.rng.philox import KAT, philox4x32_10

__all__ = [
    "GENERATOR_ID",
    "GENERATOR_VERSION",
    "KAT",
    "KINDS",
    "basis",
    "basis_bits",
    "iter_bases",
    "philox4x32_10",
    "seed_key",
    "uniform",
]
