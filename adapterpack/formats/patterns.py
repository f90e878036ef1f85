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
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from adapterpack.errors import InputError
from adapterpack.formats.regex_match import KeySet, UnsupportedPattern


def _refused(e: UnsupportedPattern) -> InputError:
    what = "patterns" if e.key is None else f"pattern {e.key!r:.200}"
    return InputError(f"adapter_config.json: {what} {e}")


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """The first pattern matching ``key_to_match`` as PEFT matches it, else ``key_to_match`` itself.

    Matched in bounded time (:mod:`.regex_match`); a key it refuses is an InputError naming it.
    """
    try:
        found = KeySet(pattern_keys).first_match(key_to_match)
    except UnsupportedPattern as e:
        raise _refused(e) from None
    return key_to_match if found is None else found


#: The KeySet of each pattern map recently resolved, by identity (the map is held, so its id stays its own):
#: one map's resolutions for all its modules share one step budget and the answers already found.
_KEY_SETS: OrderedDict[int, tuple[Mapping[str, Any], KeySet]] = OrderedDict()
_KEY_SETS_KEPT = 16


def _key_set(patterns: Mapping[str, Any]) -> KeySet:
    held = _KEY_SETS.get(id(patterns))
    if held is None or held[0] is not patterns or len(held[1].keys) != len(patterns):
        held = (patterns, KeySet(patterns.keys()))
        _KEY_SETS[id(patterns)] = held
        while len(_KEY_SETS) > _KEY_SETS_KEPT:
            _KEY_SETS.popitem(last=False)
    _KEY_SETS.move_to_end(id(patterns))
    return held[1]


def resolve(patterns: Mapping[str, Any] | None, default: Any, module_name: str) -> Any:
    """The value PEFT uses for ``module_name``: the first matching pattern's value, else ``default``.

    All the modules resolved against one map share its step budget (spec §7.1).
    """
    if not patterns:
        return default
    try:
        found = _key_set(patterns).first_match(module_name)
    except UnsupportedPattern as e:
        raise _refused(e) from None
    return patterns.get(module_name if found is None else found, default)  # PEFT's get(get_pattern_key(...))


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
