"""Layer 1 of PHI masking: splice masking subqueries in place of protected relations.

``rewrite(sql, catalog, clear_kinds, masks, schema=...)`` replaces every reference to a
protected relation (one with a classified column whose kind the identity does not see in clear) by

    (SELECT "id", <mask of ssn> AS "ssn", ... FROM "public"."patients") alias

keeping every column, its name, order and type, and the reference's alias (the table name when
there was none, so ``patients.ssn`` still resolves). Predicates, joins, grouping, functions,
casts, error messages and COPY then only ever see masked values: inference through WHERE or an
error message stops at the source.

The subquery is spliced at the RangeVar's location in the original text; the statement is never
deparsed, so literals, parameters ($1), comments and formatting elsewhere stay byte-identical.
The span of a reference is found by re-lexing from its location: schema-qualified and quoted
names, ``ONLY name`` / ``ONLY (name)``, the ``name *`` inheritance suffix and the ``TABLE name``
shorthand (turned into ``SELECT * FROM (...) name``).

Fail closed: a protected relation referenced anywhere the walker does not know how to mask
(a RangeVar in an unexpected place, TABLESAMPLE, row locking, functions that run SQL from a
string, writes that would copy masked values, the clear target row of UPDATE/DELETE/INSERT
... ON CONFLICT in WHERE/SET/RETURNING, creating objects from protected relations, DO blocks
and function bodies) refuses the whole string with a reason that names relations, columns and
clauses -- never a literal value from the statement.

The caller (policy/engine.py) decides when an identity is masked and passes the catalog
snapshot, the kinds it sees in clear, the target's pinned schema and ``masks``: the detector
patterns as SQL, built once per configuration by ``mask_sql``, and whether the target's pseudonym
functions are ready. Each mask yields what layer 2 (the Rust data plane) yields for the same
value; see the masks section.

Pseudonyms are computed by calling ``phigate.pseudonym`` / ``phigate.pseudonym_int``, which
`phigate db install` puts in the database with the key (pseudonym_db.py): no key material is
ever part of a rewritten statement, so server logs, activity views and plans cannot show it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from pglast import parser as _pg_parser

from phigate.policy.functions import never_reason
from phigate.policy.pg_names import unqualified_relation

__all__ = [
    "CatalogLike",
    "ColumnLike",
    "ColumnRuleLike",
    "DetectorConfigLike",
    "MaskSQL",
    "RelationLike",
    "RewriteResult",
    "mask_expression",
    "mask_sql",
    "postgres_regex",
    "rewrite",
]

log = logging.getLogger(__name__)


# --- what the rewrite needs from the catalog ----------------------------------------------------


class ColumnRuleLike(Protocol):
    """A classified column's rule: PHI ``kind`` and ``mask`` ("redact", "null", "partial:N" --
    or "partial" with ``keep`` = N --, "year", "email_domain", "pseudonym", "free_text")."""

    @property
    def kind(self) -> str: ...

    @property
    def mask(self) -> str: ...


class ColumnLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def type_oid(self) -> int: ...

    @property
    def type_name(self) -> str: ...  # format_type(atttypid, atttypmod): valid in a CAST

    @property
    def rule(self) -> ColumnRuleLike | None: ...


class RelationLike(Protocol):
    @property
    def columns(self) -> Sequence[ColumnLike]: ...  # in attnum order, dropped columns left out


class CatalogLike(Protocol):
    def relation(self, schema: str, name: str) -> RelationLike | None: ...


@dataclass(frozen=True, slots=True)
class RewriteResult:
    """``sql`` is the statement to send (the original string object when nothing changed);
    ``masked_columns`` are "schema.table.column" of every masked column the statement can
    reach; ``refuse`` is why the statement must be refused instead (then ``sql`` is the
    original and must not be sent), with ``sqlstate`` and, when the remedy is not the
    client's, a ``hint``."""

    sql: str
    changed: bool
    masked_columns: list[str] = field(default_factory=list)
    refuse: str | None = None
    sqlstate: str = "42501"
    hint: str | None = None


# --- masks -------------------------------------------------------------------------------------
#
# Layer 2 (native/src/masking.rs: text_mask, MaskContext::pseudonym; native/src/detectors.rs)
# masks what leaves the server. Every mask here computes what layer 2 computes for the same
# value in text format (ISO DateStyle; UTC for timestamptz), so a result is the same whichever
# layer masked it, and layer 2, whose masks are idempotent, leaves layer-1 output as it is.
# tests/test_rewrite_pg.py checks each mask on the server against a Python model of layer 2.

_TEXT_OIDS = frozenset({25, 1043, 1042, 19})  # text, varchar, bpchar, name
_BPCHAR = 1042
_NUMERIC = 1700
# Integer pseudonyms: the first N hex digits of the HMAC as an unsigned integer, N chosen so
# every value fits the type (int2: 12 bits, int4: 28, int8: 60). numeric gets 15 digits, fewer
# when its typmod allows fewer integer digits (see _int_hex_digits).
_INT_HEX = {21: 3, 23: 7, 20: 15, _NUMERIC: 15}
_NUMBER_OIDS = frozenset({20, 21, 23, 26, 700, 701, 790, 1700})
# Layer 2's redact placeholders (masking.rs placeholder(), text format) as SQL constants.
_REDACT_BY_OID: dict[int, str] = {
    16: "false",
    18: "'*'",  # "char"
    1082: "'1900-01-01'",
    1114: "'1900-01-01 00:00:00'",
    1184: "'1900-01-01 00:00:00+00'",
    1083: "'00:00:00'",
    1266: "'00:00:00+00'",
    1186: "'0'",
    2950: "'00000000-0000-0000-0000-000000000000'",
    114: "'\"***\"'",
    3802: "'\"***\"'",
    17: "''",
    869: "'0.0.0.0'",
    650: "'0.0.0.0/0'",
    829: "'00:00:00:00:00:00'",
}
_DATE_OIDS = frozenset({1082, 1114, 1184})

_PARTIAL = re.compile(r"partial:([0-9]{1,3})")
_NUMERIC_TYPMOD = re.compile(r"numeric\((\d+)(?:,(-?\d+))?\)")

# partial:N turns the letters and digits before the last N characters into '*' and keeps
# everything else in place (Rust: char::is_alphanumeric, i.e. Unicode Alphabetic or Nd/Nl/No).
# PostgreSQL's [[:alnum:]] cannot stand in for it: it follows the column's collation, and
# under the C collation (phigate's embedded server, many production ones) it is ASCII only --
# 'é', 'ß', 'Ω', '中', '٣', '²' would stay in clear; under libc or ICU locales it differs from
# Rust in other places (other scripts' digits, marks), and PostgreSQL 17's pg_c_utf8 (not on
# older servers) leaves '٣', '²', '½' out. So the rewrite names, by code point,
# the characters it *keeps*: the exact complement of Rust's is_alphanumeric (Rust 1.95,
# Unicode 16) over U+0001-U+052F (Latin, IPA, combining marks, Greek, Cyrillic), General
# Punctuation, Currency Symbols and CJK Symbols and Punctuation. Every other character is
# masked. Both layers agree on all text made of those blocks plus letters and digits of any
# script; the one difference left is fail-closed: a non-alphanumeric character outside those
# blocks (emoji, arrows, math symbols, fullwidth punctuation) before the last N becomes '*'
# here and stays in layer 2. Layer 2 leaves that output unchanged ('*' is not alphanumeric).
_PARTIAL_KEEP: tuple[tuple[int, int], ...] = (
    (0x0001, 0x002F), (0x003A, 0x0040), (0x005B, 0x0060), (0x007B, 0x00A9), (0x00AB, 0x00B1),
    (0x00B4, 0x00B4), (0x00B6, 0x00B8), (0x00BB, 0x00BB), (0x00BF, 0x00BF), (0x00D7, 0x00D7),
    (0x00F7, 0x00F7), (0x02C2, 0x02C5), (0x02D2, 0x02DF), (0x02E5, 0x02EB), (0x02ED, 0x02ED),
    (0x02EF, 0x0344), (0x0346, 0x0362), (0x0375, 0x0375), (0x0378, 0x0379), (0x037E, 0x037E),
    (0x0380, 0x0385), (0x0387, 0x0387), (0x038B, 0x038B), (0x038D, 0x038D), (0x03A2, 0x03A2),
    (0x03F6, 0x03F6), (0x0482, 0x0489), (0x2000, 0x206F), (0x20A0, 0x20CF), (0x3000, 0x3004),
    (0x3008, 0x3020), (0x302A, 0x3030), (0x3036, 0x3037), (0x303D, 0x303F),
)  # fmt: skip


def _lit(text: str) -> str:
    # phigate's own constants and _sql_text's pieces: standard_conforming_strings-proof
    # because none holds a backslash.
    assert "\\" not in text
    return "'" + text.replace("'", "''") + "'"


def _sql_text(text: str) -> str:
    """A SQL text expression equal to ``text`` (printable ASCII) whose statement text holds no
    backslash, so it means the same whatever standard_conforming_strings says: backslashes
    are put back by replace(..., chr(92)), which the planner folds into a constant."""
    if not all(" " <= ch <= "~" for ch in text):
        raise ValueError("phigate builds SQL text from printable ASCII only")
    if "\\" not in text:
        return _lit(text)
    ph = next((ch for ch in "~!#%&`@;:=" if ch not in text), None)
    if ph is None:  # every stand-in is taken: spell each backslash as chr(92)
        return "(" + " || pg_catalog.chr(92) || ".join(_lit(p) for p in text.split("\\")) + ")"
    body = _lit(text.replace("\\", ph))
    return f"pg_catalog.replace({body}, {_lit(ph)}, pg_catalog.chr(92))"


def _u(cp: int) -> str:
    # An ARE escape: one character by code point (the short form for the BMP).
    return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"


_KEEP_SQL = _sql_text(
    "[^" + "".join(_u(a) if a == b else f"{_u(a)}-{_u(b)}" for a, b in _PARTIAL_KEEP) + "]"
)


# --- free-text detectors, as PostgreSQL regular expressions --------------------------------------
#
# The same detectors and tags as native/src/detectors.rs, in PostgreSQL's ARE dialect. Layer 2
# resolves overlapping hits on the original text; here the replacements run one after the
# other, emails first (their local part may look like a phone number). Tags hold no digit and
# no '@', so no later built-in detector matches inside one. The Rust detectors check "no
# digit on either side" after matching; the lookarounds below say the same.

_EMAIL_RE = "[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+([.][A-Za-z0-9-]+)*[.][A-Za-z]{2,}[[:>:]]"
_DEFAULT_MRN_RE = "(?<![0-9])MRN-[0-9]{7}(?![0-9])"  # detectors.rs DEFAULT_MRN_PATTERN
# "MRN" followed by digits in any spelling ("MRN 0012345", "mrn: 12345"): layer 2's default
# MRN pattern (detectors.rs DEFAULT_MRN_PATTERN); kept even when mrn_pattern is configured,
# since masking more than layer 2 never shows a value layer 2 would hide.
_MRN_KEYWORD_RE = "mrn[-: #]*[0-9]{4,}"
_SSN_RE = "(?<![0-9])[0-9]{3}[- ][0-9]{2}[- ][0-9]{4}(?![0-9])"
_PHONE_RE = (
    "(?<![0-9])([+]?1[-. ]?)?([(][0-9]{3}[)][-. ]?|[0-9]{3}[-. ])[0-9]{3}[-. ][0-9]{4}(?![0-9])"
)
# A birth keyword, up to 40 characters without digits or newline, then a date: only the date
# is replaced ("DOB: [DOB]"), as layer 2 does; a lookbehind instead of layer 2's capture group.
_MONTH = "(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*[.]?"
_DOB_RE = (
    "(?<=[[:<:]](dob|d[.]o[.]b|date[[:space:]]+of[[:space:]]+birth|birth[[:space:]]*date"
    "|birthday|born)[^0-9\\n]{0,40})("
    "[0-9]{1,2}[-/.][0-9]{1,2}[-/.][0-9]{2,4}"
    "|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}"
    f"|{_MONTH}[[:space:]]+[0-9]{{1,2}}(st|nd|rd|th)?,?[[:space:]]+[0-9]{{4}}"
    f"|[0-9]{{1,2}}(st|nd|rd|th)?[[:space:]]+(of[[:space:]]+)?{_MONTH},?[[:space:]]+[0-9]{{4}}"
    ")[[:>:]]"
)

# Rust regex escapes and their ARE spelling. \d \s \w are Unicode-aware in Rust and follow the
# collation in PostgreSQL (ASCII under C): configured patterns match ASCII text alike.
_ESCAPES = {
    "d": "\\d", "D": "\\D", "s": "\\s", "S": "\\S", "w": "\\w", "W": "\\W",
    "b": "\\y", "B": "\\Y", "A": "\\A", "z": "\\Z",
    "n": "\\n", "t": "\\t", "r": "\\r", "f": "\\f", "v": "\\v",
}  # fmt: skip
_CLASS_ESCAPES = frozenset("dswntrfv")  # the ones ARE also accepts inside brackets
_POSIX_CLASSES = frozenset({
    "alnum", "alpha", "ascii", "blank", "cntrl", "digit", "graph", "lower", "print", "punct",
    "space", "upper", "word", "xdigit",
})  # fmt: skip
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_QUANTIFIER = re.compile(r"\{(\d*)(,?)(\d*)\}")


def _code_point(p: str, i: int) -> tuple[int, int]:
    """The code point of a Rust \\x / \\u / \\U escape whose letter is at ``p[i]``, and the
    index after it."""
    width = {"x": 2, "u": 4, "U": 8}[p[i]]
    if p[i + 1 : i + 2] == "{":
        end = p.find("}", i + 2)
        digits = p[i + 2 : end] if end > 0 else ""
        nxt = end + 1
    else:
        digits = p[i + 1 : i + 1 + width]
        nxt = i + 1 + width
    if not digits or len(digits) > 8 or not set(digits) <= _HEX_DIGITS:
        raise ValueError("a malformed \\x, \\u or \\U escape")
    cp = int(digits, 16)
    if cp == 0 or cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
        raise ValueError("an escape of a character PostgreSQL text cannot hold")
    return cp, nxt


def _literal(ch: str) -> str:
    return ch if " " <= ch <= "~" else _u(ord(ch))


def _bracket(p: str, i: int) -> tuple[str, int]:
    """Translate the Rust character class starting at ``p[i] == '['``."""
    out = ["["]
    j = i + 1
    if p[j : j + 1] == "^":
        out.append("^")
        j += 1
    first = True
    while True:
        if j >= len(p):
            raise ValueError("an unclosed character class")
        ch = p[j]
        if ch == "]" and not first:
            out.append("]")
            return "".join(out), j + 1
        first = False
        if ch == "[":
            if p[j + 1 : j + 2] != ":":
                raise ValueError("nested character classes are not supported")
            end = p.find(":]", j + 2)
            name = p[j + 2 : end] if end > 0 else ""
            if name not in _POSIX_CLASSES:
                raise ValueError(f"character class [:{name}:] is not supported")
            out.append(f"[:{name}:]")
            j = end + 2
        elif ch == "\\":
            e = p[j + 1 : j + 2]
            if e in ("x", "u", "U"):
                cp, j = _code_point(p, j + 1)
                out.append(_u(cp))
                continue
            if e and e in _CLASS_ESCAPES:
                out.append("\\" + e)
            elif e and e.isascii() and not e.isalnum():
                out.append(_u(ord(e)))  # an escaped ] \ ^ - [ or other punctuation
            else:
                raise ValueError(f"escape \\{e} is not supported in a character class")
            j += 2
        elif ch in "&~-" and p[j + 1 : j + 2] == ch:
            raise ValueError("character class set operations (&&, --, ~~) are not supported")
        else:
            out.append(_literal(ch))
            j += 1


def postgres_regex(pattern: str) -> tuple[str, str]:
    """(ARE pattern, flags) for PostgreSQL's regexp_replace matching what the Rust ``regex``
    crate matches with ``pattern``, for the subset both understand: literals, classes (POSIX
    names included), groups (names dropped), alternation, greedy and lazy quantifiers, anchors,
    \\d \\s \\w \\b and leading (?i) / (?s). Raises ValueError, naming the construct, for the
    rest (Unicode properties, inline flags past the start, look-around, backreferences,
    class set operations)."""
    p = pattern
    flags = ""
    dot_all = False
    lead = re.match(r"\(\?([a-zA-Z]+)\)", p)
    if lead is not None:
        for f in lead.group(1):
            if f == "i":
                flags = "i"
            elif f == "s":
                dot_all = True
            elif f != "u":
                raise ValueError(f"flag {f!r} is not supported")
        p = p[lead.end() :]
    out: list[str] = []
    i = 0
    quantifiable = False
    while i < len(p):
        ch = p[i]
        if ch == "\\":
            e = p[i + 1 : i + 2]
            if e in ("x", "u", "U"):
                cp, i = _code_point(p, i + 1)
                out.append(_u(cp))
                quantifiable = True
                continue
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
                quantifiable = e not in "bBAz"
            elif e and e.isascii() and not e.isalnum() and e not in " \t\n":
                out.append("\\" + e)  # an escaped metacharacter: literal in both dialects
                quantifiable = True
            else:
                raise ValueError(f"escape \\{e} is not supported")
            i += 2
        elif ch == "[":
            text, i = _bracket(p, i)
            out.append(text)
            quantifiable = True
        elif ch == "(":
            if p.startswith("(?:", i):
                out.append("(?:")
                i += 3
            elif p.startswith("(?P<", i) or (
                p.startswith("(?<", i) and p[i + 3 : i + 4] not in "=!"
            ):
                end = p.find(">", i)
                if end < 0:
                    raise ValueError("an unclosed group name")
                out.append("(")  # group names mean nothing to regexp_replace
                i = end + 1
            elif p.startswith("(?", i):
                raise ValueError("inline flags, look-around and other (?...) groups are not "
                                 "supported")  # fmt: skip
            else:
                out.append("(")
                i += 1
            quantifiable = False
        elif ch in "*+?{":
            if not quantifiable:
                raise ValueError("a quantifier with nothing to repeat")
            if ch == "{":
                m = _QUANTIFIER.match(p, i)
                if m is None or (not m.group(1) and not m.group(3)):
                    raise ValueError("a malformed {m,n} repetition")
                lo = m.group(1) or "0"
                hi = m.group(3)
                if int(lo) > 255 or (hi and int(hi) > 255) or (hi and int(hi) < int(lo)):
                    raise ValueError("repetition counts above 255 are not supported")
                out.append("{" + lo + m.group(2) + hi + "}")
                i = m.end()
            else:
                out.append(ch)
                i += 1
            if p[i : i + 1] == "?":
                out.append("?")  # lazy
                i += 1
            elif p[i : i + 1] == "+":
                raise ValueError("possessive quantifiers are not supported")
            quantifiable = False
        elif ch == ".":
            out.append("." if dot_all else "[^\\n]")  # Rust's '.' stops at newlines
            i += 1
            quantifiable = True
        else:
            out.append(_literal(ch))  # ) | ^ $ and literal characters
            i += 1
            quantifiable = ch not in "|(^$"
    if not out:
        raise ValueError("the pattern is empty")
    return "".join(out), flags


class DetectorConfigLike(Protocol):
    """What the free-text mask needs from the `[phi]` config (phigate.config.PhiConfig)."""

    @property
    def mrn_pattern(self) -> str | None: ...

    @property
    def extra_patterns(self) -> Mapping[str, str]: ...


_FreeTextStep = tuple[str, str, str]  # (pattern, replacement, flags) as SQL text expressions


def _free_text_steps(phi: DetectorConfigLike | None) -> tuple[_FreeTextStep, ...]:
    """The regexp_replace steps of the free-text mask; ValueError when a configured pattern
    has no PostgreSQL translation."""
    steps: list[tuple[str, str, str]] = [(_EMAIL_RE, "[EMAIL]", "g")]
    mrn = phi.mrn_pattern if phi is not None else None
    if mrn is None:
        steps.append((_DEFAULT_MRN_RE, "[MRN]", "g"))
    else:
        try:
            are, flags = postgres_regex(mrn)
        except ValueError as exc:
            raise ValueError(f"[phi] mrn_pattern: {exc}") from None
        steps.append((are, "[MRN]", "g" + flags))  # no digit bounds: layer 2 has none either
    steps.append((_MRN_KEYWORD_RE, "[MRN]", "gi"))
    steps += [(_SSN_RE, "[SSN]", "g"), (_PHONE_RE, "[PHONE]", "g"), (_DOB_RE, "[DOB]", "gi")]
    extra = phi.extra_patterns if phi is not None else {}
    for name in sorted(extra):
        try:
            are, flags = postgres_regex(extra[name])
        except ValueError as exc:
            raise ValueError(f"[phi.extra_patterns] {name}: {exc}") from None
        # detectors.rs: the name without brackets, ASCII upper case, in brackets.
        tag = "".join(c.upper() if c.isascii() else c for c in name.strip("[]"))
        steps.append((are, f"[{tag}]", "g" + flags))
    return tuple((_sql_text(p), _sql_text(t), _lit(f)) for p, t, f in steps)


@dataclass(frozen=True, slots=True)
class MaskSQL:
    """The configuration-dependent parts of the masks as SQL (mask_sql): the free-text steps
    (None when a configured pattern has no PostgreSQL translation: free text is then redacted
    whole; ``problem`` says why) and whether the target's pseudonym functions were found
    ready with the gateway's key (pseudonym_db.check); without them statements needing a
    pseudonym in SQL are refused (58000)."""

    free_text: tuple[_FreeTextStep, ...] | None
    problem: str | None = None
    pseudonyms: bool = False


def mask_sql(phi: DetectorConfigLike | None = None, *, pseudonyms: bool = False) -> MaskSQL:
    """The detector patterns as ``rewrite`` uses them (MaskSQL); ``phi`` None: the default
    detectors. ``pseudonyms``: phigate.pseudonym and phigate.pseudonym_int are installed on
    the target with the gateway's key (the engine sets it per target from the catalog)."""
    try:
        steps: tuple[_FreeTextStep, ...] | None = _free_text_steps(phi)
        problem = None
    except ValueError as exc:
        # Fail closed but keep serving: layer 1 redacts free text whole, layer 2 still scans.
        steps, problem = None, str(exc)
        log.warning("free-text columns are redacted whole for masked identities: %s", problem)
    return MaskSQL(steps, problem, pseudonyms)


_DEFAULT_MASKS = mask_sql(None)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _base_kind(col: ColumnLike) -> str:
    if col.type_name.endswith("]"):
        return "array"
    if col.type_oid in _TEXT_OIDS or col.type_name in ("citext", "public.citext"):
        return "text"
    return "other"


def _redact(col: ColumnLike) -> str:
    tn = col.type_name
    if _base_kind(col) == "array":
        const = f"CAST('{{}}' AS {tn})"
    elif _base_kind(col) == "text":
        const = f"CAST('***' AS {tn})"
    elif col.type_oid in _NUMBER_OIDS:
        const = f"CAST(0 AS {tn})"
    elif col.type_oid in _REDACT_BY_OID:
        const = f"CAST({_REDACT_BY_OID[col.type_oid]} AS {tn})"
    else:
        return f"CAST(NULL AS {tn})"  # a type phigate has no constant for: NULL is always valid
    # NULL stays NULL, as in layer 2 (it never masks a NULL): the placeholder only stands for
    # a value.
    return f"CASE WHEN {_ident(col.name)} IS NULL THEN NULL ELSE {const} END"


def _mask_spec(rule: ColumnRuleLike) -> str:
    spec = getattr(rule, "mask_spec", None)
    if isinstance(spec, str):
        return spec
    mask = rule.mask
    keep = getattr(rule, "keep", None)
    if mask == "partial" and isinstance(keep, int):
        return f"partial:{keep}"
    return mask


def _text_of(col: ColumnLike) -> str:
    """The column as the text layer 2 sees: its output. A cast of bpchar to text drops the
    trailing blanks its output has, so bpchar goes through its output function."""
    c = _ident(col.name)
    if col.type_oid == _BPCHAR:
        return f"pg_catalog.textin(pg_catalog.bpcharout({c}))"
    return f"CAST({c} AS text)"


#: Why a statement needing a pseudonym in SQL is refused when the functions are not ready.
PSEUDONYMS_UNAVAILABLE = (
    "pseudonym masks are computed by phigate's functions in the database, which are not "
    "ready on this target"
)
PSEUDONYMS_HINT = (
    "The gateway operator must run `phigate db install` for this target; `phigate catalog "
    "show` and the gateway log say why."
)


def _int_hex_digits(col: ColumnLike) -> int | None:
    digits = _INT_HEX.get(col.type_oid)
    if digits is None or col.type_oid != _NUMERIC:
        return digits
    m = _NUMERIC_TYPMOD.fullmatch(col.type_name.replace(" ", ""))
    if m is None:
        return digits  # unconstrained numeric
    # numeric(p, s) holds integers below 10^(p-s): keep 16^digits <= 10^(p-s).
    int_digits = int(m.group(1)) - int(m.group(2) or 0)
    digits = min(digits, int(int_digits * math.log(10, 16) + 1e-9))
    return digits if digits > 0 else None


_ASCII_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _partial(text: str, n: int) -> str:
    def stars(v: str) -> str:
        return f"pg_catalog.regexp_replace({v}, {_KEEP_SQL}, '*', 'g')"

    def ascii_stars(v: str) -> str:
        # For ASCII, Rust's is_alphanumeric is exactly [0-9A-Za-z]; translate() is 4x cheaper
        # than the regexp with its long class (measured: 10 vs 42 ms per 20,000 values).
        return f"pg_catalog.translate({v}, '{_ASCII_ALNUM}', '{'*' * len(_ASCII_ALNUM)}')"

    is_ascii = f"pg_catalog.octet_length({text}) = pg_catalog.char_length({text})"
    if n == 0:
        return f"CASE WHEN {is_ascii} THEN {ascii_stars(text)} ELSE {stars(text)} END"
    # The first `cut` characters are masked: all but the last n, or all when there are n or
    # fewer. One regexp_replace, so the long pattern is in the statement once per column.
    length = f"pg_catalog.char_length({text})"
    cut = f"CASE WHEN {length} > {n} THEN {length} - {n} ELSE {length} END"
    head = f"pg_catalog.substr({text}, 1, {cut})"
    tail = f"pg_catalog.substr({text}, {cut} + 1)"
    return (
        f"CASE WHEN {is_ascii} THEN {ascii_stars(head)} || {tail} "
        f"ELSE {stars(head)} || {tail} END"
    )


def _need_pseudonyms(masks: MaskSQL) -> None:
    if not masks.pseudonyms:
        # Never fall back to key material in the statement: refuse until the install is fixed.
        raise _Refuse(PSEUDONYMS_UNAVAILABLE, "58000", PSEUDONYMS_HINT)


def mask_expression(col: ColumnLike, spec: str, masks: MaskSQL | None) -> str:
    """The SQL expression masking column ``col`` with mask ``spec``; of the column's type.

    Masks that only make sense for text (partial, email_domain, free_text, pseudonym strings)
    fall back to redact for other types, and year to redact for non-dates, so the result
    always keeps the column's type. NULL stays NULL."""
    masks = masks or _DEFAULT_MASKS
    tn = col.type_name
    c = _ident(col.name)
    kind = _base_kind(col)
    if spec == "null":
        return f"CAST(NULL AS {tn})"
    m = _PARTIAL.fullmatch(spec)
    if m is not None and kind == "text":
        return f"CAST({_partial(_text_of(col), int(m.group(1)))} AS {tn})"
    if spec == "year" and col.type_oid in _DATE_OIDS:
        # infinity stays (layer 2 passes it; EXTRACT would give a year no integer holds).
        return (
            f"CASE WHEN pg_catalog.isfinite({c}) THEN CAST(pg_catalog.make_date("
            f"CAST(EXTRACT(year FROM {c}) AS integer), 1, 1) AS {tn}) ELSE {c} END"
        )
    if spec == "email_domain" and kind == "text":
        # Everything from the last '@' on, as layer 2; '***' alone when there is none.
        v = _text_of(col)
        return (
            f"CAST(CASE WHEN {c} IS NULL THEN NULL ELSE '***' || COALESCE("
            f"pg_catalog.substring({v}, '@[^@]*$'), '') END AS {tn})"
        )
    # Same input, same key: same pseudonym, so results can still be joined. The functions
    # read the key themselves (SECURITY DEFINER): nothing of it is in the statement.
    if spec == "pseudonym" and kind == "text":
        _need_pseudonyms(masks)
        v = _text_of(col)
        # Layer 2 leaves a value that already is a pseudonym as it is (idempotence). The length
        # and prefix tests come first and AND stops at the first false, so the regexp runs only
        # for values shaped like a pseudonym (on every value it cost 7 ms per 20,000).
        return (
            f"CAST(CASE WHEN pg_catalog.octet_length({v}) = 20 "
            f"AND pg_catalog.left({v}, 4) = 'psn_' "
            f"AND {v} ~ '^psn_[0-9a-f]{{16}}$' THEN {v} ELSE "
            f"phigate.pseudonym({v}) END AS {tn})"
        )
    digits = _int_hex_digits(col) if spec == "pseudonym" else None
    if digits is not None:
        _need_pseudonyms(masks)
        return f"CAST(phigate.pseudonym_int(CAST({c} AS text), {digits}) AS {tn})"
    if spec == "free_text" and kind == "text" and masks.free_text is not None:
        expr = _text_of(col)
        for pattern, tag, flags in masks.free_text:
            expr = f"pg_catalog.regexp_replace({expr}, {pattern}, {tag}, {flags})"
        return f"CAST({expr} AS {tn})"
    return _redact(col)


# --- relation plans ----------------------------------------------------------------------------


class _Plan:
    """How one protected relation is masked for this identity."""

    __slots__ = ("masked", "name", "schema", "select_list")

    def __init__(self, schema: str, name: str, select_list: str, masked: tuple[str, ...]) -> None:
        self.schema = schema
        self.name = name
        self.select_list = select_list
        self.masked = masked

    def subquery(self, only: bool) -> str:
        o = "ONLY " if only else ""
        return (
            # Identifiers are quoted, expressions are phigate's own: no statement text in here.
            f"(SELECT {self.select_list} FROM {o}{_ident(self.schema)}.{_ident(self.name)})"  # noqa: S608
        )


def _plan(rel: RelationLike, schema: str, name: str, clear: frozenset[str],
          masks: MaskSQL | None) -> _Plan | None:  # fmt: skip
    items = []
    masked = []
    for col in rel.columns:
        rule = col.rule
        if rule is None or rule.kind in clear:
            items.append(_ident(col.name))
            continue
        spec = _mask_spec(rule)
        items.append(f"{mask_expression(col, spec, masks)} AS {_ident(col.name)}")
        masked.append(col.name)
    if not masked:
        return None
    return _Plan(schema, name, ", ".join(items), tuple(masked))


# A relation's plan depends only on the relation (immutable within a catalog snapshot), the
# clear kinds and the masks; building one is most of an uncached rewrite (profiled: ~35 % of a
# point lookup's), so plans are reused across statements. The entry keeps the relation and
# the masks alive, so their ids cannot be reused while it exists.
_PlanKey = tuple[int, str, str, frozenset[str], int]
_PLAN_CACHE: dict[_PlanKey, tuple[object, object, _Plan | None]] = {}
_PLAN_CACHE_MAX = 4096


def _cached_plan(rel: RelationLike, schema: str, name: str, clear: frozenset[str],
                 masks: MaskSQL | None) -> _Plan | None:  # fmt: skip
    key = (id(rel), schema, name, clear, id(masks))
    hit = _PLAN_CACHE.get(key)
    if hit is not None and hit[0] is rel and hit[1] is masks:
        return hit[2]
    plan = _plan(rel, schema, name, clear, masks)
    if len(_PLAN_CACHE) >= _PLAN_CACHE_MAX:
        _PLAN_CACHE.clear()
    _PLAN_CACHE[key] = (rel, masks, plan)
    return plan


# --- the rewriter ------------------------------------------------------------------------------


class _Refuse(Exception):
    def __init__(self, reason: str, sqlstate: str = "42501", hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sqlstate = sqlstate
        self.hint = hint


class _Scope:
    __slots__ = ("ctes", "parent")

    def __init__(self, parent: _Scope | None) -> None:
        self.parent = parent
        self.ctes: set[str] = set()

    def has_cte(self, name: str) -> bool:
        s: _Scope | None = self
        while s is not None:
            if name in s.ctes:
                return True
            s = s.parent
        return False


class _Token:
    __slots__ = ("end", "name", "start")

    def __init__(self, start: int, end: int, name: str) -> None:
        self.start = start  # byte offsets into the UTF-8 text; end exclusive
        self.end = end
        self.name = name


# A FROM item of one query level that was masked: (refname, plan).
_Level = list[tuple[str, _Plan]]

_NO_ROWS_BACK = frozenset({
    "LockStmt", "TruncateStmt", "VacuumStmt", "ClusterStmt", "ReindexStmt", "TransactionStmt",
    "VariableSetStmt", "VariableShowStmt", "DeallocateStmt", "DiscardStmt", "FetchStmt",
    "ClosePortalStmt", "ListenStmt", "UnlistenStmt", "ConstraintsSetStmt", "CheckPointStmt",
})  # fmt: skip
_OPAQUE_SQL = frozenset({"DoStmt", "CreateFunctionStmt", "CreateTrigStmt", "RuleStmt"})
# Statements whose expressions are rewritten like any query's (EXECUTE parameters, CALL
# arguments, NOTIFY): nothing in them creates an object.
_WALK_ONLY = frozenset({"ExecuteStmt", "CallStmt", "NotifyStmt"})


class _Rewriter:
    def __init__(self, sql: str, catalog: CatalogLike, clear: frozenset[str],
                 masks: MaskSQL | None, schema: str) -> None:  # fmt: skip
        self.sql = sql
        self.schema = schema  # the one schema of the upstream session's search_path
        self.raw = sql.encode("utf-8")
        self.catalog = catalog
        self.clear = clear
        self.masks = masks
        self.splices: list[tuple[int, int, str]] = []
        self.masked: dict[str, None] = {}
        self.refs = 0  # protected references masked so far
        self.plans: dict[tuple[str, str], _Plan | None] = {}
        self._tokens: list[_Token] | None = None
        self._by_start: dict[int, int] = {}

    # relations --------------------------------------------------------------------------------

    def plan(self, schema: str, name: str) -> _Plan | None:
        key = (schema, name)
        if key not in self.plans:
            rel = self.catalog.relation(schema, name)
            # A view over classified columns whose mapping the catalog could not work out.
            reason = getattr(rel, "refuse_reason", None)
            if isinstance(reason, str) and reason:
                raise _Refuse(f"{schema}.{name} cannot be masked: {reason}")
            self.plans[key] = (
                None if rel is None else _cached_plan(rel, schema, name, self.clear, self.masks)
            )
        return self.plans[key]

    def resolve(self, rv: dict[str, Any], scope: _Scope | None) -> tuple[str, str] | None:
        """(schema, name) as the server resolves it with the pinned search_path (``schema``),
        or None for a CTE reference."""
        if rv.get("catalogname"):
            raise _Refuse("three-part (database.schema.table) names are not accepted")
        name: str = rv["relname"]
        schema: str | None = rv.get("schemaname")
        if schema is not None:
            return (schema, name)
        if scope is not None and scope.has_cte(name):
            return None
        rel = unqualified_relation(name, self.schema)
        if rel[0] != "pg_catalog" and rv.get("relpersistence") == "t":
            return ("pg_temp", name)
        return rel

    def protected(self, rv: dict[str, Any], scope: _Scope | None) -> _Plan | None:
        rel = self.resolve(rv, scope)
        return None if rel is None else self.plan(*rel)

    def _use(self, plan: _Plan) -> None:
        self.refs += 1
        for c in plan.masked:
            self.masked[f"{plan.schema}.{plan.name}.{c}"] = None

    # lexing -----------------------------------------------------------------------------------

    def tokens(self) -> list[_Token]:
        if self._tokens is None:
            sql = self.sql
            if sql.isascii():
                offsets: list[int] | None = None
            else:  # pglast's scanner reports character offsets; locations are bytes
                offsets = [0]
                for ch in sql:
                    offsets.append(offsets[-1] + len(ch.encode("utf-8")))
            toks = []
            for t in _pg_parser.scan(sql):
                s, e = t.start, t.end + 1
                if offsets is not None:
                    s, e = offsets[s], offsets[e]
                toks.append(_Token(s, e, t.name))
            self._tokens = toks
            self._by_start = {t.start: i for i, t in enumerate(toks)}
        return self._tokens

    def _tok(self, i: int) -> str | None:
        toks = self.tokens()
        return toks[i].name if 0 <= i < len(toks) else None

    def span(self, rv: dict[str, Any]) -> tuple[int, int, int, int]:
        """(start, end, first token index, last token index) of a RangeVar's text, with ONLY,
        ONLY (...) and the inheritance star; start/end are byte offsets."""
        toks = self.tokens()
        i = self._by_start.get(rv.get("location", -1))
        if i is None:
            raise _Refuse("phigate cannot locate a protected relation reference in the text")
        parts = 1 + bool(rv.get("schemaname")) + bool(rv.get("catalogname"))
        j = i
        for _ in range(parts - 1):
            if self._tok(j + 1) != "ASCII_46":
                raise _Refuse("phigate cannot locate a protected relation reference in the text")
            j += 2
        first = i
        if self._tok(i - 1) == "ONLY":
            first = i - 1
        elif self._tok(i - 1) == "ASCII_40" and self._tok(i - 2) == "ONLY":
            if self._tok(j + 1) != "ASCII_41":
                raise _Refuse("phigate cannot locate a protected relation reference in the text")
            first, j = i - 2, j + 1
        if self._tok(j + 1) == "ASCII_42":
            j += 1
        return toks[first].start, toks[j].end, first, j

    def splice(self, start: int, end: int, text: str) -> None:
        self.splices.append((start, end, text))

    def result(self) -> str:
        out = []
        pos = 0
        for start, end, text in sorted(self.splices):
            if start < pos:  # two references whose spans overlap: the walker is confused
                raise _Refuse("phigate cannot rewrite this statement")
            out.append(self.raw[pos:start])
            out.append(text.encode("utf-8"))
            pos = end
        out.append(self.raw[pos:])
        return b"".join(out).decode("utf-8")

    # statements -------------------------------------------------------------------------------

    def statement(self, node: dict[str, Any], scope: _Scope | None) -> None:
        ntype, body = _one(node)
        handler = _STATEMENTS.get(ntype)
        if handler is not None:
            handler(self, body, scope)
        elif ntype in _OPAQUE_SQL:
            raise _Refuse(
                "function bodies, triggers, rules and DO blocks run SQL the masking rewrite "
                "cannot see"
            )
        elif ntype in _NO_ROWS_BACK:
            return
        elif ntype in _WALK_ONLY:
            self.walk(body, scope)
        else:
            # DDL and anything else: a protected relation anywhere in it is refused (creating
            # objects from protected relations, indexes/constraints on them, ...).
            before = self.refs
            self.walk(body, _Scope(scope))
            if self.refs != before:
                raise _Refuse(
                    "creating or changing objects from protected relations is not allowed "
                    "for masked identities"
                )

    def select_stmt(self, b: dict[str, Any], scope: _Scope | None) -> None:
        before = self.refs
        self.select(b, scope)
        if b.get("intoClause") is not None and self.refs != before:
            raise _Refuse(
                "SELECT INTO from protected relations is not allowed for masked identities"
            )

    def with_clause(self, wc: dict[str, Any] | None, scope: _Scope | None) -> _Scope:
        s = _Scope(scope)
        if wc is None:
            return s
        ctes = [c["CommonTableExpr"] for c in wc.get("ctes", ())]
        if wc.get("recursive"):
            s.ctes.update(c["ctename"] for c in ctes)
        for c in ctes:
            self.statement(c["ctequery"], s)
            s.ctes.add(c["ctename"])
        return s

    def select(self, b: dict[str, Any], parent: _Scope | None) -> None:
        scope = self.with_clause(b.get("withClause"), parent)
        if b.get("op", "SETOP_NONE") != "SETOP_NONE":
            for side in ("larg", "rarg"):
                arm = b[side]
                self.select(arm.get("SelectStmt", arm), scope)
            for key in ("sortClause", "limitCount", "limitOffset"):
                if key in b:
                    self.walk(b[key], scope)
            return
        level: _Level = []
        for item in b.get("fromClause", ()):
            self.from_item(item, scope, level)
        for key, value in b.items():
            if key not in ("withClause", "fromClause", "intoClause", "lockingClause"):
                self.walk(value, scope)
        locking = b.get("lockingClause")
        if locking and level:
            masked_refs = {r for r, _ in level}
            for lc in locking:
                named = lc["LockingClause"].get("lockedRels")
                names = {rv.get("RangeVar", rv)["relname"] for rv in named} if named else None
                if names is None or names & masked_refs:
                    raise _Refuse(
                        "row-locking clauses (FOR UPDATE/SHARE) on protected relations are not "
                        "allowed for masked identities"
                    )

    def from_item(self, node: dict[str, Any], scope: _Scope, level: _Level) -> None:
        ntype, b = _one(node)
        if ntype == "RangeVar":
            self.from_range_var(b, scope, level)
        elif ntype == "JoinExpr":
            self.from_item(b["larg"], scope, level)
            self.from_item(b["rarg"], scope, level)
            if b.get("quals") is not None:
                self.walk(b["quals"], scope)
        elif ntype == "RangeTableSample":
            rel = b["relation"]
            if "RangeVar" in rel and self.protected(rel["RangeVar"], scope) is not None:
                raise _Refuse("TABLESAMPLE on protected relations is not supported for masking")
            self.from_item(rel, scope, level)
            for key in ("args", "repeatable"):
                if key in b:
                    self.walk(b[key], scope)
        else:  # RangeSubselect, RangeFunction, RangeTableFunc, JsonTable
            self.walk(b, scope)

    def from_range_var(self, rv: dict[str, Any], scope: _Scope, level: _Level) -> None:
        plan = self.protected(rv, scope)
        if plan is None:
            return
        start, end, first, _last = self.span(rv)
        alias = rv.get("alias")
        refname = alias["aliasname"] if alias else rv["relname"]
        only = not rv.get("inh", False)
        sub = plan.subquery(only)
        if self._tok(first - 1) == "TABLE":  # TABLE name: the shorthand for SELECT * FROM name
            start = self.tokens()[first - 1].start
            text = f"SELECT * FROM {sub} AS {_ident(refname)}"  # noqa: S608
        elif alias:
            text = sub  # the alias (and its column list) follows in the original text
        else:
            text = f"{sub} AS {_ident(refname)}"
        self.splice(start, end, text)
        self._use(plan)
        level.append((refname, plan))

    # writes -----------------------------------------------------------------------------------

    def _target(self, b: dict[str, Any]) -> tuple[_Plan | None, str]:
        rv = b["relation"]
        rel = self.resolve(rv, None)
        assert rel is not None
        alias = rv.get("alias")
        return self.plan(*rel), (alias["aliasname"] if alias else rv["relname"])

    @staticmethod
    def _returning(b: dict[str, Any]) -> list[Any]:
        rc = b.get("returningClause")
        if rc is not None:
            return list(rc.get("exprs", ()))
        return list(b.get("returningList", ()))

    def _check_target(self, what: str, exprs: Any, plan: _Plan, refnames: set[str]) -> None:
        if _mentions(exprs, frozenset(plan.masked), refnames):
            raise _Refuse(
                f"{what} reads masked columns of {plan.schema}.{plan.name}, the target of the "
                "write, which cannot be masked there; remove them or use a role that sees them"
            )

    def _no_new_refs(self, before: int, what: str) -> None:
        if self.refs != before:
            raise _Refuse(
                f"{what} reads protected relations: the masked values would be written as if "
                "they were data"
            )

    def insert(self, b: dict[str, Any], parent: _Scope | None) -> None:
        scope = self.with_clause(b.get("withClause"), parent)
        plan, refname = self._target(b)
        sel = b.get("selectStmt")
        if sel is not None:
            before = self.refs
            self.statement(sel, scope)
            self._no_new_refs(before, "INSERT ... SELECT")
        oc = b.get("onConflictClause")
        if oc is not None:
            if plan is not None:
                exprs = [rt["ResTarget"]["val"] for rt in oc.get("targetList", ())]
                if oc.get("whereClause") is not None:
                    exprs.append(oc["whereClause"])
                self._check_target("ON CONFLICT DO UPDATE", exprs, plan, {refname})
            before = self.refs
            self.walk(oc, scope)
            self._no_new_refs(before, "ON CONFLICT DO UPDATE")
        ret = self._returning(b)
        if plan is not None and ret:
            self._check_target("RETURNING", ret, plan, {refname, "old", "new"})
        self.walk(ret, scope)

    def update(self, b: dict[str, Any], parent: _Scope | None) -> None:
        scope = self.with_clause(b.get("withClause"), parent)
        plan, refname = self._target(b)
        level: _Level = []
        for item in b.get("fromClause", ()):
            self.from_item(item, scope, level)
        sets = [rt["ResTarget"] for rt in b.get("targetList", ())]
        set_exprs = [r.get("val") for r in sets] + [r.get("indirection") for r in sets]
        if plan is not None:
            self._check_target("SET", set_exprs, plan, {refname})
            if b.get("whereClause") is not None:
                self._check_target("WHERE", b["whereClause"], plan, {refname})
            ret = self._returning(b)
            if ret:
                self._check_target("RETURNING", ret, plan, {refname, "old", "new"})
        for ref, p in level:
            if _mentions(set_exprs, frozenset(p.masked), {ref}):
                raise _Refuse(
                    f"SET copies masked columns of {p.schema}.{p.name}: the masked values "
                    "would be written as if they were data"
                )
        before = self.refs
        self.walk(set_exprs, scope)
        self._no_new_refs(before, "SET")
        for key in ("whereClause", "returningClause", "returningList"):
            if key in b:
                self.walk(b[key], scope)

    def delete(self, b: dict[str, Any], parent: _Scope | None) -> None:
        scope = self.with_clause(b.get("withClause"), parent)
        plan, refname = self._target(b)
        level: _Level = []
        for item in b.get("usingClause", ()):
            self.from_item(item, scope, level)
        if plan is not None:
            if b.get("whereClause") is not None:
                self._check_target("WHERE", b["whereClause"], plan, {refname})
            ret = self._returning(b)
            if ret:
                self._check_target("RETURNING", ret, plan, {refname, "old", "new"})
        for key in ("whereClause", "returningClause", "returningList"):
            if key in b:
                self.walk(b[key], scope)

    def merge(self, b: dict[str, Any], parent: _Scope | None) -> None:
        scope = self.with_clause(b.get("withClause"), parent)
        plan, _ = self._target(b)
        if plan is not None:
            raise _Refuse(
                f"MERGE into {plan.schema}.{plan.name} reads its masked columns in clear; "
                "not allowed for masked identities"
            )
        before = self.refs
        self.from_item(b["sourceRelation"], scope, [])
        for key in ("joinCondition", "mergeWhenClauses", "returningClause", "returningList"):
            if key in b:
                self.walk(b[key], scope)
        self._no_new_refs(before, "MERGE")

    # utility statements -----------------------------------------------------------------------

    def copy(self, b: dict[str, Any], scope: _Scope | None) -> None:
        rv = b.get("relation")
        if rv is None:
            self.statement(b["query"], scope)
            return
        if b.get("is_from"):
            return  # writes rows the client sends; nothing of the table flows back
        plan = self.protected(rv, None)
        if plan is None:
            return
        start, end, first, last = self.span(rv)
        if self._tok(first - 1) == "BINARY" or any(
            t.name == "DELIMITERS" for t in self.tokens()[last:]
        ):
            # Old COPY syntax has no query form; the options say the same in the new syntax.
            raise _Refuse(
                "old COPY syntax (BINARY, USING DELIMITERS) is not supported on protected "
                "relations; use WITH (FORMAT ..., DELIMITER ...)"
            )
        attlist = b.get("attlist")
        if attlist:
            j = last + 1
            if self._tok(j) != "ASCII_40":
                raise _Refuse("phigate cannot locate the COPY column list")
            depth = 0
            toks = self.tokens()
            while j < len(toks):
                if toks[j].name == "ASCII_40":
                    depth += 1
                elif toks[j].name == "ASCII_41":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            else:
                raise _Refuse("phigate cannot locate the COPY column list")
            end = toks[j].end
            cols = ", ".join(_ident(a["String"]["sval"]) for a in attlist)
        else:
            cols = "*"
        only = not rv.get("inh", False)
        self.splice(
            start,
            end,
            f"(SELECT {cols} FROM {plan.subquery(only)} AS {_ident(rv['relname'])})",  # noqa: S608
        )
        self._use(plan)

    def inner(self, b: dict[str, Any], scope: _Scope | None) -> None:
        # EXPLAIN, PREPARE, DECLARE CURSOR. A plan shows the masking subqueries, which hold
        # no key material (pseudonyms are function calls); ANALYZE and VERBOSE are refused by
        # the engine.
        self.statement(b["query"], scope)

    def create_as(self, b: dict[str, Any], scope: _Scope | None) -> None:
        before = self.refs
        self.statement(b["query"], scope)
        if self.refs != before:
            raise _Refuse(
                "creating tables, views or materialized views from protected relations is "
                "not allowed for masked identities"
            )

    # expressions ------------------------------------------------------------------------------

    def walk(self, value: Any, scope: _Scope | None) -> None:
        """Every node below ``value``: queries are rewritten, a protected RangeVar in a place
        the rewrite does not know is refused."""
        tv = type(value)
        if tv is list:
            for item in value:
                self.walk(item, scope)
            return
        if tv is not dict:
            return
        if len(value) == 1:
            ((key, body),) = value.items()
            if key[:1].isupper() and type(body) is dict:
                self.node(key, body, scope)
                return
        if "relname" in value and "relpersistence" in value:  # a RangeVar stored unwrapped
            self.stray_range_var(value, scope)
            return
        for item in value.values():
            self.walk(item, scope)

    def node(self, ntype: str, body: dict[str, Any], scope: _Scope | None) -> None:
        if ntype == "SelectStmt":
            self.select(body, scope)
        elif ntype == "RangeVar":
            self.stray_range_var(body, scope)
        elif ntype in _STATEMENTS or ntype in _OPAQUE_SQL:
            self.statement({ntype: body}, scope)
        else:
            if ntype == "FuncCall":
                names = body.get("funcname", ())
                last = names[-1] if names else {}
                name = last.get("String", {}).get("sval", "")
                why = never_reason(name)
                if why is not None:
                    raise _Refuse(f"function {name} is not allowed for masked identities: {why}")
            for item in body.values():
                self.walk(item, scope)

    def stray_range_var(self, rv: dict[str, Any], scope: _Scope | None) -> None:
        plan = self.protected(rv, scope)
        if plan is not None:
            raise _Refuse(f"{plan.schema}.{plan.name} is referenced where phigate cannot mask it")


def _one(node: dict[str, Any]) -> tuple[str, Any]:
    for item in node.items():
        return item
    raise _Refuse("phigate cannot rewrite an empty node")


def _column_refs(value: Any, nested: bool, out: list[tuple[list[str], bool]]) -> None:
    """Every ColumnRef below ``value`` as (fields, inside a nested query)."""
    tv = type(value)
    if tv is list:
        for item in value:
            _column_refs(item, nested, out)
    elif tv is dict:
        cr = value.get("ColumnRef")
        if cr is not None and len(value) == 1:
            fields = [f["String"]["sval"] if "String" in f else "*" for f in cr["fields"]]
            out.append((fields, nested))
            return
        inner = nested or "SelectStmt" in value
        for item in value.values():
            _column_refs(item, inner, out)


def _mentions(value: Any, masked: frozenset[str], refnames: set[str]) -> bool:
    """Might an expression read a masked column (or the whole row) of the relation known in
    this scope as one of ``refnames``? Conservative: an unqualified name equal to a masked
    column counts even when a nested query might resolve it elsewhere."""
    refs: list[tuple[list[str], bool]] = []
    _column_refs(value, False, refs)
    for fields, nested in refs:
        if len(fields) == 1:
            name = fields[0]
            if name == "*":
                if not nested:  # SELECT * of a nested query expands that query's FROM
                    return True
            elif name in masked or name in refnames:
                return True
            continue
        qualifier, col = fields[-2], fields[-1]
        if qualifier in refnames and (col in masked or col == "*"):
            return True
        if fields[0] in masked and fields[0] not in refnames:  # a field of a masked column
            return True
    return False


_STATEMENTS: dict[str, Any] = {
    "SelectStmt": _Rewriter.select_stmt,
    "InsertStmt": _Rewriter.insert,
    "UpdateStmt": _Rewriter.update,
    "DeleteStmt": _Rewriter.delete,
    "MergeStmt": _Rewriter.merge,
    "CopyStmt": _Rewriter.copy,
    "ExplainStmt": _Rewriter.inner,
    "PrepareStmt": _Rewriter.inner,
    "DeclareCursorStmt": _Rewriter.inner,
    "CreateTableAsStmt": _Rewriter.create_as,
    "ViewStmt": _Rewriter.create_as,
}


def rewrite(
    sql: str,
    catalog: CatalogLike,
    clear_kinds: Iterable[str],
    masks: MaskSQL | None,
    *,
    schema: str,
    doc: Mapping[str, Any] | None = None,
) -> RewriteResult:
    """Mask every protected relation ``sql`` reads, for an identity seeing ``clear_kinds``,
    resolving unqualified names as a session whose search_path is ``schema`` does.

    ``masks`` is what ``mask_sql`` built from the `[phi]` detector patterns and the state of
    the target's pseudonym functions; None refuses statements that need a pseudonym in SQL
    and scrubs free text with the default detectors."""
    clear = frozenset(clear_kinds)
    if doc is None:  # the caller may have parsed it already (one parse per decision)
        try:
            doc = orjson.loads(_pg_parser.parse_sql_json(sql))
        except _pg_parser.ParseError:
            return RewriteResult(sql, False, [], "phigate cannot parse this statement")
    rw = _Rewriter(sql, catalog, clear, masks, schema)
    try:
        for raw in doc.get("stmts", ()):
            rw.statement(raw["stmt"], None)
        if not rw.splices:
            return RewriteResult(sql, False, list(rw.masked))
        return RewriteResult(rw.result(), True, list(rw.masked))
    except _Refuse as exc:
        return RewriteResult(sql, False, [], exc.reason, exc.sqlstate, exc.hint)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError):
        # A tree shape the rewriter did not expect is something it cannot mask.
        return RewriteResult(sql, False, [], "phigate cannot rewrite this statement")
