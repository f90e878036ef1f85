"""Registries that third-party packages extend through Python entry points.

A :class:`Registry` maps an id (a codec id, an encoding id) to what implements it. Built-ins
register themselves when their package is imported. An id the registry does not hold is looked
up, on first need, among the entry points of the registry's group (``adapterpack.codecs``,
``adapterpack.encodings``, ``adapterpack.torch_decoders``): the entry point named after the id
is loaded, and its module registers the id on import (or it names the class or function itself,
which is registered under the entry point's name). Entry points are read once per process and
only on a miss, never at import: ``importlib.metadata`` scans every installed distribution.

A plugin never replaces an id that is already registered: an entry point named after one, or a
plugin module that registers one while it loads, is refused with :class:`PluginError`, as is a
plugin that fails to import or provides nothing under its name.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from adapterpack.errors import AdapterpackError, PluginError

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

V = TypeVar("V")

#: Serializes plugin loading across every registry (a plugin module may register in several).
_LOCK = threading.RLock()
#: Per thread: the entry points being loaded now (registrations of a taken id are refused meanwhile).
_STATE = threading.local()
_MISSING: Any = object()
#: What a built-in id may look like to be looked up as a module (an id read from a file is untrusted).
_BUILTIN_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _describe(ep: EntryPoint) -> str:
    """``name = value`` in group G, from distribution D: enough to find and uninstall it."""
    dist = getattr(ep, "dist", None)
    origin = f", from {dist.name} {dist.version}" if dist is not None else ""
    return f"entry point '{ep.name} = {ep.value}' in group {ep.group}{origin}"


@contextmanager
def _loading(what: str) -> Iterator[None]:
    stack = _STATE.__dict__.setdefault("stack", [])
    stack.append(what)
    try:
        yield
    finally:
        stack.pop()


def _loading_now() -> str | None:
    stack = _STATE.__dict__.get("stack")
    return stack[-1] if stack else None


class Registry(dict[str, V], Generic[V]):
    """``id → implementation``; ``get`` and ``[]`` load a missing id's plugin, ``in`` does not.

    ``kind`` names the registry in messages ("codec"); ``adopt(name, obj)`` registers the object
    an entry point names when loading it did not register the id itself (a class, a function).
    ``builtins`` names the package holding one module per built-in id (``<package>.<id>``), imported on the
    id's first lookup.
    """

    def __init__(
        self,
        group: str,
        kind: str,
        adopt: Callable[[str, Any], None] | None = None,
        *,
        builtins: str | None = None,
    ) -> None:
        super().__init__()
        self.group = group
        self.kind = kind
        self._adopt = adopt
        #: The package whose module ``<id>.py`` registers the built-in ``id`` on import: built-ins are found by
        #: name, so a floor below them can look them up without importing them (the in-memory model asks for
        #: encodings this way), and adding one is adding its module.
        self.builtins = builtins
        self._all_builtins = builtins is None
        self._entry_points: dict[str, list[EntryPoint]] | None = None
        self._failed: dict[str, str] = {}
        self._from_plugins: set[str] = set()

    def __setitem__(self, key: str, value: V) -> None:
        loading = _loading_now()
        if loading is not None and key in self:
            raise PluginError(f"{loading} tried to replace the registered {self.kind} {key!r}; refused")
        super().__setitem__(key, value)

    def __missing__(self, key: str) -> V:
        if self.load(key):
            return dict.__getitem__(self, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        """The implementation of ``key``, loading its plugin if needed; ``default`` if there is none."""
        value = dict.get(self, key, _MISSING)
        if value is not _MISSING:
            return value
        return dict.get(self, key, default) if self.load(key) else default

    def _scan(self) -> dict[str, list[EntryPoint]]:
        """The group's entry points by name (read once); refuses one named after a registered id."""
        self.load_builtins()  # a plugin must not claim a built-in id that simply was not imported yet
        if self._entry_points is None:
            from importlib.metadata import entry_points  # start-up: slowish, read only on the first miss

            found: dict[str, list[EntryPoint]] = {}
            for ep in entry_points(group=self.group):
                same = found.setdefault(ep.name, [])
                if all(e.value != ep.value for e in same):  # one distribution seen twice on sys.path
                    same.append(ep)
            self._entry_points = found
        for name, eps in self._entry_points.items():
            if name in self and name not in self._from_plugins:
                raise PluginError(f"{_describe(eps[0])} names the registered {self.kind} {name!r}, which a plugin cannot replace")
        return self._entry_points

    def _builtin(self, key: str) -> bool:
        """Import ``<builtins>.<key>`` if that module exists (it registers ``key``); whether ``key`` is now known."""
        if self.builtins is None or not _BUILTIN_NAME.fullmatch(key):
            return False
        name = f"{self.builtins}.{key}"
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            return False
        importlib.import_module(name)
        return key in self

    def load_builtins(self) -> None:
        """Import every module of the built-ins' package (each built-in registers its id): before listing ids."""
        if self._all_builtins:
            return
        package = importlib.import_module(str(self.builtins))
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.builtins}.{info.name}")
        self._all_builtins = True

    def require(self, key: str, error: type[AdapterpackError]) -> V:
        """The implementation of ``key`` (a built-in imported, a plugin loaded if needed); ``error`` naming
        the known ids when there is none."""
        value = dict.get(self, key, _MISSING)  # the plain look-up first: a hot path
        if value is _MISSING:
            value = self.get(key, _MISSING)
        if value is _MISSING:
            self.load_builtins()
            raise error(f"unknown {self.kind} {key!r:.200} (known: {', '.join(self)})")
        return value

    def plugin_ids(self) -> list[str]:
        """Ids that installed plugins offer (loaded or not); reads the entry points."""
        with _LOCK:
            return list(self._scan())

    def load(self, key: str) -> bool:
        """Whether ``key`` is registered, after loading the plugin named ``key`` if there is one and it is not yet.

        Raises :class:`PluginError` when that plugin fails to load or does not provide ``key``.
        """
        if key in self:
            return True
        if type(key) is not str:
            return False
        if self._builtin(key):
            return True
        with _LOCK:
            if key in self:  # another thread loaded it meanwhile
                return True
            eps = self._scan().get(key)
            if not eps:
                return False
            if key in self._failed:
                raise PluginError(self._failed[key])
            if len(eps) > 1:
                both = "; ".join(_describe(e) for e in eps)
                raise PluginError(f"{self.kind} {key!r} is offered by more than one plugin ({both}); uninstall all but one")
            ep = eps[0]
            where = _describe(ep)
            try:
                with _loading(where):
                    obj = ep.load()
                    if key not in self and self._adopt is not None:
                        self._adopt(key, obj)
            except PluginError as e:
                self._failed[key] = str(e)
                raise
            except Exception as e:  # any import-time failure of third-party code
                self._failed[key] = f"{self.kind} plugin {key!r} failed to load ({where}): {type(e).__name__}: {e}"
                raise PluginError(self._failed[key]) from e
            if key not in self:
                self._failed[key] = f"{where} did not provide {self.kind} {key!r} (its object must register it, or be it)"
                raise PluginError(self._failed[key])
            self._from_plugins.add(key)
            return True

    def forget_plugins(self) -> None:
        """Read the entry points again on the next miss (after installing a plugin in a running process)."""
        with _LOCK:
            self._entry_points = None
            self._failed.clear()


def _adopt_encoding(name: str, obj: Any) -> None:
    """Register the encoding class an entry point names, if its id is the entry point's name."""
    if isinstance(obj, type) and getattr(obj, "encoding_id", None) == name and hasattr(obj, "to_factors"):
        ENCODINGS[name] = obj()


#: Encodings by id (:mod:`adapterpack.encodings` registers into it). It lives on the ground floor so that the
#: in-memory model (:attr:`adapterpack.adapter.Module.implementation`) finds an encoding without importing
#: the floor above it: a built-in's module (``adapterpack/encodings/<id>.py``) is imported on its first
#: lookup, a plugin's entry point loaded.
ENCODINGS: Registry[Any] = Registry("adapterpack.encodings", "encoding", _adopt_encoding, builtins="adapterpack.encodings")
