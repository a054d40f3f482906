"""Server parameters: which ones phigate never forwards from clients and never accepts in a
target's pinned params, with the reason it gives."""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

# Settings a target's `params` may not set (names compared case-insensitively, as the server
# does), and why. The gateway parses every statement itself and judges it for the session it
# chose: a setting that changes how the server reads statement text, or who the session is,
# would make the server run something other than what the gateway judged.
_REFUSED_PARAMS: Mapping[str, str] = MappingProxyType({
    "client_encoding": "the gateway always sends UTF8 (another encoding makes the server read "
    "the statement bytes differently from the gateway's parser)",
    "standard_conforming_strings": "the gateway always sends on (off makes the server read a "
    "backslash in '...' as an escape, so SQL could hide in what the gateway parsed as a string)",
    "backslash_quote": "it changes which string literals the server accepts, which the gateway's "
    "parser must read the same way",
    "role": "sessions run as the target's user, or as their role's db_role ([roles.*] db_role)",
    "session_authorization": "sessions run as the target's user, or as their role's db_role "
    "([roles.*] db_role)",
    "default_transaction_read_only": "it would override the read-only default the database sets "
    "for the target's user (set it there, with ALTER ROLE ... SET)",
    "session_replication_role": "it disables triggers and rules",
    "session_preload_libraries": "it loads server code into the session (auto_explain, for "
    "one, would log every statement the gateway sends); configure it on the server",
    "local_preload_libraries": "it loads server code into the session; configure it on the "
    "server",
})  # fmt: skip
# The gateway itself decides these: forwarding them from the client would let an agent pick the
# upstream database or user, start replication, or set arbitrary GUCs (search_path, role) via
# `options=-c ...`, all of which policy relies on being pinned.
_NEVER_FORWARDED = frozenset({"user", "database", "replication", "options"})
# Of those, what clients may never send either (the gateway replaces the other two itself).
_NEVER_FROM_CLIENTS: Mapping[str, str] = MappingProxyType({
    **{k: v for k, v in _REFUSED_PARAMS.items()
       if k not in ("client_encoding", "standard_conforming_strings")},
    "search_path": "unqualified names resolve with the target's params.search_path",
})  # fmt: skip
_GUC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,62}")
