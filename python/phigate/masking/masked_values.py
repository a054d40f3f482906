"""Which values a masked column can show, so a comparison with a constant can be told apart
from one that can never match (``masked_values(column, mask)``).

A masked identity's statements compare masked values (the rewrite masks at the source), so
``last_name = 'Harris'`` on a pseudonymized column matches nothing: every value is ``psn_`` and
16 hex digits. An agent that does not know draws a wrong conclusion ("no patient named
Harris"); the policy engine tells it with a notice (comparison_notices.py) when the constant
cannot be a masked value. The answer must never be "cannot" for a constant that could match:
"could" is the safe side (no notice).

Text masks are small automata over characters, checked against the constant or against a
LIKE / ILIKE pattern or a regular expression simple enough to read as one (literal characters,
``.``, ``.*``, ``.+``, ``^``, ``$``); anything else in a pattern answers "could". The masks'
shapes mirror mask_sql.py (layer 1) and the data plane: pseudonym ``psn_`` + 16 lower-case hex
digits (text; integer pseudonyms can be any number), partial:N (letters and digits only in the
last N characters; all masked when the value has N or fewer), redact (``***`` for text, a
constant of the type otherwise), null (no value), year (January 1; dates and timestamps
without time zone), email_domain (``***`` or ``***@`` + the domain), zip3 (three digits and
``**``, or ``***``). free_text and masks that fall back to another type's placeholder in ways
not modelled here answer "could".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation

from phigate.masking.catalog_protocols import ColumnLike

__all__ = [
    "Constant",
    "MaskedValues",
    "Pattern",
    "like_pattern",
    "masked_values",
    "regex_pattern",
]

#: A constant of a statement as the parser gives it: text, an integer, a decimal's text
#: (as Decimal) or a boolean.
Constant = str | int | Decimal | bool

_TEXT_OIDS = frozenset({25, 1043, 1042, 19})  # text, varchar, bpchar, name
_BPCHAR = 1042
_INTEGER_PSEUDONYMS = frozenset({20, 21, 23, 1700})  # mask_sql._INT_HEX
_NUMBER_OIDS = frozenset({20, 21, 23, 26, 700, 701, 790, 1700})  # mask_sql._NUMBER_OIDS
_DATE, _TIMESTAMP, _BOOL = 1082, 1114, 16
_MAX_PATTERN = 1000  # characters; a longer pattern answers "could" (bounded work)

# A pattern token: a character, "one" character (LIKE _ / regex .) or "any" run (% / .*).
_Token = tuple[str, str]
#: A LIKE pattern or simple regular expression as tokens.
Pattern = list[_Token]
_ONE: _Token = ("one", "")
_ANY: _Token = ("any", "")


class MaskedValues:
    """The values one masked column can show. Every method answers True ("could") unless the
    constant or pattern certainly meets none of them."""

    def could_equal(self, value: Constant) -> bool:  # noqa: ARG002 - the base knows nothing
        return True

    def could_match(self, tokens: Sequence[_Token], case_insensitive: bool) -> bool:  # noqa: ARG002
        return True

    def could_be_between(self, low: Constant, high: Constant) -> bool:  # noqa: ARG002
        return True


@dataclass(frozen=True)
class _Automaton(MaskedValues):
    """Text values: an automaton whose edges test one character."""

    edges: tuple[tuple[tuple[Callable[[str], bool], int], ...], ...]
    accept: frozenset[int]
    padded: bool = False  # bpchar: comparisons ignore trailing blanks
    folded: bool = False  # citext: comparisons ignore case

    def could_equal(self, value: Constant) -> bool:
        if not isinstance(value, str):
            return True  # the server may reject it or convert it: not a text comparison
        text = value.rstrip(" ") if self.padded else value
        if len(text) > _MAX_PATTERN:
            return True
        return self.could_match([("char", ch) for ch in text], self.folded)

    def could_match(self, tokens: Sequence[_Token], case_insensitive: bool) -> bool:
        if len(tokens) > _MAX_PATTERN:
            return True
        start = (0, 0)
        seen = {start}
        todo = [start]
        while todo:
            i, state = todo.pop()
            if i == len(tokens):
                if state in self.accept:
                    return True
                continue
            kind, ch = tokens[i]
            nxt: list[tuple[int, int]] = []
            if kind == "any":
                nxt.append((i + 1, state))  # matches nothing more
                nxt += [(i, to) for _, to in self.edges[state]]  # or one character more
            elif kind == "one":
                nxt += [(i + 1, to) for _, to in self.edges[state]]
            else:
                forms = {ch, ch.lower(), ch.upper()} if case_insensitive else {ch}
                nxt += [(i + 1, to) for test, to in self.edges[state] if any(map(test, forms))]
            for pair in nxt:
                if pair not in seen:
                    seen.add(pair)
                    todo.append(pair)
        return False


@dataclass
class _Builder:
    edges: list[list[tuple[Callable[[str], bool], int]]] = field(default_factory=lambda: [[]])
    accept: set[int] = field(default_factory=set)

    def state(self) -> int:
        self.edges.append([])
        return len(self.edges) - 1

    def edge(self, a: int, test: Callable[[str], bool], b: int) -> None:
        self.edges[a].append((test, b))

    def chain(self, a: int, tests: Sequence[Callable[[str], bool]]) -> int:
        """States reading ``tests`` one after the other from ``a``; the last state."""
        for test in tests:
            b = self.state()
            self.edge(a, test, b)
            a = b
        return a

    def done(self, column: ColumnLike) -> _Automaton:
        return _Automaton(
            tuple(tuple(e) for e in self.edges),
            frozenset(self.accept),
            padded=column.type_oid == _BPCHAR,
            folded=column.type_name in ("citext", "public.citext"),
        )


def _is(ch: str) -> Callable[[str], bool]:
    return lambda c: c == ch


def _hex(c: str) -> bool:
    return c in "0123456789abcdef"


def _digit(c: str) -> bool:
    return c in "0123456789"


def _any(c: str) -> bool:  # noqa: ARG001 - every character
    return True


def _masked_char(c: str) -> bool:
    # partial:N leaves no letter or digit before the last N characters (Rust is_alphanumeric).
    return not c.isalnum()


def _pseudonym(column: ColumnLike) -> _Automaton:
    b = _Builder()
    b.accept.add(b.chain(0, [_is("p"), _is("s"), _is("n"), _is("_")] + [_hex] * 16))
    return b.done(column)


def _constant_text(column: ColumnLike, text: str) -> _Automaton:
    b = _Builder()
    b.accept.add(b.chain(0, [_is(ch) for ch in text]))
    return b.done(column)


def _partial(column: ColumnLike, keep: int) -> _Automaton:
    # Values of N characters or fewer are masked whole; longer ones keep their last N.
    b = _Builder()
    head = b.state()
    b.accept |= {0, head}
    b.edge(0, _masked_char, head)
    b.edge(head, _masked_char, head)
    if keep > 0:
        b.accept.add(b.chain(head, [_any] * keep))
    return b.done(column)


def _email_domain(column: ColumnLike) -> _Automaton:
    b = _Builder()
    stars = b.chain(0, [_is("*")] * 3)
    domain = b.state()
    b.accept |= {stars, domain}
    b.edge(stars, _is("@"), domain)
    b.edge(domain, lambda c: c != "@", domain)
    return b.done(column)


def _zip3(column: ColumnLike) -> _Automaton:
    b = _Builder()
    b.accept.add(b.chain(0, [_digit] * 3 + [_is("*")] * 2))
    b.accept.add(b.chain(0, [_is("*")] * 3))
    return b.done(column)


@dataclass(frozen=True)
class _Values(MaskedValues):
    """A column of another type whose masked values are these few (redact's placeholder), or
    none at all (null)."""

    values: tuple[date | Decimal | bool, ...]
    parse: Callable[[Constant], date | Decimal | bool | None]

    def could_equal(self, value: Constant) -> bool:
        parsed = self.parse(value)
        return parsed is None or parsed in self.values

    def could_be_between(self, low: Constant, high: Constant) -> bool:
        lo, hi = self.parse(low), self.parse(high)
        if lo is None or hi is None or type(lo) is bool or type(hi) is bool:
            return True
        return any(lo <= v <= hi for v in self.values if type(v) is type(lo))  # type: ignore[operator]


@dataclass(frozen=True)
class _Years(MaskedValues):
    """year: January 1 (midnight for timestamps) of the value's year; infinity stays."""

    timestamp: bool

    def _parse(self, value: Constant) -> date | None:
        return _timestamp(value) if self.timestamp else _date(value)

    def _first_day(self, d: date) -> bool:
        if (d.month, d.day) != (1, 1):
            return False
        return not isinstance(d, datetime) or d.time() == datetime.min.time()

    def could_equal(self, value: Constant) -> bool:
        parsed = self._parse(value)
        return parsed is None or self._first_day(parsed)

    def could_be_between(self, low: Constant, high: Constant) -> bool:
        lo, hi = self._parse(low), self._parse(high)
        if lo is None or hi is None:
            return True
        first = lo if self._first_day(lo) else date(lo.year + 1, 1, 1) if lo.year < 9999 else None
        if first is None:
            return False
        if self.timestamp and not isinstance(first, datetime):
            first = datetime(first.year, 1, 1)
        return first <= hi


class _NoValue(MaskedValues):
    """null: every value shows as NULL, which no comparison matches."""

    def could_equal(self, value: Constant) -> bool:  # noqa: ARG002
        return False

    def could_match(self, tokens: Sequence[_Token], case_insensitive: bool) -> bool:  # noqa: ARG002
        return False

    def could_be_between(self, low: Constant, high: Constant) -> bool:  # noqa: ARG002
        return False


_DATE_RE = re.compile(r"\s*(\d{4})-(\d{2})-(\d{2})\s*")
_TIMESTAMP_RE = re.compile(
    r"\s*(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?)?\s*"
)


def _date(value: Constant) -> date | None:
    """A date constant in ISO form (the one form every DateStyle reads alike), else None."""
    m = _DATE_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        return None
    try:
        return date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None


def _timestamp(value: Constant) -> datetime | None:
    m = _TIMESTAMP_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        return None
    try:
        return datetime(
            int(m[1]), int(m[2]), int(m[3]), int(m[4] or 0), int(m[5] or 0), int(m[6] or 0),
            int((m[7] or "0").ljust(6, "0")),
        )  # fmt: skip
    except ValueError:
        return None


def _number(value: Constant) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | Decimal):
        return Decimal(value)
    try:
        return Decimal(value.strip())
    except InvalidOperation:
        return None


def _boolean(value: Constant) -> bool | None:
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("t", "true", "y", "yes", "on", "1"):
        return True
    if text in ("f", "false", "n", "no", "off", "0"):
        return False
    return None


def _redact(column: ColumnLike) -> MaskedValues:
    """redact's placeholder per type (mask_sql._redact); other types answer "could"."""
    if column.type_name.endswith("]"):
        return MaskedValues()  # arrays: '{}' -- comparisons with arrays are not modelled
    if column.type_oid in _TEXT_OIDS or column.type_name in ("citext", "public.citext"):
        return _constant_text(column, "***")
    if column.type_oid in _NUMBER_OIDS:
        return _Values((Decimal(0),), _number)
    if column.type_oid == _DATE:
        return _Values((date(1900, 1, 1),), _date)
    if column.type_oid == _TIMESTAMP:
        return _Values((datetime(1900, 1, 1),), _timestamp)
    if column.type_oid == _BOOL:
        return _Values((False,), _boolean)
    return MaskedValues()


def masked_values(column: ColumnLike, mask: str) -> MaskedValues:
    """The values ``column`` can show under ``mask`` ("pseudonym", "partial:4", ...)."""
    text = column.type_oid in _TEXT_OIDS or column.type_name in ("citext", "public.citext")
    name, _, arg = mask.partition(":")
    if name == "null":
        return _NoValue()
    if name == "free_text":
        return MaskedValues()  # the detectors leave most of the text as it is
    if name == "pseudonym" and column.type_oid in _INTEGER_PSEUDONYMS:
        return MaskedValues()  # a number computed from the value: any number could be one
    if text:
        if name == "pseudonym":
            return _pseudonym(column)
        if name == "partial" and arg.isdigit():
            return _partial(column, int(arg))
        if name == "email_domain":
            return _email_domain(column)
        if name == "zip3":
            return _zip3(column)
        if name == "redact":
            return _redact(column)
        return MaskedValues()
    if name == "year" and column.type_oid in (_DATE, _TIMESTAMP):
        return _Years(timestamp=column.type_oid == _TIMESTAMP)
    if name == "year" and column.type_oid == 1184:
        return MaskedValues()  # timestamptz: January 1 in the session's time zone
    # Text masks on other types and year on non-dates fall back to redact (mask_sql.py).
    return _redact(column)


def like_pattern(pattern: str) -> Pattern | None:
    """A LIKE pattern (default escape character) as tokens; None when PostgreSQL would reject
    it (a trailing escape character)."""
    out: list[_Token] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            if i + 1 >= len(pattern):
                return None
            out.append(("char", pattern[i + 1]))
            i += 2
            continue
        out.append(_ANY if ch == "%" else _ONE if ch == "_" else ("char", ch))
        i += 1
    return out


_REGEX_SPECIAL = frozenset("^$.*+?()[]{}|\\")


def regex_pattern(pattern: str) -> Pattern | None:
    """A regular expression that is only literal characters, ``.``, ``.*``, ``.+`` and the
    anchors ``^`` (first) and ``$`` (last), as tokens of an unanchored search; None for any
    other (phigate does not decide what those can match)."""
    body = pattern
    start = body.startswith("^")
    body = body[1:] if start else body
    end = body.endswith("$") and not body.endswith("\\$")
    body = body[:-1] if end else body
    out: list[_Token] = [] if start else [_ANY]
    i = 0
    while i < len(body):
        ch = body[i]
        after = body[i + 1] if i + 1 < len(body) else ""
        if ch == "\\":
            if not after or after.isalnum() or after.isspace():
                return None  # class escapes (\d, \m, \y ...) and back references
            ch, i = after, i + 1
            after = body[i + 1] if i + 1 < len(body) else ""
            token: _Token = ("char", ch)
        elif ch == ".":
            token = _ONE
        elif ch in _REGEX_SPECIAL:
            return None
        else:
            token = ("char", ch)
        if after in ("*", "+"):
            if token != _ONE:
                return None
            out += [_ANY] if after == "*" else [_ONE, _ANY]
            i += 2
            continue
        if after in ("?", "{"):
            return None
        out.append(token)
        i += 1
    if not end:
        out.append(_ANY)
    return out
