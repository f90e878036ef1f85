"""Progress of long work, on stderr only: one reporter for the library and the command line.

Long loops (importance blocks, bank iterations, NOLA fits, re-ranks, audits) wrap their work in
:func:`task` and call ``advance``; whether anything is shown is decided once per process, not by each
caller:

- ``auto`` (the default): shown when stderr is a terminal (one line redrawn in place);
- ``on``: shown even when stderr is not a terminal (a line every ``interval`` seconds and one at the
  end), what ``--progress`` asks for;
- ``off``: nothing, what ``--json`` chooses unless ``--progress`` is given.

The environment variable ``ADAPTERPACK_PROGRESS`` (``1``/``0``) sets the default; :func:`configure`
and :func:`mode` override it. Nothing is ever written to stdout, so ``--json`` output stays
machine-readable. A disabled task costs one attribute look-up per ``advance``.

    from adapterpack import progress
    with progress.task("importance", total=256, unit="blocks") as p:
        for batch in batches:
            ...
            p.advance(note=f"loss {loss:.3f}")
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Literal, TextIO, TypeVar

from adapterpack.text import printable

Mode = Literal["auto", "on", "off"]
T = TypeVar("T")

_MODES = ("auto", "on", "off")


def _env_mode() -> Mode:
    value = os.environ.get("ADAPTERPACK_PROGRESS", "").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return "on"
    if value in ("0", "off", "false", "no"):
        return "off"
    return "auto"


class _Settings:
    def __init__(self) -> None:
        self.mode: Mode = _env_mode()
        self.stream: TextIO | None = None  # None: sys.stderr at the time of writing (pytest swaps it)
        self.interval: float | None = None  # None: 0.2 s on a terminal, 2 s otherwise
        self.lock = threading.Lock()


_settings = _Settings()


def reset() -> None:
    """Back to the default mode (``ADAPTERPACK_PROGRESS``, else ``auto``); the CLI calls it per command."""
    _settings.mode = _env_mode()


def configure(mode: Mode | bool | None = None, *, stream: TextIO | None = None, interval: float | None = None) -> None:
    """Set the process-wide mode (``True``/``False`` = ``on``/``off``, None leaves it), the stream and
    the least seconds between two lines (0 in tests: every update is written)."""
    if mode is not None:
        _settings.mode = _as_mode(mode)
    if stream is not None:
        _settings.stream = stream
    if interval is not None:
        _settings.interval = interval


def _as_mode(mode: Mode | bool) -> Mode:
    if mode is True:
        return "on"
    if mode is False:
        return "off"
    if mode not in _MODES:
        raise ValueError(f"progress mode must be one of {_MODES}, not {mode!r}")
    return mode


@contextlib.contextmanager
def mode(value: Mode | bool, *, stream: TextIO | None = None, interval: float | None = None) -> Iterator[None]:
    """Use ``value`` (and ``stream``/``interval`` if given) inside the block, the previous settings after."""
    saved = (_settings.mode, _settings.stream, _settings.interval)
    configure(value, stream=stream, interval=interval)
    try:
        yield
    finally:
        _settings.mode, _settings.stream, _settings.interval = saved


def _stream() -> TextIO:
    return _settings.stream if _settings.stream is not None else sys.stderr


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def enabled() -> bool:
    """Whether progress is shown now (mode ``on``, or ``auto`` with stderr a terminal)."""
    if _settings.mode == "on":
        return True
    return _settings.mode == "auto" and _isatty(_stream())


def duration(seconds: float) -> str:
    """7.2 → '7.2s', 312 → '5m12s', 4000 → '1h06m'."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


class Task:
    """One piece of long work: ``advance`` after each step, ``note`` for a short status (loss, module)."""

    def __init__(self, label: str, total: int | None, unit: str, *, live: bool) -> None:
        self.label = label
        self.total = total if total is not None and total > 0 else None
        self.unit = unit
        self.done = 0
        self.status = ""
        self.live = live
        self._start = time.monotonic()
        self._last = float("-inf")
        self._tty = live and _isatty(_stream())
        self._width = 0

    def advance(self, n: int = 1, note: str | None = None) -> None:
        """``n`` more steps done; ``note`` replaces the status text."""
        self.done += n
        if note is not None:
            self.status = note
        if self.live:
            self._maybe_show()

    def update(self, done: int, note: str | None = None) -> None:
        """Set the steps done to ``done``."""
        self.advance(done - self.done, note)

    def note(self, text: str) -> None:
        """Replace the status text (shown with the next line)."""
        self.status = text
        if self.live:
            self._maybe_show()

    def line(self, *, final: bool = False) -> str:
        """The progress line as shown (escaped: module names come from files)."""
        elapsed = time.monotonic() - self._start
        unit = f" {self.unit}" if self.unit else ""
        if self.total is not None:
            pct = 100.0 * min(self.done, self.total) / self.total
            parts = [f"{self.label}: {self.done:,}/{self.total:,}{unit} ({pct:.0f}%)", duration(elapsed)]
            if not final and 0 < self.done < self.total:
                parts.append(f"~{duration(elapsed * (self.total - self.done) / self.done)} left")
        else:
            parts = [f"{self.label}: {self.done:,}{unit}", duration(elapsed)]
        if final:
            parts.append("done")
        if self.status:
            parts.append(self.status)
        return printable(", ".join(parts[:2]) + "".join(f", {p}" for p in parts[2:]))

    def _maybe_show(self) -> None:
        now = time.monotonic()
        interval = _settings.interval if _settings.interval is not None else (0.2 if self._tty else 2.0)
        if now - self._last < interval:
            return
        self._last = now
        self._write(self.line())

    def _write(self, text: str, *, end: bool = False) -> None:
        stream = _stream()
        with _settings.lock:
            try:
                if self._tty:
                    pad = " " * max(0, self._width - len(text))
                    stream.write("\r" + text + pad + ("\n" if end else ""))
                    self._width = 0 if end else len(text)
                else:
                    stream.write(text + "\n")
                stream.flush()
            except (OSError, ValueError):  # a closed or broken stderr must not stop the work
                self.live = False

    def close(self, *, failed: bool = False) -> None:
        """Write the last line (with the total time) if anything was shown or the work took a while."""
        if not self.live:
            return
        if failed:
            if self._tty and self._width:
                self._write(self.line() + ", stopped", end=True)
        else:
            self._write(self.line(final=True), end=True)
        self.live = False


@contextlib.contextmanager
def task(label: str, total: int | None = None, unit: str = "") -> Iterator[Task]:
    """A :class:`Task` shown while progress is :func:`enabled`; its last line is written on leaving."""
    t = Task(label, total, unit, live=enabled())
    try:
        yield t
    except BaseException:
        t.close(failed=True)
        raise
    t.close()


def track(items: Iterable[T], label: str, total: int | None = None, unit: str = "") -> Iterator[T]:
    """Yield ``items``, advancing a :func:`task` after each (``total`` from ``len(items)`` when it has one)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with task(label, total, unit) as t:
        for item in items:
            yield item
            t.advance()


__all__ = ["Mode", "Task", "configure", "duration", "enabled", "mode", "reset", "task", "track"]
