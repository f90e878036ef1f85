"""A library with ΔW deliberately wrong must fail the golden vectors (issue 12's auditor experiment).

Each perturbation replaces one encoding's ``delta`` (lora ×1.7, nola ×−3, shared zeroed, svd
×−1, qsvd ×(1 + 2⁻⁸): small, still past the vectors' tolerance) for the duration of one run of
:func:`tools.vectors._check.check` over every vector (numpy path; the torch decoders are left
alone). A vector holding a module of the perturbed encoding must fail; every other vector must
still pass. Run from the repository root::

    python -m tools.hostile.wrong_delta

It prints, per perturbation, how many vectors hold such modules and how many of them failed,
and exits 1 if any of them passed (or any other vector failed).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from adapterpack.encodings import get_encoding
from tools.vectors._check import check, doc, names

#: encoding id → what the wrong library does to its ΔW.
PERTURBATIONS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "lora": ("×1.7", lambda d: d * 1.7),
    "nola": ("×−3", lambda d: d * -3),
    "shared": ("zeroed", np.zeros_like),
    "svd": ("×−1", lambda d: -d),
    "qsvd": ("×(1 + 2⁻⁸)", lambda d: d * (1 + 2.0**-8)),
}


@contextlib.contextmanager
def wrong(encoding: str) -> Iterator[None]:
    """Within the block, ``Module.delta`` of ``encoding`` records is perturbed as :data:`PERTURBATIONS` says."""
    impl = get_encoding(encoding)
    cls = type(impl)
    own, saved = "delta" in cls.__dict__, cls.delta
    change = PERTURBATIONS[encoding][1]

    def delta(self: Any, module: Any) -> np.ndarray:
        return change(saved(self, module))

    cls.delta = delta  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own:
            cls.delta = saved  # type: ignore[method-assign]
        else:
            del cls.delta


def holders(encoding: str) -> list[str]:
    """Readable vectors with at least one module of ``encoding`` whose ΔW is not all zero."""
    out = []
    for name in names():
        d = doc(name)
        mods = [m for a in d.get("adapters", []) for m in a["modules"] if m["encoding"] == encoding]
        if any(np.any(np.array(m["delta"], dtype=np.float64)) for m in mods):
            out.append(name)
    return out


def failures(encoding: str) -> list[str]:
    """The vectors that fail their check while ``encoding``'s ΔW is wrong."""
    failed = []
    with wrong(encoding):
        for name in names():
            try:
                check(name, torch=False)
            except AssertionError:
                failed.append(name)
    return failed


def main() -> int:
    ok = True
    for encoding, (what, _) in PERTURBATIONS.items():
        expect = holders(encoding)
        failed = failures(encoding)
        missed = sorted(set(expect) - set(failed))
        spurious = sorted(set(failed) - set(expect))
        ok &= not missed and not spurious and bool(expect)
        print(f"{encoding} ΔW {what}: {len(set(failed) & set(expect))} of {len(expect)} vectors holding {encoding} modules fail")
        for name in missed:
            print(f"  PASSED ANYWAY: {name}")
        for name in spurious:
            print(f"  failed without holding {encoding} modules: {name}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
