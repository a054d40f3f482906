"""The [phi] section: classified columns, masks, the pseudonym key and content-detector patterns."""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from phigate.config.model import (
    DICTIONARY_KINDS,
    MASKS,
    PHI_KINDS,
    ColumnRule,
    DictionaryConfig,
    PhiConfig,
    SecretBytes,
)
from phigate.config.roles import fold_name
from phigate.config.table import _Table
from phigate.config.targets import _MAX_SECRET_BYTES
from phigate.masking.zip3 import load_restricted, restricted_prefixes

# Which kinds each mask makes sense for (the column's type is checked against the database by
# phigate.masking.classification). Masks missing here fit every kind.
_MASK_KINDS: Mapping[str, frozenset[str]] = MappingProxyType({
    "partial": frozenset({"ssn", "mrn", "name", "address", "city", "zip", "phone", "email",
                          "other"}),
    "year": frozenset({"dob", "other"}),
    "email_domain": frozenset({"email", "other"}),
    "free_text": frozenset({"free_text", "address", "other"}),
    "zip3": frozenset({"zip", "other"}),
})  # fmt: skip

_PHI_KEYS = frozenset({
    "columns", "pseudonym_key_file", "mrn_pattern", "extra_patterns", "zip3_restricted_file",
    "dictionary", "subjects",
})  # fmt: skip

_DICTIONARY_KEYS = frozenset({
    "enabled", "kinds", "refresh_seconds", "stop_words", "stop_words_file", "min_chars",
})  # fmt: skip

_PHI_COLUMN_KEYS = frozenset({"kind", "mask"})

_PARTIAL_MAX = 64

_PSEUDONYM_KEY_MIN_BYTES = 32

_PATTERN_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")

# --- PHI classification ---------------------------------------------------------------------


def _toml_key(text: str) -> str:
    """A TOML key as it would be written in the file: bare if it can be, else quoted."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", text):
        return text
    return json.dumps(text, ensure_ascii=False)

def _dotted_name(t: _Table, text: str, count: int, what: str) -> tuple[str, ...]:
    """A key of `[phi.columns]` or `[phi.subjects]` folded into its ``count`` parts; fails
    naming the key and ``what`` it must name."""
    key = _toml_key(text)
    try:
        parts = fold_name(text)
    except ValueError as exc:
        t.fail(key, f"{text!r}: {exc}")
    if len(parts) != count:
        t.fail(key, f"{text!r} must name {what}")
    return tuple(parts)

def _phi(t: _Table) -> PhiConfig:
    cols_tbl = t.table("columns", required=False, allowed=None)
    columns: dict[tuple[str, str, str], ColumnRule] = {}
    for text, value in cols_tbl.data.items():
        key = _toml_key(text)
        parts = _dotted_name(cols_tbl, text, 3, 'schema.table.column, e.g. "public.patients.ssn"')
        schema, table, column = parts
        if schema == "pg_catalog" or schema.startswith("pg_"):
            cols_tbl.fail(key, "system schemas cannot be classified")
        entry = _Table(value, cols_tbl.key(key), t.ctx, _PHI_COLUMN_KEYS)
        kind = entry.string("kind")
        if kind not in PHI_KINDS:
            near = difflib.get_close_matches(kind, PHI_KINDS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            entry.fail("kind", f"unknown kind {kind!r}{hint}; use {', '.join(PHI_KINDS)}")
        mask, keep = _mask(entry, entry.string("mask", "redact"))
        fits = _MASK_KINDS.get(mask)
        if fits is not None and kind not in fits:
            entry.fail(
                "mask",
                f"{mask!r} does not fit kind {kind!r} (it fits {', '.join(sorted(fits))})",
            )
        if (schema, table, column) in columns:
            other = columns[(schema, table, column)].config_key
            cols_tbl.fail(key, f"names the same column as {other} (after folding names)")
        columns[(schema, table, column)] = ColumnRule(
            schema=schema,
            table=table,
            column=column,
            kind=kind,
            mask=mask,
            keep=keep,
            config_key=cols_tbl.key(key),
        )

    key_file = t.path("pseudonym_key_file", what="pseudonym key file")
    pseudonym_key = None
    if key_file is not None:
        pseudonym_key = _pseudonym_key(t, key_file)
    elif any(r.mask == "pseudonym" for r in columns.values()):
        first = next(r for r in columns.values() if r.mask == "pseudonym")
        t.fail(
            "pseudonym_key_file",
            f"is required: {first.config_key} uses mask 'pseudonym' (make one with "
            "`head -c 32 /dev/urandom > pseudonym.key; chmod 600 pseudonym.key`)",
        )

    mrn_pattern = t.opt_string("mrn_pattern")
    if mrn_pattern is not None:
        _check_pattern(t, "mrn_pattern", mrn_pattern)
    extra_tbl = t.table("extra_patterns", required=False, allowed=None)
    extra: dict[str, str] = {}
    for name in extra_tbl.data:
        if not _PATTERN_NAME.fullmatch(name):
            extra_tbl.fail(
                _toml_key(name), "pattern names use a-z 0-9 _ and start with a letter (they tag "
                "what was found)",
            )  # fmt: skip
        pattern = extra_tbl.string(name)
        _check_pattern(extra_tbl, name, pattern)
        extra[name] = pattern
    zip3_file = t.path("zip3_restricted_file", what="ZIP prefix list")
    zip3_restricted = _zip3_restricted(t, zip3_file)
    dictionary = _dictionary(t.table("dictionary", required=False, allowed=_DICTIONARY_KEYS))
    subjects = _subjects(t.table("subjects", required=False, allowed=None))
    return PhiConfig(
        columns=MappingProxyType(columns),
        pseudonym_key_file=key_file,
        pseudonym_key=pseudonym_key,
        mrn_pattern=mrn_pattern,
        extra_patterns=MappingProxyType(extra),
        zip3_restricted=zip3_restricted,
        zip3_restricted_file=zip3_file,
        dictionary=dictionary,
        subjects=MappingProxyType(subjects),
    )


def _subjects(t: _Table) -> dict[tuple[str, str], str]:
    """`[phi.subjects]`: "schema.table" = "key column" for each relation describing persons."""
    subjects: dict[tuple[str, str], str] = {}
    for text in t.data:
        key = _toml_key(text)
        parts = _dotted_name(t, text, 2, 'schema.table, e.g. "public.patients"')
        if parts[0] == "pg_catalog" or parts[0].startswith("pg_"):
            t.fail(key, "system relations do not describe persons")
        column_text = t.string(text)
        try:
            column = fold_name(column_text)
        except ValueError as exc:
            t.fail(key, f"{column_text!r}: {exc}")
        if len(column) != 1:
            t.fail(key, f"{column_text!r} must name one column of {text} (the person's key), "
                   "e.g. \"id\" or \"patient_id\"")  # fmt: skip
        relation = (parts[0], parts[1])
        if relation in subjects:
            t.fail(key, "names the same relation as another entry (after folding names)")
        subjects[relation] = column[0]
    return subjects


def _dictionary(t: _Table) -> DictionaryConfig:
    """`[phi.dictionary]`: which kinds the identifier dictionary learns, and how often."""
    enabled = t.boolean("enabled", True)
    kinds = t.string_list("kinds", DICTIONARY_KINDS)
    for kind in kinds:
        if kind not in PHI_KINDS:
            near = difflib.get_close_matches(kind, PHI_KINDS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            t.fail("kinds", f"unknown kind {kind!r}{hint}; use {', '.join(PHI_KINDS)}")
        if kind in ("dob", "free_text"):
            t.fail("kinds", f"{kind!r} values are not identifiers the dictionary can look up "
                   "as words; the content detectors handle them")  # fmt: skip
    refresh = t.seconds("refresh_seconds", 300.0, 1.0, 86400.0, lo_open=False)
    min_chars = t.integer("min_chars", 2, 1, 16)
    words = set(t.string_list("stop_words", ()))
    words_file = t.path("stop_words_file", what="stop-word list")
    if words_file is not None:
        try:
            text = words_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            t.fail("stop_words_file", f"cannot read the stop-word list: {exc}")
        words.update(
            line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
        )
    return DictionaryConfig(
        enabled=enabled,
        kinds=frozenset(kinds),
        refresh_seconds=refresh,
        stop_words=frozenset(words),
        stop_words_file=words_file,
        min_chars=min_chars,
    )


def _zip3_restricted(t: _Table, path: Path | None) -> frozenset[str]:
    """The restricted 3-digit ZIP prefixes: from ``path``, else the list in the package."""
    key = "zip3_restricted_file"
    try:
        if path is None:
            return restricted_prefixes()
        return load_restricted(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        t.fail(key, f"cannot read the ZIP prefix list: {exc}")
    except ValueError as exc:
        where = str(path) if path is not None else "the list shipped with phigate"
        t.fail(key, f"{where!r}, {exc}")

def _mask(t: _Table, text: str) -> tuple[str, int | None]:
    name, sep, arg = text.partition(":")
    if name == "partial":
        if not sep or not arg.isascii() or not arg.isdigit():
            t.fail("mask", f"write partial as 'partial:N' (N = characters kept), got {text!r}")
        keep = int(arg)
        if not 1 <= keep <= _PARTIAL_MAX:
            t.fail("mask", f"partial keeps 1 to {_PARTIAL_MAX} characters, got {keep}")
        return name, keep
    if name not in MASKS or sep:
        near = difflib.get_close_matches(name, MASKS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        shown = ", ".join("partial:N" if m == "partial" else m for m in MASKS)
        t.fail("mask", f"unknown mask {text!r}{hint}; use {shown}")
    return name, None

def _pseudonym_key(t: _Table, path: Path) -> SecretBytes:
    key = "pseudonym_key_file"
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(_MAX_SECRET_BYTES + 1)
    except OSError as exc:
        t.fail(key, f"cannot read {str(path)!r}: {exc.strerror}")
    if mode & 0o077:
        t.fail(
            key,
            f"{str(path)!r} is readable or writable by group or others (mode "
            f"{mode & 0o777:04o}); run chmod 600 on it",
        )
    if len(raw) > _MAX_SECRET_BYTES:
        t.fail(key, f"{str(path)!r} is larger than {_MAX_SECRET_BYTES} bytes")
    if len(raw) < _PSEUDONYM_KEY_MIN_BYTES:
        t.fail(
            key,
            f"{str(path)!r} holds {len(raw)} bytes; a pseudonym key needs at least "
            f"{_PSEUDONYM_KEY_MIN_BYTES} random bytes",
        )
    if len(set(raw)) < 8:
        t.fail(key, f"{str(path)!r} does not look random (too few distinct bytes)")
    return SecretBytes(raw)

def _check_pattern(t: _Table, key: str, pattern: str) -> None:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        t.fail(key, f"is not a valid regular expression: {exc}")
    if compiled.fullmatch("") is not None:
        t.fail(key, "matches the empty string; it would tag every value")

