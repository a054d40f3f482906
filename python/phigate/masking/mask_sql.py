"""Each mask kind as a SQL expression over a column, computing what layer 2 computes for the
same value, and the configuration-dependent parts of those masks (MaskSQL)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from phigate.masking.catalog_protocols import ColumnLike, ColumnRuleLike
from phigate.masking.pg_regex import _u, postgres_regex
from phigate.masking.refusal import _Refuse
from phigate.masking.zip3 import restricted_prefixes

# The name the gateway log has always shown for these warnings (this code was in rewrite.py).
log = logging.getLogger("phigate.masking.rewrite")

# Layer 2 (native/src/masking/values.rs: text_mask, MaskContext::pseudonym; masking/detectors.rs)
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
# Layer 2's redact placeholders (masking/values.rs placeholder(), text format) as SQL constants.
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


_KEEP_SQL = _sql_text(
    "[^" + "".join(_u(a) if a == b else f"{_u(a)}-{_u(b)}" for a, b in _PARTIAL_KEEP) + "]"
)


# --- free-text detectors, as PostgreSQL regular expressions --------------------------------------
#
# The same detectors and tags as native/src/masking/detectors.rs, in PostgreSQL's ARE dialect.
# Layer 2 resolves overlapping hits on the original text; here the replacements run one after
# the other, emails first (their local part may look like a phone number). Tags hold no digit and
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


# zip3 (values.rs zip3): after trimming ASCII whitespace (Rust's is_ascii_whitespace: space,
# tab, line feed, form feed, carriage return -- not vertical tab), a US ZIP ("02139",
# "02139-4307") or a value zip3 already produced ("021**") keeps its first three digits and
# gets "**"; a restricted prefix becomes "000"; anything else is "***". The pattern's one
# capture group is the prefix, so substring() yields it or NULL.
_ZIP3_RE = _sql_text(
    "^[ \\t\\n\\f\\r]*([0-9]{3})(?:[0-9]{2}(?:-[0-9]{4})?|[*][*])[ \\t\\n\\f\\r]*$"
)


def _zip3(text: str, restricted: frozenset[str]) -> str:
    prefix = f"pg_catalog.substring({text}, {_ZIP3_RE})"
    if restricted:
        # NULL (not ZIP-shaped) matches no arm and stays NULL through ELSE's ||.
        arms = " ".join(f"WHEN {_lit(p)} THEN '000**'" for p in sorted(restricted))
        shown = f"CASE {prefix} {arms} ELSE {prefix} || '**' END"
    else:
        shown = f"{prefix} || '**'"
    return f"COALESCE({shown}, '***')"


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
    zip3_restricted: frozenset[str] = frozenset()


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
    restricted = getattr(phi, "zip3_restricted", None)
    if not isinstance(restricted, frozenset):
        restricted = restricted_prefixes()
    return MaskSQL(steps, problem, pseudonyms, restricted)


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
    if spec == "zip3" and kind == "text":
        v = _text_of(col)
        return (
            f"CAST(CASE WHEN {c} IS NULL THEN NULL ELSE {_zip3(v, masks.zip3_restricted)} END "
            f"AS {tn})"
        )
    if spec == "free_text" and kind == "text" and masks.free_text is not None:
        expr = _text_of(col)
        for pattern, tag, flags in masks.free_text:
            expr = f"pg_catalog.regexp_replace({expr}, {pattern}, {tag}, {flags})"
        return f"CAST({expr} AS {tn})"
    return _redact(col)
