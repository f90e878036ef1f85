"""The rule every name follows, in ``.apack`` files and in every format adapterpack writes (spec/format.md §2, §7).

A name (of an adapter, a module, a tensor) is 1 to 1,024 Unicode code points (adapters: 256) and
holds no lone surrogate, which UTF-8 cannot encode. The reader refuses an index that breaks it and
every exporter refuses to write such a name, so no output holds a name the others cannot.
"""

from __future__ import annotations

import re
from typing import Any

from adapterpack.errors import AdapterpackError
from adapterpack.limits import MAX_ADAPTER_NAME, MAX_NAME

__all__ = ["MAX_ADAPTER_NAME", "MAX_NAME", "check_name", "name_problem", "natural_key"]


def name_problem(name: str, limit: int = MAX_NAME) -> str | None:
    """What is wrong with ``name`` as a name of at most ``limit`` code points, or None when nothing is."""
    if not 0 < len(name) <= limit:
        return f"must be 1–{limit} characters, not {len(name):,}"
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"holds a lone surrogate (\\u{ord(name[e.start]):04x} at {e.start}), which UTF-8 cannot encode"
    return None


def check_name(name: str, what: str, error: type[AdapterpackError], limit: int = MAX_NAME) -> str:
    """``name`` when it follows the rule, else ``error`` naming ``what`` (e.g. ``"module"``) and the name, quoted and cut short."""
    problem = name_problem(name, limit)
    if problem is not None:
        raise error(f"{what} name {name!r:.80} {problem}")
    return name


def natural_key(name: str) -> list[Any]:
    """Sort key putting ``layers.2`` before ``layers.10``: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]
