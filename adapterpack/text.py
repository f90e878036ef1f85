"""Text shown to a person, with the characters that could drive or spoof a terminal escaped.

Names read from a file (modules, tensors, adapters), paths and messages quoting them can hold
anything: printed raw, an escape sequence in a kohya module name would retitle or clear the
terminal, and a bidi override would reorder what is shown. Every human-readable output of the
command line goes through :func:`printable`; its JSON output through :func:`json_printable`.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

#: Unicode categories escaped: controls (C0, DEL, C1), format characters (bidi overrides and
#: isolates, zero-width characters, tags), lone surrogates, line and paragraph separators.
UNSAFE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def python_escape(c: str) -> str:
    """``c`` as Python writes it in a string literal: ``\\x1b``, ``\\u202e``, ``\\U000e0001``."""
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def json_escape(c: str) -> str:
    """``c`` as a JSON string escape (a surrogate pair above U+FFFF), which a JSON parser reads back as ``c``."""
    n = ord(c)
    if n < 0x10000:
        return f"\\u{n:04x}"
    n -= 0x10000
    return f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}"


def printable(text: str, escape: Callable[[str], str] = python_escape) -> str:
    """``text`` with every character of an :data:`UNSAFE` category replaced by ``escape(c)``.

    Backslashes are kept as they are, so applying it twice changes nothing more.
    """
    text = str(text)
    if text.isprintable():  # in C: the usual case, nothing to escape
        return text
    return "".join(escape(c) if unicodedata.category(c) in UNSAFE else c for c in text)


def json_printable(text: str) -> str:
    """JSON text (as ``json.dumps`` writes it) with the :data:`UNSAFE` characters it leaves raw escaped.

    ``json.dumps`` escapes C0 controls inside strings but not DEL, C1 controls, format characters
    or lone surrogates; escaped here, the text parses back to the same values. Raw line feeds in
    the text are indentation (inside strings they are escaped already) and are kept.
    """
    return "\n".join(printable(line, json_escape) for line in text.split("\n"))
