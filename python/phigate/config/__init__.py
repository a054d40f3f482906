"""Load and validate phigate's TOML config into frozen dataclasses and the data-plane JSON.

One module per section (server, identity, targets, roles, phi); the dataclasses and public
constants are in ``model``. Everything callers use is importable from ``phigate.config``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from phigate.config.approvals import (
    _APPROVALS_KEYS,
    ApprovalsConfig,
    ApproverRule,
    _approvals,
    _approvers,
)
from phigate.config.audit import _AUDIT_KEYS, _audit
from phigate.config.identity import _IDENTITY_KEYS, _identity, apikeys_store_from_file
from phigate.config.model import (
    ALLOW_CLASSES,
    APPROVAL_CLASSES,
    APPROVAL_MODES,
    DEFAULT_APPROVAL_TIMEOUT,
    DEFAULT_SCHEMA,
    DEFAULT_STARTUP_PARAMETERS,
    DICTIONARY_KINDS,
    MASKING_NOTICES,
    MASKS,
    NEVER_RELATION_NAMES,
    NEVER_RELATIONS,
    OPERATIONS,
    PHI_KINDS,
    RESERVED_SCHEMA,
    ApiKeysConfig,
    ApprovalPattern,
    AuditConfig,
    ColumnRule,
    Config,
    DictionaryConfig,
    IdentityConfig,
    OidcConfig,
    PhiConfig,
    RoleConfig,
    RoleSet,
    Secret,
    SecretBytes,
    ServerConfig,
    TargetConfig,
    parse_identity_class,
)
from phigate.config.phi import _PHI_KEYS, _phi
from phigate.config.roles import _groups, _roles, fold_name
from phigate.config.server import _SERVER_KEYS, _server
from phigate.config.table import _Ctx, _Table
from phigate.config.targets import _TARGET_KEYS, _TARGET_NAME, _target
from phigate.errors import ConfigError

__all__ = [
    "DEFAULT_SCHEMA",
    "DEFAULT_STARTUP_PARAMETERS",
    "ApiKeysConfig",
    "ApprovalsConfig",
    "ApproverRule",
    "AuditConfig",
    "ColumnRule",
    "Config",
    "DICTIONARY_KINDS",
    "DictionaryConfig",
    "MASKING_NOTICES",
    "MASKS",
    "PHI_KINDS",
    "PhiConfig",
    "OidcConfig",
    "IdentityConfig",
    "OPERATIONS",
    "ALLOW_CLASSES",
    "APPROVAL_CLASSES",
    "APPROVAL_MODES",
    "DEFAULT_APPROVAL_TIMEOUT",
    "ApprovalPattern",
    "RoleConfig",
    "RoleSet",
    "Secret",
    "SecretBytes",
    "ServerConfig",
    "TargetConfig",
    "apikeys_store_from_file",
    "NEVER_RELATIONS",
    "NEVER_RELATION_NAMES",
    "RESERVED_SCHEMA",
    "fold_name",
    "load_config",
    "parse_config",
    "parse_identity_class",
]

def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file; relative paths in it resolve against its directory."""
    p = Path(path).absolute()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError("", str(p), "config file not found") from None
    except OSError as exc:
        raise ConfigError("", str(p), f"cannot read config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("", str(p), "config file is not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", str(p), f"invalid TOML: {exc}") from None
    return parse_config(data, source=str(p), base_dir=p.parent)

def parse_config(
    data: Mapping[str, Any], source: str = "<string>", *, base_dir: str | Path | None = None
) -> Config:
    """Validate an already-parsed TOML document.

    Relative paths resolve against ``base_dir``, else the directory of ``source`` when it is a
    path, else the current directory.
    """
    if base_dir is None:
        base_dir = Path(source).parent if not source.startswith("<") else Path.cwd()
    ctx = _Ctx(source, Path(base_dir).absolute())
    sections = {
        "server", "identity", "targets", "groups", "roles", "phi", "audit",
        "approvals", "approvers",
    }  # fmt: skip
    root = _Table(data, "", ctx, sections)
    server = _server(root.table("server", required=False, allowed=_SERVER_KEYS), ctx)
    identity = root.table("identity", required=True, allowed=_IDENTITY_KEYS)
    identity_config = _identity(identity)
    targets_tbl = root.table("targets", required=True, allowed=None)
    if not targets_tbl.data:
        targets_tbl.fail("", "at least one target is required, e.g. [targets.ehr]")
    targets: dict[str, TargetConfig] = {}
    for name in targets_tbl.data:
        if not _TARGET_NAME.fullmatch(name):
            targets_tbl.fail(
                name, "target names are what clients send as dbname: use 1-63 of A-Z a-z 0-9 _ . -"
            )
        targets[name] = _target(name, targets_tbl.table(name, required=True, allowed=_TARGET_KEYS))
    roles_tbl = root.table("roles", required=False, allowed=None)
    roles = _roles(roles_tbl, targets)
    approvals = None
    if "approvals" in data:
        approvals = _approvals(
            root.table("approvals", required=True, allowed=_APPROVALS_KEYS), ctx, targets
        )
    # A rule that asks a person needs somewhere to send the request: without [approvals]
    # the statement would be refused or waved through, neither of which the rule means.
    if approvals is None:
        for name, role in roles.items():
            key = role.asks_approval
            if key is not None:
                roles_tbl.fail(f"{name}.{key}", "needs approvers: add an [approvals] section "
                               "(where requests are kept and approvers reach them), see "
                               "docs/approvals.md")  # fmt: skip
    groups = _groups(root.table("groups", required=False, allowed=None), roles)
    phi = _phi(root.table("phi", required=False, allowed=_PHI_KEYS))
    audit = None
    if "audit" in data:
        audit = _audit(root.table("audit", required=True, allowed=_AUDIT_KEYS), ctx)
    if phi.subjects and audit is None:
        # Disclosures are recorded as keyed hashes of the subject keys: no key, no accounting.
        root.table("phi", required=True, allowed=_PHI_KEYS).table(
            "subjects", required=True, allowed=None
        ).fail("", "needs an [audit] section: disclosures are recorded in the audit trail as "
               "hashes keyed with its hmac_key")  # fmt: skip
    approvers = _approvers(root.table("approvers", required=False, allowed=None), roles, targets)
    if approvers and approvals is None:
        root.table("approvers", required=True, allowed=None).fail(
            "", "needs an [approvals] section (its store keeps the requests approvers decide on)"
        )
    return Config(
        server=server,
        identity=identity_config,
        targets=MappingProxyType(targets),
        source=source,
        groups=MappingProxyType(groups),
        roles=MappingProxyType(roles),
        phi=phi,
        audit=audit,
        approvals=approvals,
        approvers=approvers,
    )

