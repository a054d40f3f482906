"""The control plane's exception hierarchy: every deliberate error derives from PhigateError."""

from __future__ import annotations

from typing import Literal

#: The SQLSTATEs an identity failure may carry: 28P01 means the presented token is bad
#: (expired, wrong audience, bad signature, ...); 28000 means no usable identity at all.
IdentitySqlstate = Literal["28P01", "28000"]


class PhigateError(Exception):
    """Base class of every error phigate raises on purpose (never for bugs)."""


class ConfigError(PhigateError):
    """A configuration value is missing, unknown, of the wrong type or out of range.

    ``str()`` names the file and the dotted key so the operator can fix it without
    guessing, e.g. ``/etc/phigate/phigate.toml: targets.ehr.port: must be ...``.
    """

    def __init__(self, key: str, file: str, message: str) -> None:
        self.key = key
        self.file = file
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{where}: {self.message}"


class IdentityError(PhigateError):
    """An identity could not be established; the message is safe to show the client.

    Messages never contain the token, claim values taken from the token, or local paths.
    ``reason`` is the class the audit record names (expired, wrong_audience, bad_signature,
    revoked_key, no_role, ...: see docs/audit-records.md); ``credential`` what is known of the
    credential that failed without revealing it (an API key's id), for the same record.
    """

    def __init__(
        self,
        sqlstate: IdentitySqlstate,
        message: str,
        reason: str = "other",
        credential: dict[str, str | None] | None = None,
    ) -> None:
        if sqlstate not in ("28P01", "28000"):
            raise ValueError(f"identity errors use SQLSTATE 28P01 or 28000, not {sqlstate!r}")
        self.sqlstate: IdentitySqlstate = sqlstate
        self.message = message
        self.reason = reason
        self.credential = credential
        super().__init__(message)

    def __str__(self) -> str:
        return self.message
