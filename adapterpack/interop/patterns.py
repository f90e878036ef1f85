"""PEFT's per-module rank and alpha: ``rank_pattern`` / ``alpha_pattern`` matching and synthesis.

PEFT (``peft.utils.other.get_pattern_key``, 0.21) picks, for a module called ``name``, the first
pattern key ``k`` in dict order for which ``re.match(rf"(.*\\.)?({k})$", name)`` succeeds; the
module's rank is ``rank_pattern[k]`` (else ``r``), its alpha ``alpha_pattern[k]`` (else
``lora_alpha``). We mirror that rule exactly (its answer, found in bounded time by :mod:`.regex_match`)
so that the ranks and scales we read are the ones PEFT would build, and we write patterns that
PEFT resolves back to the same values.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import InputError
from .regex_match import UnsupportedPattern, pattern_matches


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """The first pattern matching ``key_to_match`` as PEFT matches it, else ``key_to_match`` itself.

    Matched in bounded time (:mod:`.regex_match`); a key it refuses is an InputError naming it.
    """
    for key in pattern_keys:
        try:
            if pattern_matches(key, key_to_match):
                return key
        except re.error as e:
            raise InputError(f"adapter_config.json: pattern {key!r:.200} is not a valid regular expression ({e})") from None
        except UnsupportedPattern as e:
            raise InputError(f"adapter_config.json: pattern {key!r:.200} {e}") from None
    return key_to_match


def resolve(patterns: Mapping[str, Any] | None, default: Any, module_name: str) -> Any:
    """The value PEFT uses for ``module_name``: the first matching pattern's value, else ``default``."""
    if not patterns:
        return default
    return patterns.get(get_pattern_key(patterns.keys(), module_name), default)


def most_common(values: Sequence[Any]) -> Any:
    """The most frequent value (the first seen among equally frequent ones)."""
    counts = Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)


def build_patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """A pattern dict under which every module name in ``values`` resolves to its value.

    Modules whose value equals ``default`` get no entry. A module's own name is its pattern
    (PEFT's documented form, what PEFT itself writes); where such a pattern would also match
    another module (a suffix of its name, or ``.`` matching any character), every pattern
    becomes ``^`` + the escaped name, which matches that one name only. Checked with :func:`resolve`.
    """
    out: dict[str, Any] = {}
    for name, value in values.items():
        if value != default:
            out[name] = value
    if any(resolve(out, default, n) != v for n, v in values.items()):
        out = {"^" + re.escape(n): v for n, v in out.items()}
    for n, v in values.items():
        got = resolve(out, default, n)
        if got != v:  # pragma: no cover - anchored escaped names match only themselves
            raise AssertionError(f"pattern synthesis failed for {n!r}: {got!r} != {v!r}")
    return out
