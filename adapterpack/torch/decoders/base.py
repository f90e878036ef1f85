"""The torch decoder registry: one decoder per encoding, registered beside the numpy encodings.

A decoder turns one record (:class:`~adapterpack.adapter.Module`) into
:class:`~adapterpack.factors.Factors` holding torch tensors on a device (A ``[r, n]`` and
B ``[m, r]``, 2-D): ``fn(module, device, dtype) -> Factors``. Register one with
``@register_torch_decoder("<encoding id>")`` in its own module under this folder (imported by
``decoders/__init__.py``). An encoding without its own decoder still works:
:func:`get_torch_decoder` falls back to the numpy ``to_factors`` (exact) and copies the factors
to the device, so every encoding in the numpy registry can be loaded with torch.

``staged=True`` tells the loader the decoder reads its tensor slots through :func:`slot`, so the
loader may hand it a record whose slots are torch tensors already on the device (read from the
file in a few large copies, see ``adapterpack.torch.staging``). Decoders registered without it
get the record as opened, with numpy / lazily stored tensors, and do their own reading.

``many=fn`` adds a bulk decoder, ``fn(modules, device, dtype) -> {name: Factors}``, for
encodings whose records share work (nola's generated bases): :func:`decode_all`, which every
loader uses, hands it all records of that encoding at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adapterpack import dtypes
from adapterpack.adapter import Module, StoredTensor
from adapterpack.encodings import get_encoding
from adapterpack.errors import RecordError, UnknownEncodingError
from adapterpack.factors import Factors
from adapterpack.plugins import Registry
from adapterpack.torch.tensors import TORCH_DTYPES, as_2d, place, tensor

#: ``fn(module, device, dtype) -> Factors``.
TorchDecoder = Callable[[Module, torch.device, "torch.dtype | None"], Factors]
#: ``fn(modules, device, dtype) -> {module name: Factors}``.
BulkDecoder = Callable[[list[Module], torch.device, "torch.dtype | None"], "dict[str, Factors]"]

#: Deprecated name of :class:`~adapterpack.factors.Factors` (the one factors type, numpy or torch).
TorchFactors = Factors

__all__ = [
    "BulkDecoder",
    "Factors",
    "TorchDecoder",
    "TorchFactors",
    "as_2d",
    "check_record",
    "decode",
    "decode_all",
    "get_torch_decoder",
    "is_staged",
    "numpy_fallback",
    "register_torch_decoder",
    "slot",
    "torch_decoder_ids",
]


@dataclass(frozen=True)
class _Entry:
    fn: TorchDecoder
    staged: bool
    many: BulkDecoder | None = None


def _adopt(name: str, obj: Any) -> None:
    """Register the function an entry point names as the (unstaged) decoder of the encoding it is named after."""
    if callable(obj) and not isinstance(obj, type):
        register_torch_decoder(name)(obj)


#: Decoders by encoding id: the built-in one of encoding ``X`` is the module ``decoders/X.py``, imported on
#: first lookup; others come from entry points of the ``adapterpack.torch_decoders`` group.
_REGISTRY: Registry[_Entry] = Registry("adapterpack.torch_decoders", "torch decoder", _adopt, builtins="adapterpack.torch.decoders")


def register_torch_decoder(
    encoding_id: str, *, staged: bool = False, many: BulkDecoder | None = None
) -> Callable[[TorchDecoder], TorchDecoder]:
    """Decorator: make ``fn`` the torch decoder of ``encoding_id`` (see the module docstring for ``staged`` and ``many``)."""

    def deco(fn: TorchDecoder) -> TorchDecoder:
        _REGISTRY[encoding_id] = _Entry(fn, staged, many)
        return fn

    return deco


def torch_decoder_ids() -> list[str]:
    """Encodings with a torch decoder of their own (the others use the numpy fallback)."""
    _REGISTRY.load_builtins()
    return list(_REGISTRY)


def is_staged(encoding_id: str) -> bool:
    """Whether the decoder of ``encoding_id`` accepts records whose slots are already device tensors."""
    entry = _REGISTRY.get(encoding_id)
    return entry is not None and entry.staged


def numpy_fallback(module: Module, device: torch.device, dtype: torch.dtype | None) -> Factors:
    """The numpy ``to_factors`` (exact), copied to ``device``: works for every registered encoding."""
    f = get_encoding(module.encoding).to_factors(module)
    return Factors(
        A=tensor(f.A, device, dtype),
        B=tensor(f.B, device, dtype),
        scale=float(f.scale),
        base_shape=tuple(int(d) for d in f.base_shape),
        transpose=bool(f.transpose),
        layout=getattr(f, "layout", "linear" if len(f.base_shape) == 2 else "conv"),
    )


def get_torch_decoder(encoding_id: str) -> TorchDecoder:
    """The torch decoder of ``encoding_id``, or the numpy fallback; unknown ids raise UnknownEncodingError."""
    entry = _REGISTRY.get(encoding_id)
    if entry is not None:
        return entry.fn
    get_encoding(encoding_id)  # raises UnknownEncodingError for an id neither registry knows
    return numpy_fallback


_SPEC_NAMES = {t: name for name, t in TORCH_DTYPES.items()}


def _host(t: torch.Tensor) -> Callable[[], np.ndarray]:
    """Loader of a torch tensor's values as numpy (bit-exact; only an encoding whose ``validate`` reads data calls it)."""

    def load() -> np.ndarray:
        c = t.detach().cpu().contiguous()
        if c.dtype == torch.bfloat16:
            return c.view(torch.int16).numpy().view(dtypes.DTYPES["bfloat16"].numpy)
        return c.numpy()

    return load


def _described(module: Module, slot: str, t: object) -> object:
    """A slot as ``validate`` takes it: torch tensors (staged) as a dtype and shape, numpy / stored ones as they are."""
    if isinstance(t, torch.Tensor):
        name = _SPEC_NAMES.get(t.dtype)
        if name is None:
            raise RecordError(f"module {module.name!r}: tensor {slot!r} has torch dtype {t.dtype}, which .apack cannot hold")
        return StoredTensor(name, tuple(int(d) for d in t.shape), 0, "raw", _host(t))
    if not isinstance(t, (np.ndarray, StoredTensor)):
        raise RecordError(f"module {module.name!r}: tensor {slot!r} is a {type(t).__name__}, not an array")
    return t


def check_record(module: Module) -> None:
    """The record's numpy ``validate`` (params, slots, shapes, dtypes; no data read), also for slots already staged
    as torch tensors: an in-memory record built in Python gets the same adapterpack error a file's would, not a
    KeyError or a torch shape error from the decoder. Encodings known only to the torch registry are not checked."""
    try:
        encoding = get_encoding(module.encoding)
    except UnknownEncodingError:
        return
    slots = {k: _described(module, k, t) for k, t in module.tensors.items()}
    encoding.validate(Module(module.name, module.encoding, tuple(module.base_shape), module.params, slots, module.must_understand))


def decode(module: Module, device: torch.device, dtype: torch.dtype | None, *, checked: bool = False) -> Factors:
    """``module`` as torch :class:`Factors` on ``device`` through its registered decoder, after :func:`check_record`
    unless ``checked`` (records a reader built from a file: it validated them when it built them)."""
    try:
        fn = get_torch_decoder(module.encoding)
    except UnknownEncodingError as e:
        raise UnknownEncodingError(f"module {module.name!r}: {e}") from None
    if not checked:
        check_record(module)
    return fn(module, device, dtype)


def decode_all(
    modules: Iterable[Module], device: torch.device, dtype: torch.dtype | None, *, checked: bool = False
) -> dict[str, Factors]:
    """:func:`decode` of every record, in order; records of an encoding with a bulk decoder go to it together."""
    mods = list(modules)
    bulk: dict[str, list[Module]] = {}
    for m in mods:
        entry = _REGISTRY.get(m.encoding)
        if entry is not None and entry.many is not None:
            bulk.setdefault(m.encoding, []).append(m)
    done: dict[str, Factors] = {}
    for encoding_id, group in bulk.items():
        if not checked:
            for m in group:
                check_record(m)
        done.update(_REGISTRY[encoding_id].many(group, device, dtype))  # type: ignore[misc]
    return {m.name: done[m.name] if m.name in done else decode(m, device, dtype, checked=checked) for m in mods}


def slot(module: Module, name: str, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Tensor slot ``name`` of ``module`` on ``device`` in ``dtype`` (None: as stored), bit-exact.

    A slot that is already a torch tensor (staged by the loader) is moved/cast only if needed;
    numpy arrays and stored tensors are decoded and converted by :func:`adapterpack.torch.tensor`.
    """
    t = module.tensors[name]
    if isinstance(t, torch.Tensor):
        return place(t, device, dtype) if t.device != device or (dtype is not None and t.dtype != dtype) else t
    return tensor(t, device, dtype)
