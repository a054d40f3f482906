"""The masking state the data plane verifies results with (DESIGN §5 layer 2): per target, the
classified columns by (table OID, attnum) from the catalog, plus the pseudonym key, the
content-detector patterns and the Safe Harbor ZIP prefixes. Sent to the engine at start, on
reload and on every catalog refresh."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from phigate.config import Config
from phigate.masking.classification import CatalogSnapshot

__all__ = ["masking_state_json"]


def masking_state_json(config: Config, catalogs: Mapping[str, CatalogSnapshot | None]) -> str:
    """The JSON `Engine.set_masking` takes. A target whose catalog could not be loaded has no
    entry: the control plane refuses its masked identities' statements, and layer 2 still runs
    the content detectors over whatever reaches them."""
    phi = config.phi
    targets: dict[str, Any] = {}
    for name, snap in catalogs.items():
        if snap is None:
            continue
        targets[name] = {
            "rules": [
                [oid, attnum, rule.kind, rule.mask_spec]
                for (oid, attnum), rule in sorted(snap.column_rules().items())
            ],
            # Views whose use of classified columns cannot be mapped to rules: every column
            # read from one is treated as protected.
            "protected_oids": sorted(r.oid for r in snap.relations.values() if r.refuse),
        }
    key = phi.pseudonym_key
    doc = {
        "pseudonym_key_hex": key.reveal().hex() if key is not None else None,
        "mrn_pattern": phi.mrn_pattern,
        "extra_patterns": dict(phi.extra_patterns),
        # The rewrite's zip3 (mask_sql) uses this same set: both layers show the same prefix.
        "zip3_restricted": sorted(phi.zip3_restricted),
        "targets": targets,
    }
    return json.dumps(doc)
