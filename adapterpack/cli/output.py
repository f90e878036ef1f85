"""Presentation for the CLI: aligned tables, number formats, JSON, one-line errors, progress bars.

Everything printed goes through :func:`echo`, :func:`echo_lines`, :func:`table`, :func:`echo_json`
or :class:`Failure`, which escape control and format characters (:mod:`adapterpack.text`): a
name or path read from a file never reaches the terminal raw.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click

from adapterpack.errors import AdapterpackError, OptionError
from adapterpack.text import json_printable, printable

#: The most characters of one error message shown: a value read from a file can be megabytes long.
MAX_ERROR_CHARS = 1000


class Failure(click.ClickException):
    """An error shown as ``adapterpack: <message>`` on stderr (on one line, escaped, capped), exit status 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"adapterpack: {capped(printable(one_line(self.format_message())))}", err=True)


def one_line(text: str) -> str:
    """Collapse a message onto one line."""
    return " ".join(str(text).split())


def capped(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({count(len(text) - limit)} more characters)"


def os_message(e: OSError) -> str:
    """``path: reason`` for an OSError (no errno noise)."""
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


class AdapterpackGroup(click.Group):
    """A click group that turns AdapterpackError, OSError and MemoryError into one line and exit status 1
    (OptionError: a usage error, exit status 2), and
    escapes click's own usage errors (they can quote the command line)."""

    def invoke(self, ctx: click.Context) -> Any:
        _default_progress(ctx)
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            e.message = capped(printable(e.message))
            raise
        except BrokenPipeError:
            # stdout closed early (``| head``): stop quietly, as other Unix tools do
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(1)
        except OptionError as e:  # options that do not go together: a usage error, exit 2
            raise click.UsageError(capped(printable(one_line(str(e)))), ctx) from None
        except AdapterpackError as e:
            raise Failure(one_line(str(e))) from None
        except OSError as e:
            raise Failure(one_line(os_message(e))) from None
        except MemoryError as e:
            raise Failure(one_line(f"out of memory ({e or 'an allocation failed'})")) from None


def _command_args(ctx: click.Context) -> list[str]:
    """The arguments after the command name, up to a ``--``."""
    args = [*getattr(ctx, "_protected_args", []), *ctx.args]  # click 8.2+ keeps the command's own args apart
    return args[: args.index("--")] if "--" in args else args


def _default_progress(ctx: click.Context) -> None:
    """Progress back to its default for this command: off with ``--json`` (``--progress`` turns it on again)."""
    from adapterpack import progress

    progress.reset()
    if "--json" in _command_args(ctx):
        progress.configure("off")


# --- numbers --------------------------------------------------------------------------------------


def count(n: int) -> str:
    """An integer with thousands separators."""
    return f"{n:,}"


def human_bytes(n: int | float) -> str:
    """1,536 → '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"  # pragma: no cover


def size(n: int) -> str:
    """Exact bytes and a human size: '7,372,800 B (7.03 MiB)'."""
    return f"{count(n)} B" if n < 1024 else f"{count(n)} B ({human_bytes(n)})"


def ratio(r: float | None) -> str:
    """'1.19x', or '-' when undefined."""
    return "-" if r is None else f"{r:.2f}x"


def sci(x: float | None) -> str:
    """A small error in scientific notation."""
    if x is None:
        return "-"
    return "0" if x == 0 else f"{x:.3e}"


def shape(dims: Sequence[int]) -> str:
    """[576, 576] → '576x576'."""
    return "x".join(str(d) for d in dims) if dims else "scalar"


# --- tables and JSON -------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str) -> list[str]:
    """Lines of a plain-text table; ``align`` has one '<' or '>' per column; cells escaped (:func:`printable`)."""
    cells = [[printable(h) for h in headers]] + [["-" if c is None else printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        parts = [c.ljust(w) if a == "<" else c.rjust(w) for c, w, a in zip(r, widths, align)]
        return "  ".join(parts).rstrip()

    return [line(cells[0])] + [line(r) for r in cells[1:]]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def echo_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON (paths as strings, infinities as strings, every string exact)."""
    click.echo(json_printable(json.dumps(_jsonable(obj), indent=2, ensure_ascii=False)))


def echo(text: str) -> None:
    """Print one line to stdout, control and format characters escaped."""
    click.echo(printable(text))


def echo_lines(lines: Sequence[str]) -> None:
    """Print lines to stdout (:func:`echo`)."""
    for line in lines:
        echo(line)


# --- progress ------------------------------------------------------------------------------------


def progress_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--progress/--no-progress`` for a command that does long work: progress (:mod:`adapterpack.progress`,
    stderr only) is shown on a terminal by default, always with ``--progress``, never with ``--no-progress``;
    ``--json`` turns the default off (:meth:`AdapterpackGroup.invoke`). stdout is never written to."""

    def apply(ctx: click.Context, param: click.Parameter, value: bool | None) -> None:
        if value is not None:
            from adapterpack import progress

            progress.configure(value)

    return click.option(
        "--progress/--no-progress",
        "show_progress",
        default=None,
        expose_value=False,
        callback=apply,
        help="Report progress on stderr (default: only when stderr is a terminal and --json is not given).",
    )(f)


@contextlib.contextmanager
def progress_bar(total: int, label: str = "writing", unit: str = "B") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(nbytes)`` of an :mod:`adapterpack.progress` task (shown as that module decides)."""
    from adapterpack import progress

    if total <= 0:
        yield lambda n: None
        return
    with progress.task(label, total, unit) as t:
        yield t.advance


def progress_factory(label: str) -> Callable[[int], contextlib.AbstractContextManager[Callable[[int], None]]]:
    """A ``progress(total)`` factory for library functions that report bytes done."""
    return lambda total: progress_bar(total, label)
