"""Each mask in words an agent (or a person) can act on: what a masked value looks like and what
still works on it. Used by the masking notices and nowhere else should re-word a mask."""

from __future__ import annotations

from phigate.masking.catalog_protocols import ColumnLike

# Types whose pseudonym is a number computed from the HMAC (mask_sql.py _INT_HEX): int2, int4,
# int8, numeric.
_NUMBER_PSEUDONYM_OIDS = frozenset({20, 21, 23, 1700})
_TEXT_OIDS = frozenset({25, 1043, 1042, 19})  # text, varchar, bpchar, name
_DATE_OIDS = frozenset({1082, 1114, 1184})  # date, timestamp, timestamptz


def describe_mask(column: ColumnLike, mask: str, kind: str, *, names_tagged: bool = False) -> str:
    """``mask`` ("redact", "partial:4", ...) of ``column`` (PHI ``kind``) as one clause, e.g.
    ``partial: only the last 4 characters shown``. An unknown mask is named as it is.
    ``names_tagged``: the identifier dictionary is on (free text loses names and places too,
    and can only be read whole)."""
    name, _, arg = mask.partition(":")
    if name == "redact":
        if column.type_oid in _TEXT_OIDS:
            return "redact: every value shown as ***"
        if column.type_oid in _DATE_OIDS:
            return "redact: every value shown as 1900-01-01"
        return "redact: every value replaced by the same placeholder of the column's type"
    if name == "null":
        return "null: always shown as NULL"
    if name == "partial":
        keep = int(arg) if arg.isdigit() else 0
        last = "character" if keep == 1 else f"{keep} characters"
        return f"partial: only the last {last} shown, other letters and digits replaced by *"
    if name == "year":
        year = "birth year" if kind == "dob" else "year"
        return f"year: shown as January 1 of the {year}"
    if name == "email_domain":
        return "email_domain: only the domain shown, as ***@example.org"
    if name == "pseudonym":
        if column.type_oid in _NUMBER_PSEUDONYM_OIDS:
            what = "a number computed from the value"
        else:
            what = "psn_ + 16 hex digits"
        return (
            f"pseudonym: {what}, the same value always gives the same pseudonym, so joins and "
            "GROUP BY still work"
        )
    if name == "free_text" and names_tagged:
        return (
            "free_text: identifiers in the text (SSNs, phone numbers, emails, MRNs, dates of "
            "birth, and the names, addresses, cities and ZIPs of the people in the database) "
            "replaced by tags like [NAME], [SSN]; read the column whole, phigate refuses "
            "searching, sorting or computing on it"
        )
    if name == "free_text":
        return (
            "free_text: identifiers found in the text (SSNs, phone numbers, emails, MRNs, dates "
            "of birth) replaced by tags like [SSN], [PHONE]"
        )
    if name == "zip3":
        return (
            "zip3: only the first 3 digits of the ZIP code shown, as 021**; 000** for sparsely "
            "populated areas"
        )
    return mask
