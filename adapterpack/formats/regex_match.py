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
limits of spec §7.1. A :class:`KeySet` matches one pattern map's keys against many names under one
step budget (:data:`~adapterpack.limits.MAX_PATTERN_STEPS`), so the work a config can ask for is
bounded whatever the number of keys and modules.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from adapterpack.limits import MAX_PATTERN_DEPTH, MAX_PATTERN_LENGTH, MAX_PATTERN_REPEAT, MAX_PATTERN_STEPS, MAX_PATTERN_SUBJECT

try:  # Python 3.11+
    from re import _constants as sre  # type: ignore[attr-defined]
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # Python 3.10: the same modules under their old names
    import sre_constants as sre
    import sre_parse

#: Whether ``\B`` matches the empty string: Python 3.14 changed it, so ask the running ``re``.
_EMPTY_NON_BOUNDARY = re.fullmatch(r"\B", "") is not None
#: Keys that are fixed text (characters, ``\\.``, and ``.`` for any character but a newline), optionally after
#: ``^``: PEFT's usual form and :func:`~.patterns.build_patterns`' output, recognised without the parser.
_FIXED = re.compile(r"\^?(?:[^\\^$*+?{}\[\]|()]|\\\.)*")


class UnsupportedPattern(ValueError):
    """A key this matcher refuses (the message says why); ``key`` is the key when known, for the caller to name."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class Budget:
    """Steps left to one match, or to one pattern map's matches against all its module names (spec §7.1)."""

    def __init__(self) -> None:
        self.left = MAX_PATTERN_STEPS

    def charge(self, steps: int) -> None:
        self.left -= steps
        if self.left < 0:
            raise UnsupportedPattern(f"needs more than the {MAX_PATTERN_STEPS} steps one pattern map may take to match")


@dataclass(frozen=True)
class Compiled:
    """A key ready to match: literal text (``anchored`` at the start of the name), or a parsed tree."""

    literal: str | None
    anchored: bool
    tree: Any
    #: for a full match: the texts a pattern of literal alternatives (``(?:^a|^b|…)``) matches, looked up at once
    choices: frozenset[str] | None = None


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


def _group_depth(key: str) -> int:
    """How deeply ``key``'s parentheses nest (escapes and character classes skipped): at least its groups' depth."""
    depth = deepest = 0
    i, n = 0, len(key)
    while i < n:
        ch = key[i]
        if ch == "\\":
            i += 1
        elif ch == "[":  # a class ends at the first "]" not right after "[" or "[^"
            i += 2 if key.startswith("[^", i) else 1
            i += 1 if key.startswith("]", i) else 0
            while i < n and key[i] != "]":
                i += 2 if key[i] == "\\" else 1
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth = max(depth - 1, 0)
        i += 1
    return deepest


def _parse(key: str, wrapped: str, limit: int | None = MAX_PATTERN_LENGTH) -> Any:
    """The parse tree of ``wrapped`` (``key`` in its context), after the key's length and nesting limits."""
    if limit is not None and len(key) > limit:
        raise UnsupportedPattern(f"is {len(key)} characters long, over the limit of {MAX_PATTERN_LENGTH}")
    depth = _group_depth(key)
    if depth > MAX_PATTERN_DEPTH:
        raise UnsupportedPattern(f"nests groups {depth} deep, over the limit of {MAX_PATTERN_DEPTH}")
    try:
        tree = sre_parse.parse(wrapped)  # re.error for what re would refuse
        if tree.state.flags & ~sre.SRE_FLAG_UNICODE:
            raise UnsupportedPattern("sets regular-expression flags, which are not supported")
        _check(list(tree))
    except RecursionError:
        raise UnsupportedPattern("nests too deeply to be parsed") from None
    return tree


_MAX_CHOICES = 1 << 16  # texts a pattern of literal alternatives may expand to before the matcher is used instead


def _literal_choices(items: list[tuple[Any, Any]], start: bool = True) -> frozenset[str] | None:
    """The texts a parsed pattern matches in full when it is only literals and alternatives of them (``^`` allowed
    where nothing precedes it); None otherwise. The parser factors common prefixes out of alternatives, so
    ``(?:^a.b|^a.c)`` arrives as ``^``, ``a.``, then a branch of ``b`` and ``c``."""
    texts = {""}
    for op, av in items:
        if op is sre.LITERAL:
            texts = {t + chr(av) for t in texts}
        elif op is sre.AT and av in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING) and start and texts == {""}:
            continue
        elif (op is sre.SUBPATTERN and not av[1] and not av[2]) or op is sre.BRANCH:
            alts = [av[3]] if op is sre.SUBPATTERN else av[1]
            subs = [_literal_choices(list(alt), start and texts == {""}) for alt in alts]
            if any(sub is None for sub in subs):
                return None
            texts = {t + u for t in texts for sub in subs if sub is not None for u in sub}
        else:
            return None
        if len(texts) > _MAX_CHOICES:
            return None
    return frozenset(texts)


@functools.lru_cache(maxsize=64)
def compile_fullmatch(pattern: str) -> Compiled:
    """``pattern`` for ``re.fullmatch(pattern, text)`` (PEFT's rule for a string ``target_modules``), same refusals
    but no length limit: such a pattern lists every adapted module (bounded by the file holding it), and
    literal alternatives, which is what writers produce, are matched by one look-up."""
    alone = _parse(pattern, pattern, limit=None)  # alone first: "a)(b" must be re.error, as re.fullmatch has it
    choices = _literal_choices(list(alone))
    return Compiled(None, False, None if choices is not None else _parse(pattern, rf"(?:{pattern})\Z", limit=None), choices)


def fullmatches(compiled: Compiled, text: str, budget: Budget) -> bool:
    """``re.fullmatch(pattern, text) is not None`` for the pattern ``compiled`` was made from, charged to ``budget``."""
    if compiled.choices is not None:
        budget.charge(1)
        return text in compiled.choices
    _check_subject(text)
    return _Run(text, budget).match(compiled)


@functools.lru_cache(maxsize=4096)
def compile_key(key: str) -> Compiled:
    """Parse ``key`` as PEFT uses it; :class:`UnsupportedPattern` (or ``re.error``) when it cannot be matched here."""
    tree = _parse(key, rf"(.*\.)?({key})$")
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
    """Matches against one subject: its per-character position masks, and the budget it charges."""

    def __init__(self, text: str, budget: Budget) -> None:
        budget.charge(len(text) + 1)
        self.budget = budget
        self.n = len(text)
        self.final_newline = text.endswith("\n")
        self.all = (1 << (self.n + 1)) - 1
        self.where: dict[str, int] = {}  # character -> bit i set where text[i] is that character
        for i, ch in enumerate(text):
            self.where[ch] = self.where.get(ch, 0) | 1 << i
        self.text_bits = self.all >> 1  # bit i set for every character position i
        self.masks: dict[Any, int] = {}

    def chars(self, key: Any, pred: Callable[[str], bool]) -> int:
        """Bit i set when character i satisfies ``pred`` (cached under ``key``; one step per distinct character)."""
        if key not in self.masks:
            self.budget.charge(len(self.where))
            self.masks[key] = sum(bits for ch, bits in self.where.items() if pred(ch))
        return self.masks[key]

    def char_mask(self, node: tuple[Any, Any]) -> int:
        """Bit i set when character i matches the one-character node ``node``."""
        op, av = node
        if op is sre.LITERAL:
            return self.where.get(chr(av), 0)
        if op is sre.NOT_LITERAL:
            return self.text_bits & ~self.where.get(chr(av), 0)
        if op is sre.ANY:
            return self.text_bits & ~self.where.get("\n", 0)
        return self.chars(id(node), lambda ch: _in_class(ch, av))

    def at(self, code: Any) -> int:
        """Positions where the anchor ``code`` holds."""
        n = self.n
        if code in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING):
            return 1
        if code is sre.AT_END:  # end, or just before a final newline
            return 1 << n | (1 << (n - 1) if self.final_newline else 0)
        if code is sre.AT_END_STRING:
            return 1 << n
        word = self.chars("word", _is_word)
        bounds = (word ^ (word << 1)) & self.all  # position i: is text[i - 1] a word character != is text[i]
        if code is sre.AT_BOUNDARY:
            return bounds
        if code is sre.AT_NON_BOUNDARY:
            return (1 if _EMPTY_NON_BOUNDARY else 0) if n == 0 else self.all & ~bounds
        raise UnsupportedPattern(f"uses the anchor {str(code).lower()}")  # pragma: no cover - refused by _check

    def seq(self, items: Any, starts: int) -> int:
        """Positions where ``items`` can end, starting from any position in ``starts``."""
        for node in items:
            if not starts:
                return 0
            starts = self.node(node, starts)
        return starts

    def node(self, node: tuple[Any, Any], starts: int) -> int:
        self.budget.charge(1)
        op, av = node
        if op in _ONE_CHAR:
            return (starts & self.char_mask(node)) << 1
        if op is sre.AT:
            return starts & self.at(av)
        if op is sre.SUBPATTERN:
            return self.seq(av[3], starts)
        if op is sre.BRANCH:
            self.budget.charge(len(av[1]))
            out = 0
            for alt in av[1]:
                out |= self.seq(alt, starts)
            return out
        lo, hi, body = av  # MAX_REPEAT / MIN_REPEAT: laziness changes which match, not whether one exists
        for _ in range(lo):
            after = self.seq(body, starts)
            if after == starts:  # a fixed point (a zero-width body): more repetitions change nothing
                break
            starts = after
            if not starts:
                return 0
        if hi is sre.MAXREPEAT and len(body) == 1 and body[0][0] in _ONE_CHAR:
            # every run of matching characters from a start, at once: the carry of m + x runs through each run
            m = self.char_mask(body[0])
            return starts | ((m + (starts & m)) ^ m)
        reached, frontier, count = starts, starts, lo
        while frontier and (hi is sre.MAXREPEAT or count < hi):
            frontier = self.seq(body, frontier) & ~reached
            reached |= frontier
            count += 1
        return reached

    def match(self, compiled: Compiled) -> bool:
        try:
            return self.seq(compiled.tree, 1) != 0
        except RecursionError:
            raise UnsupportedPattern("nests too deeply to be matched") from None


_ONE_CHAR = {sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN}


def _literal_matches(text: str, anchored: bool, name: str) -> bool:
    """Whether the key that is the literal ``text`` (after ``^`` when ``anchored``) matches ``name`` by PEFT's rule."""
    for end in (name, name[:-1] if name.endswith("\n") else None):
        if end is not None and end.endswith(text) and (end == text if anchored else _prefix_ok(end[: len(end) - len(text)])):
            return True
    return False


def _check_subject(name: str) -> None:
    if len(name) > MAX_PATTERN_SUBJECT:
        raise UnsupportedPattern(f"cannot be matched against a module name of {len(name)} characters (limit {MAX_PATTERN_SUBJECT})")


def matches(compiled: Compiled, name: str, budget: Budget | None = None) -> bool:
    """``re.match(rf"(.*\\.)?({key})$", name) is not None`` for the key ``compiled`` was made from."""
    if compiled.literal is not None:
        return _literal_matches(compiled.literal, compiled.anchored, name)
    _check_subject(name)
    return _Run(name, budget or Budget()).match(compiled)


def pattern_matches(key: str, name: str) -> bool:
    """:func:`matches` of :func:`compile_key` (``re.error`` / :class:`UnsupportedPattern` for a refused key)."""
    return matches(compile_key(key), name)


class KeySet:
    """One pattern map's keys, in order, matched against module names under one :class:`Budget`.

    Keys of fixed text (:data:`_FIXED`) are grouped by length and by where their ``.`` wildcards are, and
    found by one dictionary look-up per group (a name's work does not grow with their number); the other
    keys are compiled when first reached and matched in order. Answers are kept per name.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = list(keys)
        self.budget = Budget()
        # (anchored, length, wildcard positions) -> {text with "." at the wildcards: index of the first such key}
        self.fixed: dict[tuple[bool, int, tuple[int, ...]], dict[str, int]] = {}
        self.others: list[int] = []  # indices of the keys that need the parser
        for i, key in enumerate(self.keys):
            if len(key) > MAX_PATTERN_LENGTH or not _FIXED.fullmatch(key):
                self.others.append(i)
                continue
            anchored = key.startswith("^")
            parts = key[anchored:].split("\\.")
            wild, offset = [], 0
            for part in parts:
                wild += [offset + m.start() for m in re.finditer(r"\.", part)]
                offset += len(part) + 1
            self.budget.charge(1 + len(wild))
            text = ".".join(parts)
            self.fixed.setdefault((anchored, len(text), tuple(wild)), {}).setdefault(text, i)
        self.compiled: dict[int, Compiled] = {}
        self.answers: dict[str, str | None] = {}

    def _first_fixed(self, name: str) -> int:
        """Index of the first fixed-text key matching ``name`` (``len(keys)`` when none does)."""
        best = len(self.keys)
        for end in (name, name[:-1] if name.endswith("\n") else None):
            if end is None:
                continue
            newline = end.find("\n") % (len(end) + 1)  # the first newline, len(end) when none: no prefix may hold one
            for (anchored, length, wild), texts in self.fixed.items():
                self.budget.charge(1 + len(wild))
                s = len(end) - length
                if s < 0 or (s > 0 and (anchored or end[s - 1] != "." or newline < s)):
                    continue
                text = end[s:]
                if any(text[j] == "\n" for j in wild):
                    continue
                if wild:  # the wildcards' characters replaced by "." as in the keys' texts
                    text = ".".join(text[a + 1 : b] for a, b in zip((-1, *wild), (*wild, length)))
                best = min(best, texts.get(text, best))
        return best

    def _compile(self, i: int) -> Compiled:
        if i not in self.compiled:
            key = self.keys[i]
            self.budget.charge(len(key) + 1)
            try:
                self.compiled[i] = compile_key(key)
            except re.error as e:
                raise UnsupportedPattern(f"is not a valid regular expression ({e})", key) from None
        return self.compiled[i]

    def first_match(self, name: str) -> str | None:
        """The first key matching ``name`` by PEFT's rule, or None; :class:`UnsupportedPattern` (with ``key``)
        for a refused key reached before it, or when the budget runs out."""
        if name in self.answers:
            return self.answers[name]
        key = None
        try:
            best = self._first_fixed(name)
            run = None
            for i in self.others:
                if i > best:
                    break
                key = self.keys[i]
                compiled = self._compile(i)
                if compiled.literal is not None:
                    hit = _literal_matches(compiled.literal, compiled.anchored, name)
                else:
                    _check_subject(name)
                    run = run or _Run(name, self.budget)
                    hit = run.match(compiled)
                if hit:
                    best = i
                    break
        except UnsupportedPattern as e:
            raise UnsupportedPattern(str(e), e.key or key) from None
        self.answers[name] = self.keys[best] if best < len(self.keys) else None
        return self.answers[name]
