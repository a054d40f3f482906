"""A scripted control plane for data-plane tests: the native Engine with answers the test
chooses instead of the real policy, so the data plane's own rules can be driven directly."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rawpg import RawConn


@dataclass
class ScriptedControlPlane:
    """Answers like the real control plane; `deny_word` makes statements containing it refused,
    and `decide` (sql -> extra answer fields, e.g. {"protected": True}) shapes allow answers."""

    pg: Any
    auth: dict[str, Any] = field(default_factory=dict)
    deny_word: str | None = None
    decide: Callable[[str], dict[str, Any]] | None = None
    masking: dict[str, Any] | None = None  # Engine.set_masking state, set before start
    decided: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from phigate import _native

        cfg = {
            "listen": ["127.0.0.1:0"],
            "require_tls": False,
            "targets": {
                "ehr": {
                    "host": self.pg.host,
                    "port": self.pg.port,
                    "database": self.pg.ehr_database,
                    "user": self.pg.service_user,
                    "password": self.pg.service_password,
                    "tls": "disable",
                }
            },
        }
        self.engine = _native.Engine(json.dumps(cfg))
        if self.masking is not None:
            self.engine.set_masking(json.dumps(self.masking))
        self.engine.start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        host, port = self.engine.listen_addresses()[0].rsplit(":", 1)
        self.host, self.port = host, int(port)

    def _serve(self) -> None:
        while not self._stop.is_set():
            for r in self.engine.take_requests():
                p = r.payload
                if r.kind == "authenticate":
                    r.reply(
                        {
                            "ok": True,
                            "subject": "agent",
                            "groups": [],
                            "identity_class": "c",
                            **self.auth,
                        }
                    )
                else:
                    self.decided.append(p["sql"])
                    if self.deny_word and self.deny_word in p["sql"]:
                        r.reply(
                            {
                                "action": "deny",
                                "sqlstate": "42501",
                                "message": "refused by rule test",
                                "hint": "ask for it",
                                "cache": "exact",
                            }
                        )
                    else:
                        extra = self.decide(p["sql"]) if self.decide is not None else {}
                        r.reply({"action": "allow", "cache": "exact", **extra})
            time.sleep(0.005)

    def reload(self, deny_word: str | None) -> None:
        self.deny_word = deny_word
        self.engine.bump_epoch()

    def set_masking(self, state: dict[str, Any]) -> None:
        self.engine.set_masking(json.dumps(state))

    #: Any password logs in: the scripted control plane accepts every credential.
    token = "scripted-token"  # noqa: S105  (not a secret)

    @property
    def dsn(self) -> str:
        host = f"host={self.host} port={self.port}"
        return f"{host} dbname=ehr user=agent password={self.token} sslmode=disable"

    def connect(self) -> RawConn:
        c = RawConn(self.host, self.port)
        out = c.login("token")
        assert out[-1].tag == "Z", [m.fields() for m in out if m.tag == "E"]
        return c

    def close(self) -> None:
        self._stop.set()
        self.engine.shutdown(0.5)
