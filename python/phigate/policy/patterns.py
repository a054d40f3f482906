"""The text `approval_patterns` are compared with: a statement normalized as the audit record's
`normalized` shows it (literals as $n, comments dropped, names the analyzer did not resolve as
<name>), without the trailing semicolon. A message is matched whole and statement by statement,
so appending `; SELECT 1` does not slip a statement past its pattern."""

from __future__ import annotations

import re
from collections.abc import Sequence

from pglast import parser as _pg_parser

from phigate.audit.redact_sql import catalog_names, redact_sql
from phigate.config import DEFAULT_SCHEMA
from phigate.config.model import ApprovalPattern
from phigate.policy.analyze import Facts, analyze

__all__ = ["compile_pattern", "matches", "normalized_texts"]

_REGEX = "re:"


def compile_pattern(text: str, number: int) -> ApprovalPattern:
    """An `approval_patterns` entry, checked: ValueError says why it cannot be used."""
    if text.startswith(_REGEX):
        body = text[len(_REGEX) :]
        if not body.strip():
            raise ValueError("an empty regular expression matches every statement")
        try:
            regex = re.compile(body, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"is not a valid regular expression: {exc}") from None
        return ApprovalPattern(number, None, regex)
    facts = analyze(text, schema=DEFAULT_SCHEMA)
    if not facts:
        raise ValueError("holds no SQL statement")
    for f in facts:
        if f.fail is not None:
            raise ValueError(f"is not a statement phigate can judge: {f.fail.message}")
    texts = normalized_texts(text, facts)
    return ApprovalPattern(number, texts[0].casefold(), None)


def normalized_texts(sql: str, facts: Sequence[Facts]) -> list[str]:
    """The whole message's normalized text, then each statement's when there are several."""
    texts = [_normalize(sql, facts)]
    if len(facts) > 1:
        try:
            slices = _pg_parser.split(sql, with_parser=True, only_slices=True)
        except _pg_parser.ParseError:  # analyze() parsed it; nothing else to compare then
            return texts
        for piece, f in zip(slices, facts, strict=False):
            texts.append(_normalize(sql[piece], [f]))
    return texts


def matches(pattern: ApprovalPattern, texts: Sequence[str]) -> bool:
    if pattern.regex is not None:
        return any(pattern.regex.search(t) for t in texts)
    return any(t.casefold() == pattern.normalized for t in texts)


def _normalize(sql: str, facts: Sequence[Facts]) -> str:
    return redact_sql(sql, catalog_names(facts)).rstrip().removesuffix(";").rstrip()
