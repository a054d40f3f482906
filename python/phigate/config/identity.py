"""The [identity] section: OIDC token verification and the API key store."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

from phigate.config.model import ApiKeysConfig, IdentityConfig, OidcConfig
from phigate.config.table import _Ctx, _Table
from phigate.config.targets import _is_loopback
from phigate.errors import ConfigError

_ALLOWED_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip

_DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")

_OIDC_KEYS = frozenset({
    "issuer", "audience", "jwks_file", "jwks_url", "groups_claim", "algorithms", "leeway",
    "jwks_cache_ttl", "jwks_min_refresh_interval",
})  # fmt: skip

_IDENTITY_KEYS = frozenset({"oidc", "apikeys", "close_on_expiry"})

_APIKEYS_KEYS = frozenset({"store"})

def _identity(t: _Table) -> IdentityConfig:
    apikeys = None
    if "apikeys" in t.data:
        apikeys = _apikeys(t.table("apikeys", required=True, allowed=_APIKEYS_KEYS))
    oidc = None
    if "oidc" in t.data or apikeys is None:
        if "oidc" not in t.data:
            t.fail("oidc", "is required (or [identity.apikeys] for a gateway taking API keys only)")
        oidc = _oidc(t.table("oidc", required=True, allowed=_OIDC_KEYS))
    return IdentityConfig(
        oidc=oidc, apikeys=apikeys, close_on_expiry=t.boolean("close_on_expiry", True)
    )

def _apikeys(t: _Table) -> ApiKeysConfig:
    p = Path(t.string("store")).expanduser()
    if not p.is_absolute():
        p = t.ctx.base_dir / p
    if not p.parent.is_dir():
        t.fail("store", f"directory {str(p.parent)!r} does not exist")
    if p.exists():
        if not p.is_file():
            t.fail("store", f"{str(p)!r} is not a regular file")
        if not os.access(p, os.R_OK):
            t.fail("store", f"{str(p)!r} is not readable by this user")
    # A missing file is fine: it is an empty store until `phigate apikey create` writes it.
    return ApiKeysConfig(store=p)

def apikeys_store_from_file(path: str | os.PathLike[str]) -> Path | None:
    """The ``[identity.apikeys] store`` of a config file, validating only that section.

    `phigate apikey` uses this instead of load_config(): an administrator managing keys may not
    be able to read the upstream password files or systemd credentials the full config names.
    """
    p = Path(path).absolute()
    try:
        data = tomllib.loads(p.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError("", str(p), "config file not found") from None
    except OSError as exc:
        raise ConfigError("", str(p), f"cannot read config file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("", str(p), "config file is not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", str(p), f"invalid TOML: {exc}") from None
    ctx = _Ctx(str(p), p.parent)
    identity = _Table(data.get("identity", {}), "identity", ctx, None)
    if "apikeys" not in identity.data:
        return None
    return _apikeys(identity.table("apikeys", required=True, allowed=_APIKEYS_KEYS)).store

def _oidc(t: _Table) -> OidcConfig:
    jwks_file = t.path("jwks_file", what="JWKS file")
    jwks_url = t.opt_string("jwks_url")
    if (jwks_file is None) == (jwks_url is None):
        t.fail("jwks_file", "set exactly one of jwks_file or jwks_url")
    if jwks_file is not None:
        _check_jwks_file(t, jwks_file)
    if jwks_url is not None:
        _check_jwks_url(t, jwks_url)

    algorithms = t.string_list("algorithms", _DEFAULT_ALGORITHMS)
    if not algorithms:
        t.fail("algorithms", "needs at least one algorithm")
    for alg in algorithms:
        if alg.lower() == "none":
            t.fail("algorithms", "'none' is never allowed: it accepts unsigned tokens")
        if alg.upper().startswith("HS"):
            t.fail(
                "algorithms",
                f"{alg!r} is never allowed: HMAC keyed with a published key lets anyone forge "
                "tokens",
            )
        if alg not in _ALLOWED_ALGORITHMS:
            t.fail("algorithms", f"unknown algorithm {alg!r}; use {', '.join(_ALLOWED_ALGORITHMS)}")

    ttl = t.seconds("jwks_cache_ttl", 3600, 0, 7 * 86400, lo_open=True)
    return OidcConfig(
        issuer=t.string("issuer"),
        audience=t.string("audience"),
        jwks_file=jwks_file,
        jwks_url=jwks_url,
        groups_claim=t.string("groups_claim", "groups"),
        algorithms=algorithms,
        leeway=t.seconds("leeway", 30, 0, 300, lo_open=False),
        jwks_cache_ttl=ttl,
        jwks_min_refresh_interval=t.seconds(
            "jwks_min_refresh_interval", 30, 0, 3600, lo_open=False
        ),
    )

def _check_jwks_file(t: _Table, path: Path) -> None:
    # A broken JWKS file would reject every agent; catch it at check-config time instead.
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        t.fail("jwks_file", f"{str(path)!r} is not valid JSON")
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list) or not doc["keys"]:
        t.fail("jwks_file", f'{str(path)!r} is not a JWKS (needs a non-empty "keys" list)')

def _check_jwks_url(t: _Table, url: str) -> None:
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    host = host[1:].split("]", 1)[0] if host.startswith("[") else host.split(":", 1)[0]
    if scheme == "https" and host:
        return
    if scheme == "http" and host and _is_loopback(host):
        return  # a development IdP on this machine
    t.fail("jwks_url", "must be an https:// URL (http:// only for a loopback host)")

