"""Answer the data plane's "decide" requests: identity class -> RoleSet, analyze, judge, and
for identities that see PHI masked, rewrite the statement so the database only computes on
masked values (DESIGN §5 layer 1).

One PolicyEngine per loaded config and catalog set; a reload builds a new one (and the data plane
bumps its decision-cache epoch), so rule changes apply to the next statement of every live
session.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import orjson
from pglast import parser as _pg_parser

from phigate.audit.redact_sql import catalog_names, redact_sql
from phigate.config import DEFAULT_SCHEMA, Config, RoleSet, parse_identity_class
from phigate.errors import IdentityError
from phigate.masking.classification import CatalogSnapshot
from phigate.masking.comparison_notices import comparison_notices
from phigate.masking.free_text_uses import free_text_use, refusal
from phigate.masking.passthrough import copy_columns, passthrough_oids
from phigate.masking.rewrite import MaskSQL, mask_sql, rewrite
from phigate.policy.analyze import Facts, analyze
from phigate.policy.audit_facts import audit_facts
from phigate.policy.notices import MaskingNotices
from phigate.policy.risk import approval_answer
from phigate.policy.rules import Decision, decide
from phigate.policy.show_masking import is_show_masking, masking_rows, show_answer

__all__ = ["PolicyEngine"]

log = logging.getLogger(__name__)

_MAX_CLASSES = 4096  # distinct identity classes remembered (role combinations x targets)


class PolicyEngine:
    def __init__(
        self,
        config: Config,
        catalogs: Mapping[str, CatalogSnapshot | None] | None = None,
        notes: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        # Per target: the PHI catalog, or None when it could not be loaded (fail closed).
        self.catalogs: Mapping[str, CatalogSnapshot | None] = catalogs or {}
        # Per target without a catalog: why, in words the refused client may read.
        self.notes: Mapping[str, str] = notes or {}
        self._rolesets: dict[str, RoleSet | None] = {}
        self._mask_sql = mask_sql(config.phi)
        # Per target: the masks with pseudonyms on when its catalog found phigate's functions
        # ready with our key. Catalogs do not change under an engine (a reload makes a new one).
        self._target_masks: dict[str, MaskSQL] = {}
        self._protected_by_target: dict[str | None, frozenset[tuple[str, str]]] = {}
        self._notices = MaskingNotices(names_tagged=config.phi.dictionary.enabled)
        # Says whether a name holds an identifier (detectors or dictionary): such a name is
        # not logged as written even when the analyzer resolved it (a made-up column named
        # like a patient). None: only the analyzer's resolution decides.
        self.phi_in_text: Callable[[str], bool] | None = None

    def _protected(self, target: str | None) -> frozenset[tuple[str, str]]:
        """Relations holding classified PHI on ``target`` (for `approval_bulk_reads`): the
        [phi.columns] tables, and the partitions, children and views the catalog found."""
        found = self._protected_by_target.get(target)
        if found is None:
            catalog = self.catalogs.get(target or "")
            found = self.config.phi.relations() | (
                catalog.protected_relations() if catalog is not None else frozenset()
            )
            self._protected_by_target[target] = found
        return found

    def masks(self, target: str, catalog: CatalogSnapshot) -> MaskSQL:
        masks = self._target_masks.get(target)
        if masks is None:
            state = catalog.pseudonym_functions
            masks = replace(self._mask_sql, pseudonyms=state is not None and state.ready)
            self._target_masks[target] = masks
        return masks

    def _dictionary_masks(self, clear_kinds: frozenset[str]) -> bool:
        """True when the data plane's identifier dictionary masks identifiers of some kind in
        the free text this identity reads: it is on and learns a kind masked for it. Free-text
        columns are then read whole or not at all (free_text_uses.py)."""
        dictionary = self.config.phi.dictionary
        return dictionary.enabled and bool(
            dictionary.kinds & self.config.phi.masked_kinds(clear_kinds)
        )

    def roleset(self, identity_class: str) -> RoleSet | None:
        """The RoleSet an authenticate answer's identity_class stands for (None: no role)."""
        try:
            return self._rolesets[identity_class]
        except KeyError:
            pass
        rs = self._resolve(identity_class)
        if len(self._rolesets) >= _MAX_CLASSES:
            self._rolesets.clear()
        self._rolesets[identity_class] = rs
        return rs

    def _resolve(self, identity_class: str) -> RoleSet | None:
        try:
            parsed = parse_identity_class(identity_class)
            if parsed is not None:  # RoleSet.identity_class: [[roles...], target]
                names, target = parsed
                rs = self.config.roleset(names, target)
                if rs is not None and rs.names != tuple(sorted(set(names))):
                    # A role was removed or narrowed by a reload: judge with what is left.
                    log.info("identity class %s: some roles no longer apply", identity_class)
                return rs
        except (ValueError, IdentityError):
            pass
        return None

    def decide(self, identity_class: str, sql: str) -> dict[str, Any]:
        roleset = self.roleset(identity_class)
        schema = DEFAULT_SCHEMA  # without a role every statement is refused, whatever it names
        if roleset is not None:
            # The identity class names the target; its pinned schema is what the upstream
            # session resolves unqualified names with (a reload cannot change it: server.py).
            target = self.config.targets.get(roleset.target or "")
            if target is None:
                return _target_gone(roleset.target)
            schema = target.schema
        facts = analyze(sql, schema=schema)
        protected = self._protected(roleset.target) if roleset is not None else frozenset()
        decision = decide(facts, roleset, protected=protected)
        literal = any(f.literal_sensitive for f in facts)
        # analyze() already parsed the text; an unparsable one is refused with 42601 anyway.
        parses = not any(f.kind == "invalid" for f in facts)
        cache = "exact" if literal or not parses else "normalized"
        # What the statement event shows: no comment, literal or client-made label (PHI hides
        # there), only keywords, operators, $n and the names the analyzer resolved. A refused
        # statement may name anything (a made-up table, function or column), so only keywords
        # and pg_catalog names of it are shown.
        names = frozenset[str]()
        if decision.action == "allow" and roleset is not None:
            names = catalog_names(facts, self.catalogs.get(roleset.target or ""))
        if names and self.phi_in_text is not None:
            check = self.phi_in_text
            names = frozenset(n for n in names if not check(n))
        normalized: str | None = redact_sql(sql, names)
        masked = roleset is not None and self.config.phi.masked_kinds(roleset.clear_kinds)
        if decision.action == "allow" and roleset is not None and any(
            is_show_masking(f) for f in facts
        ):
            result = self._show_masking(facts, roleset, normalized, bool(masked))
        elif decision.action == "allow" and roleset is not None and masked:
            result = self._masked(sql, facts, roleset, normalized, cache, schema)
        else:
            result = answer(decision, cache, normalized)
        result = _with_subjects(result, facts, self.config.phi.subjects)
        if result.get("action") == "allow" and roleset is not None:
            # Last: only a statement policy and masking allow may ask a person.
            approval = approval_answer(facts, roleset, decision, sql, protected)
            if approval is not None:
                result["approval"] = approval
            result.update(_cursor(facts))
            if roleset.max_rows is not None and len(facts) > 1 and "cursor_op" in result:
                # The data plane counts a cursor's rows across its FETCHes by the decision's one
                # cursor: beside other statements a FETCH could not be counted.
                result = {
                    "action": "deny", "sqlstate": "0A000", "cache": cache,
                    "normalized": normalized, "audit_rule": "max_rows cursor alone",
                    "message": "with a row limit (max_rows), DECLARE, FETCH, MOVE and CLOSE must "
                    "each be sent as a statement of its own (rule: max_rows)",
                    "hint": "Send the cursor statement alone, then the others.",
                }  # fmt: skip
        # What the statement record says of it (the data plane caches it with the decision).
        catalog = self.catalogs.get(roleset.target or "") if roleset is not None else None
        clear = roleset.clear_kinds if roleset is not None else frozenset[str]()
        result["audit"] = audit_facts(
            facts, decision, result, roleset, catalog, clear, names, self.phi_in_text,
            masking_catalog=catalog if masked else None,
        )  # fmt: skip
        result.pop("audit_rule", None)
        return result

    def _show_masking(
        self, facts: list[Facts], roleset: RoleSet, normalized: str | None, masked: bool
    ) -> dict[str, Any]:
        """SHOW phigate.masking: the identity's masked columns, as a constant statement."""
        if len(facts) != 1:
            return {
                "action": "deny", "sqlstate": "0A000", "cache": "exact", "normalized": normalized,
                "message": "SHOW phigate.masking must be sent as a statement of its own "
                "(rule: masking)", "audit_rule": "masking show alone",
                "hint": "Send SHOW phigate.masking alone, then the other statements.",
            }
        if not masked:
            return show_answer([], normalized)
        catalog = self.catalogs.get(roleset.target or "")
        if catalog is None:
            return self._no_catalog(roleset, normalized)
        return show_answer(masking_rows(catalog, roleset), normalized)

    def _no_catalog(self, roleset: RoleSet, normalized: str | None) -> dict[str, Any]:
        why = self.notes.get(roleset.target or "") or (
            "the PHI classification catalog for this target is not loaded")
        return {
            "action": "deny", "sqlstate": "58000", "cache": "none", "normalized": normalized,
            "message": f"{why}, so statements of identities that see PHI masked are refused "
            "(rule: masking)", "audit_rule": "masking no catalog",
            "hint": "The gateway retries reading it in the background: try again shortly. "
            "The gateway operator can see why in the gateway log.",
        }

    def _masked(
        self,
        sql: str,
        facts: list[Facts],
        roleset: RoleSet,
        normalized: str | None,
        cache: str,
        schema: str,
    ) -> dict[str, Any]:
        """An allowed statement of an identity that sees some PHI kinds masked."""
        catalog = self.catalogs.get(roleset.target or "")
        if catalog is None:
            return self._no_catalog(roleset, normalized)
        if any(f.kind == "ddl" for f in facts):
            # A temp table or view named like a protected relation would be what the server
            # reads while the rewrite masked the real one; a function or view could carry
            # protected values past the rewrite later. Nothing masked identities need.
            return {
                "action": "deny", "sqlstate": "42501", "cache": cache, "normalized": normalized,
                "message": "creating, changing or dropping database objects is refused for "
                "identities that see PHI masked (rule: masking)", "audit_rule": "masking ddl",
                "hint": "Use a role that sees the data it works on in clear, or ask the "
                "database owner to create the object.",
            }
        written = _masked_write(facts, catalog, roleset.clear_kinds)
        if written is not None:
            return {
                "action": "deny", "sqlstate": "42501", "cache": "exact", "normalized": normalized,
                "message": f"writing {written} is refused for identities that see it masked "
                "(rule: masking)", "audit_rule": "masking write",
                "hint": "Whether a write succeeds (a unique key, a constraint) would reveal values "
                "you may not read; ask for the clear kind if you need to write it.",
            }
        try:
            doc = orjson.loads(_pg_parser.parse_sql_json(sql))
        except _pg_parser.ParseError:
            doc = None  # refused below by the rewrite, with its message
        if doc is not None and self._dictionary_masks(roleset.clear_kinds):
            use = free_text_use(doc, catalog, roleset.clear_kinds, schema=schema)
            if use is not None:
                # The database would compute on the names the gateway's dictionary hides.
                # Exact: ORDER BY 1 (allowed) and ORDER BY 2 (refused) normalize alike.
                message, hint = refusal(use, roleset.names)
                return {"action": "deny", "sqlstate": "42501", "cache": "exact",
                        "normalized": normalized, "message": message, "hint": hint,
                        "audit_rule": "free_text use"}
        # 01M02: a masked column compared with a constant no masked value can meet. The notice
        # depends on the constant, so a decision carrying one is reused for this text only.
        # A role with masking_notices = "off" has clients that want no notices at all.
        comparisons = (
            comparison_notices(doc, catalog, roleset.clear_kinds, schema=schema)
            if doc is not None and roleset.masking_notices != "off" else []
        )  # fmt: skip
        plain = _plain_read(doc, catalog, roleset.clear_kinds, schema) if doc is not None else None
        # What the agent is told about the masked columns its result carries (by the data
        # plane, right before the result).
        notices = self._notices.for_statement(
            facts, catalog, roleset.clear_kinds, roleset.masking_notices)
        told = {"notices": notices} if notices else {}
        if plain is not None:
            # Layer 2 masks it by column origin, exactly and far cheaper than SQL; it may read
            # only these tables (any other origin is redacted).
            return _with_notices({"action": "allow", "cache": cache, "normalized": normalized,
                                  "protected": True, **plain, **told}, comparisons)
        masks = self.masks(roleset.target or "", catalog)
        result = rewrite(sql, catalog, roleset.clear_kinds, masks, schema=schema, doc=doc)
        if result.refuse is None and result.changed and any(
            f.kind == "explain" and (f.explain_analyze or f.explain_verbose) for f in facts
        ):
            # ANALYZE runs the statement and reports row counts per plan node; VERBOSE prints
            # the rewritten expressions. Neither is needed to use masked data.
            result = replace(result, refuse="EXPLAIN ANALYZE and EXPLAIN VERBOSE are refused "
                             "on relations holding masked PHI")
        if result.refuse is not None:
            return {
                "action": "deny", "sqlstate": result.sqlstate, "cache": "exact",
                "normalized": normalized, "message": f"{result.refuse} (rule: masking)",
                "audit_rule": "masking rewrite refused",
                "hint": result.hint
                or "Masked PHI cannot be read this way; ask for the clear kinds you need.",
            }
        # Layer 2 treats the computed columns of a statement reading a protected relation as
        # PHI unless the rewrite masked that relation at the source.
        protected = _reads_protected(facts, catalog, roleset.clear_kinds)
        if not result.changed:
            # No masked column is read; whether one is does not depend on literal values, so
            # the usual cache rule applies.
            return _with_notices({"action": "allow", "cache": cache, "normalized": normalized,
                                  "protected": protected, **told}, comparisons)
        # The rewrite keeps the client's literals, so it is reused for this exact text only.
        return _with_notices({"action": "allow", "cache": "exact", "normalized": normalized,
                              "rewrite": result.sql, "protected": protected, **told}, comparisons)


def _with_subjects(
    decision: dict[str, Any], facts: list[Facts], subjects: Mapping[tuple[str, str], str]
) -> dict[str, Any]:
    """``decision`` with the `[phi.subjects]` relations the statement names (read, written or
    returned): the data plane counts its rows that show no subject key as possibly any of
    their subjects. The names come from the parse, not literals, so caching is unaffected."""
    if decision.get("action") != "allow" or not subjects:
        return decision
    named = sorted({f"{s}.{n}" for f in facts for s, n, _ in f.relations if (s, n) in subjects})
    if named:
        decision["subject_relations"] = named
    return decision


def _cursor(facts: list[Facts]) -> dict[str, Any]:
    """DECLARE / FETCH / MOVE / CLOSE: the cursor the data plane counts max_rows across (the
    first such statement of the message)."""
    for f in facts:
        if f.cursor_op is not None:
            return {"cursor": f.cursor, "cursor_op": f.cursor_op}
    return {}


def _with_notices(decision: dict[str, Any], notices: list[dict[str, Any]]) -> dict[str, Any]:
    """``decision`` with ``notices`` added to its list (the data plane sends each with the
    result); one that carries a notice about the statement's constants is cached exactly."""
    if notices:
        decision["notices"] = [*decision.get("notices", ()), *notices]
        decision["cache"] = "exact"
    return decision


def _plain_read(
    doc: Mapping[str, Any], catalog: CatalogSnapshot, clear_kinds: frozenset[str], schema: str
) -> dict[str, Any] | None:
    """What the data plane needs to mask a plain read (or a text COPY of one) by itself: the
    table OIDs it may show, and for COPY each output column's origin and type. None when the
    statement needs the rewrite."""
    oids = passthrough_oids(doc, catalog, clear_kinds, schema=schema)
    if oids is not None:
        return {"origins": oids}
    cols = copy_columns(doc, catalog, clear_kinds, schema=schema)
    if cols is not None:
        return {"origins": sorted({oid for oid, _, _ in cols}), "copy_columns": cols}
    return None


def _reads_protected(
    facts: list[Facts], catalog: CatalogSnapshot, clear_kinds: frozenset[str]
) -> bool:
    """True if the statement names a relation with a column this identity sees masked (or a
    view the classification cannot map). A relation whose classified columns are all clear
    for it is not: `SELECT count(*) FROM notes` for a role that sees free text in clear must
    not come back redacted."""
    # A lookup per relation, not protected_relations(): that builds a new set every call.
    for f in facts:
        for schema, name, _ in f.relations:
            rel = catalog.relation(schema, name)
            if rel is not None and (rel.refuse or rel.masked_columns(clear_kinds)):
                return True
    return False


def _masked_write(
    facts: list[Facts], catalog: CatalogSnapshot, clear_kinds: frozenset[str]
) -> str | None:
    """The first classified column the statement writes while it is masked for this identity
    ("schema.table.column", or "rows of schema.table" for whole-row writes), else None."""
    for f in facts:
        for use in f.columns:
            if use.write is None:
                continue
            for schema, name in use.candidates:
                rel = catalog.relation(schema, name)
                if rel is None:
                    continue
                if use.column == "*":
                    if rel.masked_columns(clear_kinds):
                        return f"whole rows of {schema}.{name}"
                    continue
                col = rel.column(use.column)
                if col is not None and col.rule is not None and col.rule.masked_for(clear_kinds):
                    return f"{schema}.{name}.{use.column}"
    return None


def _target_gone(target: str | None) -> dict[str, Any]:
    """A session whose target a reload removed: what its names mean is no longer known."""
    return {
        "action": "deny",
        "sqlstate": "3D000",
        "cache": "none",
        "normalized": None,
        "message": f"database {json.dumps(target)} is no longer a target configured on this "
        "gateway",
        "hint": "Reconnect with a target name your gateway administrator gave you.",
        "audit": {"rule": "deny target removed"},
    }


def answer(decision: Decision, cache: str, normalized: str | None) -> dict[str, Any]:
    if decision.action == "allow":
        return {"action": "allow", "cache": cache, "normalized": normalized}
    return {
        "action": "deny",
        "sqlstate": decision.sqlstate or "42501",
        "message": decision.message or "refused by policy",
        "hint": decision.hint,
        "cache": cache,
        "normalized": normalized,
    }
