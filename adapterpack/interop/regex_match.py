"""Python's ``re.match`` answer for PEFT's pattern keys, found without backtracking.

PEFT matches a module name against ``(.*\\.)?(key)$`` with Python's backtracking ``re``; a key
such as ``([a-z_.0-9]+)+X`` then takes exponential time on a real module name. Whether a
regular pattern matches does not depend on how the engine searches, so this module parses the
key with Python's own parser (same syntax, same errors) and runs the pattern over the set of
positions reachable so far, as a bit mask (a Thompson-style simulation): each node costs one
pass, repetition stops when no new position is reached. Keys that are only literal text
(PEFT's usual form, and what :func:`~.patterns.build_patterns` writes) are matched with string
operations. Constructs whose meaning is not regular (backreferences, lookarounds, atomic
groups, possessive quantifiers, scoped flags) are refused, as are keys or names beyond the
limits of spec §7 and matches that would take more than :data:`~adapterpack.limits.MAX_PATTERN_STEPS` steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from re import _constants as sre  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

from ..limits import MAX_PATTERN_LENGTH, MAX_PATTERN_REPEAT, MAX_PATTERN_STEPS, MAX_PATTERN_SUBJECT


class UnsupportedPattern(ValueError):
    """A key this matcher refuses (the message says why); the caller names the key and the file."""


@dataclass(frozen=True)
class Compiled:
    """A key ready to match: literal text (``anchored`` at the start of the name), or a parsed tree."""

    literal: str | None
    anchored: bool
    tree: Any


def _prefix_ok(prefix: str) -> bool:
    """Whether ``(.*\\.)?`` matches ``prefix`` exactly: empty, or ending with "." and holding no newline."""
    return prefix == "" or (prefix.endswith(".") and "\n" not in prefix)


def _literal_text(items: list[tuple[Any, Any]]) -> tuple[str, bool] | None:
    """(text, anchored) when the parsed key is only literal characters, optionally after ``^`` / ``\\A``."""
    anchored = items[:1] in ([(sre.AT, sre.AT_BEGINNING)], [(sre.AT, sre.AT_BEGINNING_STRING)])
    body = items[1:] if anchored else items
    if not all(op is sre.LITERAL for op, _ in body):
        return None
    return "".join(chr(c) for _, c in body), anchored


@functools.lru_cache(maxsize=4096)
def compile_key(key: str) -> Compiled:
    """Parse ``key`` as PEFT uses it; :class:`UnsupportedPattern` (or ``re.error``) when it cannot be matched here."""
    if len(key) > MAX_PATTERN_LENGTH:
        raise UnsupportedPattern(f"is {len(key)} characters long, over the limit of {MAX_PATTERN_LENGTH}")
    wrapped = rf"(.*\.)?({key})$"
    tree = sre_parse.parse(wrapped)  # re.error for what re.match would refuse
    if tree.state.flags & ~sre.SRE_FLAG_UNICODE:
        raise UnsupportedPattern("sets regular-expression flags, which are not supported")
    _check(list(tree))
    # the key alone in its group (a key such as "a)(b" also parses, but spans more than one node)
    whole = len(tree) == 3 and tree[1][0] is sre.SUBPATTERN and tree[1][1][0] == 2 and tree[2] == (sre.AT, sre.AT_END)
    lit = _literal_text(list(tree[1][1][3])) if whole else None
    return Compiled(lit[0] if lit else None, bool(lit and lit[1]), tree)


_SUPPORTED = {sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN, sre.BRANCH, sre.SUBPATTERN, sre.MAX_REPEAT, sre.MIN_REPEAT, sre.AT}


def _check(items: list[tuple[Any, Any]]) -> None:
    """Refuse constructs that are not regular or whose cost is not bounded by the limits."""
    for op, av in items:
        if op not in _SUPPORTED:
            raise UnsupportedPattern(
                f"uses {str(op).lower()}: backreferences, lookarounds, atomic groups and possessive quantifiers are not supported"
            )
        if op is sre.SUBPATTERN:
            if av[1] or av[2]:
                raise UnsupportedPattern("sets regular-expression flags, which are not supported")
            _check(list(av[3]))
        elif op is sre.BRANCH:
            for alt in av[1]:
                _check(list(alt))
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            lo, hi, body = av
            if lo > MAX_PATTERN_REPEAT or (hi is not sre.MAXREPEAT and hi > MAX_PATTERN_REPEAT):
                raise UnsupportedPattern(f"repeats {{{lo},{hi}}} times, over the limit of {MAX_PATTERN_REPEAT}")
            _check(list(body))


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES: dict[Any, Callable[[str], bool]] = {
    sre.CATEGORY_DIGIT: str.isdecimal,
    sre.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    sre.CATEGORY_SPACE: str.isspace,
    sre.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    sre.CATEGORY_WORD: _is_word,
    sre.CATEGORY_NOT_WORD: lambda ch: not _is_word(ch),
}


def _in_class(ch: str, items: list[tuple[Any, Any]]) -> bool:
    """Whether ``ch`` is in a character class (Python's unicode semantics for \\d, \\s, \\w)."""
    negate = bool(items) and items[0][0] is sre.NEGATE
    hit = False
    for op, av in items[1:] if negate else items:
        if op is sre.LITERAL:
            hit = ord(ch) == av
        elif op is sre.RANGE:
            hit = av[0] <= ord(ch) <= av[1]
        elif op is sre.CATEGORY:
            hit = _CATEGORIES[av](ch)
        else:  # pragma: no cover - the parser emits nothing else inside a class without flags
            raise UnsupportedPattern(f"uses {str(op).lower()} inside a character class")
        if hit:
            break
    return hit != negate


class _Run:
    """One match: the subject, its position masks, and the step budget."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.n = len(text)
        self.all = (1 << (self.n + 1)) - 1
        self.steps = 0
        self.masks: dict[int, int] = {}

    def chars(self, node: tuple[Any, Any], pred: Callable[[str], bool]) -> int:
        """Bit i set when character i satisfies ``pred`` (cached per node)."""
        key = id(node)
        if key not in self.masks:
            self.masks[key] = sum(1 << i for i, ch in enumerate(self.text) if pred(ch))
        return self.masks[key]

    def at(self, code: Any) -> int:
        n, text = self.n, self.text
        if code in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING):
            return 1
        if code is sre.AT_END:  # end, or just before a final newline
            return 1 << n | (1 << (n - 1) if text.endswith("\n") else 0)
        if code is sre.AT_END_STRING:
            return 1 << n
        bounds = sum(1 << i for i in range(n + 1) if (i > 0 and _is_word(text[i - 1])) != (i < n and _is_word(text[i])))
        if code is sre.AT_BOUNDARY:
            return bounds
        if code is sre.AT_NON_BOUNDARY:
            return 0 if n == 0 else self.all & ~bounds  # Python's \B never matches an empty string
        raise UnsupportedPattern(f"uses the anchor {str(code).lower()}")  # pragma: no cover - refused by _check

    def seq(self, items: Any, starts: int) -> int:
        """Positions where ``items`` can end, starting from any position in ``starts``."""
        for node in items:
            if not starts:
                return 0
            starts = self.node(node, starts)
        return starts

    def node(self, node: tuple[Any, Any], starts: int) -> int:
        self.steps += 1
        if self.steps > MAX_PATTERN_STEPS:
            raise UnsupportedPattern(f"needs more than {MAX_PATTERN_STEPS} steps to match a module name")
        op, av = node
        if op is sre.LITERAL:
            return (starts & self.chars(node, lambda ch: ord(ch) == av)) << 1
        if op is sre.NOT_LITERAL:
            return (starts & self.chars(node, lambda ch: ord(ch) != av)) << 1
        if op is sre.ANY:
            return (starts & self.chars(node, lambda ch: ch != "\n")) << 1
        if op is sre.IN:
            return (starts & self.chars(node, lambda ch: _in_class(ch, av))) << 1
        if op is sre.AT:
            return starts & self.at(av)
        if op is sre.SUBPATTERN:
            return self.seq(av[3], starts)
        if op is sre.BRANCH:
            out = 0
            for alt in av[1]:
                out |= self.seq(alt, starts)
            return out
        lo, hi, body = av  # MAX_REPEAT / MIN_REPEAT: laziness changes which match, not whether one exists
        for _ in range(lo):
            starts = self.seq(body, starts)
            if not starts:
                return 0
        reached, frontier, count = starts, starts, lo
        while frontier and (hi is sre.MAXREPEAT or count < hi):
            frontier = self.seq(body, frontier) & ~reached
            reached |= frontier
            count += 1
        return reached


def matches(compiled: Compiled, name: str) -> bool:
    """``re.match(rf"(.*\\.)?({key})$", name) is not None`` for the key ``compiled`` was made from."""
    if compiled.literal is not None:
        t = compiled.literal
        for end in (name, name[:-1] if name.endswith("\n") else None):
            if end is not None and end.endswith(t) and (end == t if compiled.anchored else _prefix_ok(end[: len(end) - len(t)])):
                return True
        return False
    if len(name) > MAX_PATTERN_SUBJECT:
        raise UnsupportedPattern(f"cannot be matched against a module name of {len(name)} characters (limit {MAX_PATTERN_SUBJECT})")
    return _Run(name).seq(compiled.tree, 1) != 0


def pattern_matches(key: str, name: str) -> bool:
    """:func:`matches` of :func:`compile_key` (``re.error`` / :class:`UnsupportedPattern` for a refused key)."""
    return matches(compile_key(key), name)
