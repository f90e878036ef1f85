"""The encoding interface and registry (built-ins, plus plugins from the ``adapterpack.encodings`` entry points)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from adapterpack.adapter import StoredTensor
from adapterpack.errors import RecordError, UnknownEncodingError
from adapterpack.plugins import ENCODINGS, Registry

if TYPE_CHECKING:
    from adapterpack.adapter import Module
    from adapterpack.factors import Factors


class Encoding:
    """How one kind of record represents ΔW.

    ``slots`` maps tensor slot names to whether they are required; ``prefix_slots`` names the slots
    read by row prefix (progressive rank), whose raw blobs writers give prefix CRCs (spec/format.md §2.1).
    """

    encoding_id: ClassVar[str]
    slots: ClassVar[dict[str, bool]]
    prefix_slots: ClassVar[tuple[str, ...]] = ()

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


def validate_unread(encoding: Encoding, module: Module) -> None:
    """``encoding.validate(module)`` before ``to_factors`` reads it, unless every slot is a stored tensor: such a record
    comes from a file reader, which validated it when it built it (as the torch path's ``decode_all(checked=True)``),
    so file loads pay nothing again; an in-memory record (numpy slots) that is malformed is then an adapterpack error,
    not a numpy traceback."""
    slots = module.tensors.values()
    if not slots or not all(isinstance(t, StoredTensor) for t in slots):
        encoding.validate(module)


#: How a record's 2-D ΔW maps onto the base weight (spec §6.1), shared by every low-rank encoding.
LAYOUTS = ("linear", "embedding", "conv")


def check_slots(module: Module, slots: dict[str, bool], needs: str) -> None:
    """Refuse a record missing a required tensor slot or holding an unknown one (``needs`` says what it takes)."""
    missing = [s for s, required in slots.items() if required and s not in module.tensors]
    extra = [s for s in module.tensors if s not in slots]
    if missing or extra:
        raise RecordError(f"module {module.name!r}: {needs}; missing {missing}, unknown {extra}")


def layout_params(params: dict[str, Any], where: str, layouts: tuple[str, ...] = LAYOUTS) -> tuple[str, bool]:
    """(layout, fan_in_fan_out) of a record's params: layout one of ``layouts`` (default linear),
    fan_in_fan_out a bool (default false) allowed with layout linear only."""
    layout = params.get("layout", "linear")
    if not isinstance(layout, str) or layout not in layouts:
        raise RecordError(f"{where}: layout must be one of {layouts}, got {layout!r:.200}")
    fifo = params.get("fan_in_fan_out", False)
    if not isinstance(fifo, (bool, np.bool_)):
        raise RecordError(f"{where}: param 'fan_in_fan_out' must be true or false, got {fifo!r:.200}")
    if fifo and layout != "linear":
        raise RecordError(f"{where}: fan_in_fan_out is allowed only with layout linear, not {layout}")
    return layout, bool(fifo)


#: Built-ins register on import (and are imported on first lookup, by id); other ids come from entry
#: points of the ``adapterpack.encodings`` group, loaded on first lookup.
_REGISTRY: Registry[Encoding] = ENCODINGS


def register_encoding(cls: type[Encoding]) -> type[Encoding]:
    """Class decorator: make an instance of ``cls`` available under ``cls.encoding_id``."""
    _REGISTRY[cls.encoding_id] = cls()
    return cls


def encoding_ids(plugins: bool = False) -> list[str]:
    """Ids of every built-in and registered encoding; with ``plugins``, also those installed plugins offer
    (reads the entry points)."""
    _REGISTRY.load_builtins()
    ids = list(_REGISTRY)
    return ids + [i for i in _REGISTRY.plugin_ids() if i not in ids] if plugins else ids


def is_known(encoding_id: str) -> bool:
    """Whether an encoding id is implemented here or by an installed plugin (loaded now if so)."""
    return encoding_id in _REGISTRY or _REGISTRY.load(encoding_id)


def get_encoding(encoding_id: str) -> Encoding:
    """The encoding registered under ``encoding_id``."""
    return _REGISTRY.require(encoding_id, UnknownEncodingError)
