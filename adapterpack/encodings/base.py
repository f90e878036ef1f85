"""The encoding interface and registry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..errors import UnknownEncodingError

if TYPE_CHECKING:
    from ..adapter import Module
    from .factors import Factors

_REGISTRY: dict[str, Encoding] = {}


class Encoding:
    """How one kind of record represents ΔW.

    ``slots`` maps tensor slot names to whether they are required.
    """

    encoding_id: ClassVar[str]
    slots: ClassVar[dict[str, bool]]

    def validate(self, module: Module) -> None:
        """Check params and tensor shapes/dtypes without reading tensor data; raise RecordError."""
        raise NotImplementedError

    def to_factors(self, module: Module) -> Factors:
        """ΔW as low-rank factors (exact for every encoding; reads the tensors)."""
        raise NotImplementedError

    def delta(self, module: Module) -> np.ndarray:
        """ΔW in the base weight's shape and layout."""
        return self.to_factors(module).delta()

    def summary(self, module: Module) -> dict[str, Any]:
        """Facts for tables: at least ``rank``."""
        return {}


def register_encoding(cls: type[Encoding]) -> type[Encoding]:
    """Class decorator: make an instance of ``cls`` available under ``cls.encoding_id``."""
    _REGISTRY[cls.encoding_id] = cls()
    return cls


def encoding_ids() -> list[str]:
    """Ids of every registered encoding."""
    return list(_REGISTRY)


def is_known(encoding_id: str) -> bool:
    """Whether an encoding id is implemented here."""
    return encoding_id in _REGISTRY


def get_encoding(encoding_id: str) -> Encoding:
    """The encoding registered under ``encoding_id``."""
    enc = _REGISTRY.get(encoding_id)
    if enc is None:
        raise UnknownEncodingError(f"unknown encoding {encoding_id!r} (known: {', '.join(_REGISTRY)})")
    return enc
