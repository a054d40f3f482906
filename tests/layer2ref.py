"""A Python model of layer 2's masks (native/src/masking/: values.rs, dates.rs, detectors.rs).

The rewrite (layer 1) must yield exactly what layer 2 yields, so the parity tests compare the
SQL the rewrite emits, run on PostgreSQL, with these functions. Each follows its Rust
counterpart line by line; keep them in step when the Rust changes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from collections.abc import Mapping

REDACTED = "***"

# Rust's char::is_alphanumeric is Unicode Alphabetic or general category Nd, Nl, No.
# Alphabetic = the letter categories, Nl, and Other_Alphabetic, which Python's unicodedata
# does not expose: these are its code points below U+0530 (the rest are combining vowel signs
# of other scripts, which the tests do not use).
_OTHER_ALPHABETIC = frozenset({0x0345, *range(0x0363, 0x0370)})


def is_alphanumeric(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return cat[0] == "L" or cat in ("Nd", "Nl", "No") or ord(ch) in _OTHER_ALPHABETIC


def partial(s: str, keep_last: int) -> str:
    """values.rs text_mask, Mask::Partial."""
    n = len(s)
    keep = keep_last if n > keep_last else 0
    cut = n - keep
    return "".join("*" if i < cut and is_alphanumeric(c) else c for i, c in enumerate(s))


def email_domain(s: str) -> str:
    """values.rs text_mask, Mask::EmailDomain."""
    at = s.rfind("@")
    return REDACTED + s[at:] if at >= 0 else REDACTED


def zip3(s: str, restricted: frozenset[str]) -> str:
    """values.rs MaskContext::zip3: trimmed of ASCII whitespace (Rust's is_ascii_whitespace:
    no vertical tab), "NNNNN", "NNNNN-NNNN" or "NNN**" keeps its prefix and gets "**"; a
    restricted prefix is "000"; anything else "***"."""
    b = s.strip(" \t\n\f\r")
    if not (
        re.fullmatch("[0-9]{5}", b, re.ASCII)
        or re.fullmatch("[0-9]{5}-[0-9]{4}", b, re.ASCII)
        or re.fullmatch("[0-9]{3}[*][*]", b, re.ASCII)
    ) or not b.isascii():
        return REDACTED
    return "000**" if b[:3] in restricted else b[:3] + "**"


def is_pseudonym(s: str) -> bool:
    return len(s.encode()) == 20 and re.fullmatch("psn_[0-9a-f]{16}", s) is not None


def pseudonym(key: bytes, s: str) -> str:
    """values.rs text_mask, Mask::Pseudonym: MaskContext::pseudonym unless it already is one."""
    if is_pseudonym(s):
        return s
    return "psn_" + hmac.new(key, s.encode(), hashlib.sha256).hexdigest()[:16]


def int_pseudonym(key: bytes, text: str, hex_digits: int) -> int:
    """Layer 1's integer pseudonym (layer 2 redacts integers to 0 until it mirrors this): the
    first ``hex_digits`` hex digits of HMAC-SHA256(key, the value's text form)."""
    return int(hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:hex_digits], 16)


def _text_year(s: str) -> int | None:
    for m in re.finditer("[0-9]+", s):
        if len(m.group()) >= 4:
            y = int(m.group())
            return 1 - y if s.endswith(" BC") else y
    return None


def year_only(s: str, ty: str) -> str:
    """dates.rs year_only, text format; ``ty`` is "date", "timestamp" or "timestamptz"."""
    if s.endswith("infinity"):
        return s
    y = _text_year(s)
    if y is None:
        return {"date": "1900-01-01", "timestamp": "1900-01-01 00:00:00"}.get(
            ty, "1900-01-01 00:00:00+00"
        )
    yy, bc = (1 - y, " BC") if y <= 0 else (y, "")
    time = {"date": "", "timestamp": " 00:00:00"}.get(ty, " 00:00:00+00")
    return f"{yy:04d}-01-01{time}{bc}"


# --- detectors.rs ------------------------------------------------------------------------------

DEFAULT_MRN_PATTERN = r"MRN-[0-9]{7}"
_SSN = r"[0-9]{3}[- ][0-9]{2}[- ][0-9]{4}"
_PHONE = r"(?:\+?1[-. ]?)?(?:\([0-9]{3}\)[-. ]?|[0-9]{3}[-. ])[0-9]{3}[-. ][0-9]{4}"
_EMAIL = r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b"
_DOB = (
    r"(?i)\b(?:dob|d\.o\.b|date\s+of\s+birth|birth\s*date|birthday|born)"
    r"[^0-9\n]{0,40}?(?P<date>"
    r"[0-9]{1,2}[/.\-][0-9]{1,2}[/.\-][0-9]{2,4}"
    r"|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}"
    r"|(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\s+[0-9]{1,2}(?:st|nd|rd|th)?,?\s+[0-9]{4}"
    r"|[0-9]{1,2}(?:st|nd|rd|th)?\s+(?:of\s+)?(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?,?\s+[0-9]{4}"
    r")\b"
)  # fmt: skip


def _digit_bounded(text: str, start: int, end: int) -> bool:
    before = text[start - 1] if start > 0 else ""
    after = text[end] if end < len(text) else ""
    return not (before.isascii() and before.isdigit()) and not (after.isascii() and after.isdigit())


def scrub(text: str, mrn_pattern: str | None = None, extra: Mapping[str, str] | None = None) -> str:
    """Detectors::scrub with the config's MRN pattern and extra patterns (ssn_valid_only off).

    Python's re and Rust's regex both use leftmost-first semantics, so for these patterns the
    hits are the same; ``\\b`` is ASCII in the Rust source ((?-u:\\b)) and re.ASCII here."""
    rules: list[tuple[str, re.Pattern[str], int, bool]] = [
        ("[SSN]", re.compile(_SSN), 0, True),
        ("[MRN]", re.compile(mrn_pattern or DEFAULT_MRN_PATTERN), 0, mrn_pattern is None),
        ("[PHONE]", re.compile(_PHONE), 0, True),
        ("[EMAIL]", re.compile(_EMAIL, re.ASCII), 0, False),
        ("[DOB]", re.compile(_DOB, re.ASCII), 1, False),
    ]
    for name, pattern in (extra or {}).items():
        rules.append((f"[{name.strip('[]').upper()}]", re.compile(pattern), 0, False))
    hits: list[tuple[int, int, str]] = []
    for tag, rx, group, bounded in rules:
        for m in rx.finditer(text):
            start, end = m.span(group)
            if group == 0 and bounded and not _digit_bounded(text, start, end):
                continue
            hits.append((start, end, tag))
    hits.sort(key=lambda h: (h[0], -h[1]))
    out: list[str] = []
    last = 0
    for start, end, tag in hits:
        if start >= last and end > start:
            out.append(text[last:start])
            out.append(tag)
            last = end
    out.append(text[last:])
    return "".join(out)
