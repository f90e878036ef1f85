"""The in-memory adapter: modules with encoding records, tensors loaded lazily.

Every reader (``.apack``, PEFT, kohya) produces an :class:`Adapter`; every writer takes one.
Tensors are numpy arrays or :class:`StoredTensor` handles that decode on demand, so opening
a file reads only the index, and asking for one module reads only its blobs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from adapterpack import dtypes
from adapterpack.errors import AdapterNotFoundError, SizeLimitError, UnknownEncodingError
from adapterpack.limits import MAX_DELTA_ELEMENTS
from adapterpack.plugins import ENCODINGS

if TYPE_CHECKING:
    from adapterpack.encodings.base import Encoding
    from adapterpack.factors import Factors


@dataclass(slots=True)
class StoredTensor:
    """A tensor that lives in a file: its description, and how to read it.

    ``stored_length`` and ``codec`` describe the bytes on disk (for size audits);
    ``load()`` returns the decoded numpy array (a zero-copy view where possible).
    """

    dtype: str
    shape: tuple[int, ...]
    stored_length: int
    codec: str
    loader: Callable[[], np.ndarray]
    #: Reads only the first n rows (axis 0); None: decode everything and slice.
    row_loader: Callable[[int], np.ndarray] | None = field(default=None, repr=False)

    def load(self) -> np.ndarray:
        """Decode and return the array."""
        return self.loader()

    def prefix(self, rows: int) -> StoredTensor:
        """The first ``rows`` rows (axis 0) as a stored tensor of its own, read lazily.

        Reads go through the file's ``row_loader``, which checks what it returns (progressive rank,
        spec svd §3): a raw blob with prefix CRCs up to the next checkpoint, any other blob whole.
        """
        rows = max(0, min(rows, self.shape[0]))
        full, row_loader = self.loader, self.row_loader

        def load() -> np.ndarray:
            return row_loader(rows) if row_loader is not None else full()[:rows]

        per_row = int(np.prod(self.shape[1:], dtype=np.int64)) * dtypes.by_name(self.dtype).itemsize
        stored = rows * per_row if self.codec == "raw" else self.stored_length
        return StoredTensor(self.dtype, (rows, *self.shape[1:]), stored, self.codec, load, row_loader=None)

    @property
    def nbytes(self) -> int:
        """Decoded size in bytes."""
        return int(np.prod(self.shape, dtype=np.int64)) * dtypes.by_name(self.dtype).itemsize


TensorLike = np.ndarray | StoredTensor


def tensor_info(t: TensorLike) -> tuple[str, tuple[int, ...]]:
    """(spec dtype name, shape) of an array or stored tensor, without loading it."""
    if isinstance(t, StoredTensor):
        return t.dtype, t.shape
    return dtypes.of_array(t).name, tuple(t.shape)


def as_array(t: TensorLike) -> np.ndarray:
    """The numpy array behind ``t`` (decoding it if stored)."""
    return t.load() if isinstance(t, StoredTensor) else t


def stored_bytes(t: TensorLike) -> int:
    """Bytes ``t`` occupies where it is stored (decoded bytes for in-memory arrays)."""
    return t.stored_length if isinstance(t, StoredTensor) else int(t.nbytes)


def decoded_bytes(t: TensorLike) -> int:
    """Bytes of ``t`` once decoded."""
    return t.nbytes if isinstance(t, StoredTensor) else int(t.nbytes)


@dataclass
class Module:
    """One adapted module: its encoding id, parameters and tensor slots."""

    name: str
    encoding: str
    base_shape: tuple[int, ...]
    params: dict[str, Any]
    tensors: dict[str, TensorLike]
    must_understand: bool = True

    def array(self, slot: str) -> np.ndarray:
        """The decoded tensor in ``slot`` (e.g. ``"A"``)."""
        try:
            t = self.tensors[slot]
        except KeyError:
            raise AdapterNotFoundError(f"module {self.name!r} has no tensor {slot!r}") from None
        return t.load() if isinstance(t, StoredTensor) else t

    @property
    def implementation(self) -> Encoding:
        """The registered :class:`~adapterpack.encodings.Encoding` for this record (looked up by id in the
        ground-floor registry: the in-memory model never imports the encodings above it)."""
        return ENCODINGS.require(self.encoding, UnknownEncodingError)

    def factors(self) -> Factors:
        """ΔW as low-rank :class:`~adapterpack.encodings.Factors` (the hub every converter uses)."""
        return self.implementation.to_factors(self)

    def delta(self) -> np.ndarray:
        """ΔW in the base weight's shape and layout, float32 (float64 for float64 factors).

        For a DoRA record (``params["dora"]``) this is only the direction update ``s·B·A``, as
        PEFT's ``get_delta_weight`` returns it: the adapted weight is NOT ``W + delta()`` but
        ``magnitude ⊙ (W + ΔW) / ‖W + ΔW‖`` (spec §6.1), which needs the base weight.

        A ΔW of more than :data:`~adapterpack.limits.MAX_DELTA_ELEMENTS` elements is refused
        (SizeLimitError) before anything is read or allocated: no bytes of a file back its size. A
        smaller one that the process cannot allocate is a SizeLimitError too, not numpy's MemoryError.
        """
        size = math.prod(self.base_shape)
        if size > MAX_DELTA_ELEMENTS:
            raise SizeLimitError(
                f"module {self.name!r}: a dense ΔW of shape {list(self.base_shape)} holds {size} elements "
                f"({size * 4} bytes in float32), over the limit of {MAX_DELTA_ELEMENTS} elements"
            )
        try:
            return self.implementation.delta(self)
        except MemoryError:
            raise SizeLimitError(
                f"module {self.name!r}: out of memory computing a dense ΔW of shape {list(self.base_shape)} "
                f"({size * 4} bytes in float32)"
            ) from None

    def summary(self) -> dict[str, Any]:
        """Encoding-specific facts for tables (rank, scale, ...)."""
        return self.implementation.summary(self)

    @property
    def stored_bytes(self) -> int:
        """Bytes this module's tensors occupy in their file."""
        return sum(stored_bytes(t) for t in self.tensors.values())

    @property
    def decoded_bytes(self) -> int:
        """Bytes of this module's tensors once decoded."""
        return sum(decoded_bytes(t) for t in self.tensors.values())

    @property
    def num_params(self) -> int:
        """Stored numbers (elements of all tensors)."""
        return sum(int(np.prod(tensor_info(t)[1], dtype=np.int64)) for t in self.tensors.values())


@dataclass
class Adapter:
    """An adapter of one base model: modules, pass-through tensors and provenance.

    ``source`` keeps the original configuration of an imported adapter (PEFT's
    adapter_config.json, kohya metadata) so that an export loses nothing.
    ``skipped`` lists what a reader skipped (optional records it does not understand).
    """

    name: str = "default"
    base_model: str | None = None
    base_architecture: str | None = None
    modules: dict[str, Module] = field(default_factory=dict)
    tensors: dict[str, TensorLike] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    closer: Callable[[], None] | None = field(default=None, repr=False)

    def derived(self, modules: dict[str, Module], tensors: dict[str, TensorLike] | None = None) -> Adapter:
        """A new adapter with these modules (and tensors; default: this one's) and this one's name,
        base model, provenance, metadata and skipped list (copied); it holds no file handle."""
        return Adapter(
            name=self.name,
            base_model=self.base_model,
            base_architecture=self.base_architecture,
            modules=modules,
            tensors=dict(self.tensors if tensors is None else tensors),
            source=dict(self.source),
            metadata=dict(self.metadata),
            skipped=list(self.skipped),
        )

    def module(self, name: str) -> Module:
        """The module called ``name``; a clear error listing a few names when absent."""
        try:
            return self.modules[name]
        except KeyError:
            some = ", ".join(list(self.modules)[:3])
            raise AdapterNotFoundError(f"no module {name!r} in adapter {self.name!r} (has: {some}, ...)") from None

    def delta(self, name: str) -> np.ndarray:
        """ΔW of module ``name`` as numpy, in the base weight's layout (for DoRA: see :meth:`Module.delta`)."""
        return self.module(name).delta()

    def __iter__(self) -> Iterator[Module]:
        return iter(self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def stored_bytes(self) -> int:
        """Bytes of all tensors where they are stored."""
        return sum(m.stored_bytes for m in self) + sum(stored_bytes(t) for t in self.tensors.values())

    @property
    def decoded_bytes(self) -> int:
        """Bytes of all tensors once decoded."""
        return sum(m.decoded_bytes for m in self) + sum(decoded_bytes(t) for t in self.tensors.values())

    @property
    def num_params(self) -> int:
        """Stored numbers, modules and pass-through tensors."""
        extra = sum(int(np.prod(tensor_info(t)[1], dtype=np.int64)) for t in self.tensors.values())
        return sum(m.num_params for m in self) + extra

    def close(self) -> None:
        """Release the file behind lazily loaded tensors (arrays already loaded stay valid).

        Adapters built from one ``ApackReader`` share its file: it is closed when the last
        of them is closed, so closing one never breaks a sibling. Closing twice is harmless.
        """
        closer, self.closer = self.closer, None  # forgotten before it runs: a close() meanwhile (another thread) is a no-op
        if closer is not None:
            closer()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
