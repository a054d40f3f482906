"""Translate the Rust regular expressions of content detectors into PostgreSQL's ARE dialect,
for the free-text mask the rewrite computes in SQL."""

from __future__ import annotations

import re


def _u(cp: int) -> str:
    # An ARE escape: one character by code point (the short form for the BMP).
    return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"


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
