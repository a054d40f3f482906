"""The Safe Harbor list of restricted 3-digit ZIP prefixes the zip3 mask shows as 000**."""

from __future__ import annotations

import re
from importlib import resources

__all__ = ["ZIP3_RESTRICTED_FILE", "load_restricted", "restricted_prefixes"]

#: The data file shipped in the package (HHS de-identification guidance, 2000 Census).
ZIP3_RESTRICTED_FILE = "safe_harbor_zip3.txt"

_PREFIX = re.compile(r"[0-9]{3}")


def load_restricted(text: str) -> frozenset[str]:
    """The prefixes listed in ``text``: one per line, '#' comments, blank lines ignored.
    ValueError naming the line for anything that is not three ASCII digits."""
    out: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not _PREFIX.fullmatch(entry):
            raise ValueError(f"line {n}: {entry!r} is not a 3-digit ZIP prefix")
        out.add(entry)
    return frozenset(out)


def restricted_prefixes() -> frozenset[str]:
    """The list in the package's data file, read now (so a reload sees an edited file)."""
    ref = resources.files("phigate.masking").joinpath("data", ZIP3_RESTRICTED_FILE)
    return load_restricted(ref.read_text(encoding="utf-8"))
