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
    escapes click's own usage errors (they can quote the command line). With ``--json`` the error is also
    printed on stdout as ``{"ok": false, "error": {"type", "message"}}``."""

    def invoke(self, ctx: click.Context) -> Any:
        _default_progress(ctx)
        as_json = "--json" in _command_args(ctx)
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            e.message = capped(printable(e.message))
            if as_json:
                echo_json_error(e, e.format_message())
            raise
        except BrokenPipeError:
            # stdout closed early (``| head``): stop quietly, as other Unix tools do
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(1)
        except OptionError as e:  # options that do not go together: a usage error, exit 2
            if as_json:
                echo_json_error(e, str(e))
            raise click.UsageError(capped(printable(one_line(str(e)))), ctx) from None
        except AdapterpackError as e:
            if as_json:
                echo_json_error(e, str(e))
            raise Failure(one_line(str(e))) from None
        except OSError as e:
            if as_json:
                echo_json_error(e, os_message(e))
            raise Failure(one_line(os_message(e))) from None
        except MemoryError as e:
            message = f"out of memory ({e or 'an allocation failed'})"
            if as_json:
                echo_json_error(e, message)
            raise Failure(one_line(message)) from None


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


#: Keys renamed to the house JSON vocabulary (README "JSON output"; schemas in :mod:`adapterpack.cli.schemas`).
RENAMED_KEYS = {"totals": "total", "problems": "findings", "rows": "modules"}

#: Keys whose values are data read from files (metadata, record params, configs): printed as they are.
VERBATIM_KEYS = frozenset({"metadata", "params", "config", "adapter_config"})

#: A verify problem's code, by the first phrase of its message that names it (else ``invalid``).
_PROBLEM_CODES = (
    ("prefix_crc32c", "prefix_crc_mismatch"),
    ("padding", "nonzero_padding"),
    ("crc", "checksum_mismatch"),
    ("checksum", "checksum_mismatch"),
    ("codec", "codec_error"),
    ("truncated", "truncated"),
)


def problem_code(message: str) -> str:
    """A short stable code for a problem message (``verify``'s problems are plain strings)."""
    low = message.lower()
    return next((code for phrase, code in _PROBLEM_CODES if phrase in low), "invalid")


def _finding(f: Any) -> Any:
    if isinstance(f, str):
        return {"severity": "error", "code": problem_code(f), "message": f}
    if isinstance(f, dict) and "problem" in f and "message" not in f:
        f = {("message" if k == "problem" else k): v for k, v in f.items()}
    return f


def _named(items: Any) -> Any:
    """``modules``: a list of objects with ``name`` (names alone become ``{"name": ...}``; ``module`` keys become ``name``)."""
    if not isinstance(items, list):
        return items
    out = []
    for m in items:
        if isinstance(m, str):
            m = {"name": m}
        elif isinstance(m, dict) and "name" not in m and "module" in m:
            m = {("name" if k == "module" else k): v for k, v in m.items()}
        out.append(m)
    return out


def vocabulary(obj: Any) -> Any:
    """``obj`` with the house JSON vocabulary: ``total`` (not totals), ``findings`` of {severity, code, message}
    (not problems), one ``notes`` list (export_notes folded in), ``modules`` always a list of objects with
    ``name`` (a count of modules is ``module_count``), ``error`` an object {type, message}."""
    if isinstance(obj, list):
        return [vocabulary(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key in VERBATIM_KEYS:
            out[key] = value
            continue
        key = RENAMED_KEYS.get(key, key) if isinstance(key, str) else key
        if key == "error_type":
            continue
        if key == "error" and isinstance(value, str):  # an error held as its message: {type, message}
            value = {"type": obj.get("error_type") or "AdapterpackError", "message": value}
        if key == "export_notes":
            out["notes"] = [*out.get("notes", []), *value]
            continue
        if key == "notes" and "notes" in out:
            value = [*value, *out.pop("notes")]
        if key == "modules" and isinstance(value, int) and not isinstance(value, bool):
            key = "module_count"
        elif key == "modules":
            value = _named(value)
        elif key == "findings" and isinstance(value, list):
            value = [_finding(f) for f in value]
        out[key] = vocabulary(value)
    return out


def echo_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON in the house vocabulary (:func:`vocabulary`; ``"ok": true`` unless it says),
    paths as strings, infinities as strings, every string exact."""
    data = vocabulary(_jsonable(obj))
    if isinstance(data, dict) and "ok" not in data:
        data = {"ok": True, **data}
    click.echo(json_printable(json.dumps(data, indent=2, ensure_ascii=False)))


def written(report: dict[str, Any], src: Any) -> dict[str, Any]:
    """A report of a command that writes, in the vocabulary: its ``path`` (the file written) as ``dst``, beside ``src``."""
    return {"src": src, "dst": report.get("path"), **{k: v for k, v in report.items() if k != "path"}}


def error_type(e: BaseException) -> str:
    """The ``type`` of a JSON error object: the adapterpack error class, ``UsageError`` for usage errors."""
    if isinstance(e, Failure):
        return "AdapterpackError"
    if isinstance(e, click.UsageError):
        return "UsageError"
    return type(e).__name__


def echo_json_error(e: BaseException, message: str) -> None:
    """Print ``{"ok": false, "error": {"type", "message"}}`` on stdout (``--json`` given: stdout stays JSON)."""
    error = {"type": error_type(e), "message": capped(one_line(message))}
    click.echo(json_printable(json.dumps({"ok": False, "error": error}, indent=2, ensure_ascii=False)))


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


def report_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options of a command that plans a smaller adapter and reports it (rerank, compress): ``--adapter``,
    ``--dry-run``, ``--summary``, ``--progress`` and ``--json``, declared once."""
    for option in (
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
        progress_option,
        click.option("--summary", is_flag=True, help="Totals only, no per-module table."),
        click.option("--dry-run", is_flag=True, help="Print the report only; write nothing (DST may be left out)."),
        click.option("--adapter", "adapter_name", metavar="NAME", help="Which adapter of a multi-adapter .apack file."),
    ):
        f = option(f)
    return f


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


def comma_ints(value: str, what: str) -> tuple[int, ...]:
    """``"1, 8,16"`` → (1, 8, 16) for an option's comma-separated list; click's error naming ``what`` otherwise."""
    try:
        return tuple(int(x) for x in value.replace(" ", "").split(",") if x)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of {what}") from None
