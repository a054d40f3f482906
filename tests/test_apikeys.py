"""Static API keys: the store, verification, reload, last use, the CLI, config and dispatch."""

# ruff: noqa: S105, S106  # the "secrets" here are test fixtures

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvloop

from phigate.cli import main as cli_main
from phigate.config import ApiKeysConfig, apikeys_store_from_file, parse_config
from phigate.control.server import ControlPlane
from phigate.errors import ConfigError, IdentityError
from phigate.identity import apikeys as apikeys_mod
from phigate.identity.apikeys import (
    ApiKeyStore,
    ApiKeyVerifier,
    StoreError,
    _locked,
    hash_secret,
    looks_like_api_key,
    read_store,
)
from phigate.identity.oidc import Identity, NoOidcVerifier

KEY_RE = re.compile(r"phk_([0-9a-f]{12})_([a-z2-7]{52})")
DAY = 86400.0


class Clock:
    """A settable clock for both wall time (expiry) and monotonic time (reload throttling)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now
        self.mono = 1000.0

    def __call__(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> ApiKeyStore:
    return ApiKeyStore(tmp_path / "apikeys.json", clock=clock)


def verifier_for(store: ApiKeyStore, clock: Clock) -> ApiKeyVerifier:
    return ApiKeyVerifier(store.path, clock=clock, monotonic=clock.monotonic)


def refusal(verifier: ApiKeyVerifier, key: str) -> IdentityError:
    with pytest.raises(IdentityError) as info:
        verifier.verify(key)
    return info.value


# --- creating, listing, revoking -------------------------------------------------------------


def test_create_returns_the_key_once_and_stores_only_a_salted_hash(
    store: ApiKeyStore, clock: Clock
) -> None:
    record, key = store.create("ci-bot", ["readers", "analysts", "readers"], 90 * DAY)
    m = KEY_RE.fullmatch(key)
    assert m is not None and m.group(1) == record.id
    secret = m.group(2)
    assert len(secret) * 5 >= 256  # base32: 5 bits a character
    assert record.name == "ci-bot"
    assert record.groups == ("readers", "analysts")  # de-duplicated, order kept
    assert (record.created, record.expires) == (int(clock.now), int(clock.now + 90 * DAY))
    assert not record.revoked and record.last_used is None

    raw = store.path.read_text()
    assert secret not in raw and key not in raw
    assert secret.upper() not in raw
    doc = json.loads(raw)
    (stored,) = doc["keys"]
    assert stored["kdf"] == "hmac-sha256"
    assert bytes.fromhex(stored["hash"]) == hash_secret(
        bytes.fromhex(stored["salt"]), record.id, secret
    )
    assert set(stored) == {
        "id", "name", "groups", "kdf", "salt", "hash", "created", "expires", "revoked",
        "revoked_at", "last_used",
    }  # fmt: skip


def test_salts_differ_and_keys_are_unique(store: ApiKeyStore) -> None:
    made = [store.create(f"agent-{i}", ["g"], DAY) for i in range(5)]
    assert len({r.salt for r, _ in made}) == 5
    assert len({r.id for r, _ in made}) == 5
    assert len({k for _, k in made}) == 5
    assert [k.id for k in store.list()] == [r.id for r, _ in made]  # oldest first


def test_store_file_and_lock_are_private_and_writes_are_atomic(store: ApiKeyStore) -> None:
    old_umask = os.umask(0o022)
    try:
        store.create("a", ["g"], DAY)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    lock = store.path.with_name(store.path.name + ".lock")
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    inode = store.path.stat().st_ino
    store.create("b", ["g"], DAY)
    assert store.path.stat().st_ino != inode  # replaced by rename, never rewritten in place
    leftovers = [p.name for p in store.path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.mark.parametrize(
    ("name", "groups", "ttl", "why"),
    [
        ("", ["g"], DAY, "name"),
        ("bad name", ["g"], DAY, "name"),
        ("-x", ["g"], DAY, "name"),
        ("x" * 64, ["g"], DAY, "name"),
        ("ok", [], DAY, "at least one group"),
        ("ok", ["a\nb"], DAY, "group name"),
        ("ok", ["g"], 20 * 366 * DAY, "10 years"),
    ],
)
def test_create_validates(
    store: ApiKeyStore, name: str, groups: list[str], ttl: float, why: str
) -> None:
    with pytest.raises(StoreError, match=why):
        store.create(name, groups, ttl)
    assert not store.path.exists()


def test_revoke_by_id_name_or_full_key(store: ApiKeyStore, clock: Clock) -> None:
    a, key_a = store.create("alpha", ["g"], DAY)
    b, _ = store.create("beta", ["g"], DAY)
    c, _ = store.create("gamma", ["g"], DAY)
    clock.advance(5)
    revoked, changed = store.revoke(a.id)
    assert changed and revoked.revoked and revoked.revoked_at == int(clock.now)
    assert store.revoke(a.id) == (revoked, False)  # idempotent
    assert store.revoke("beta")[0].id == b.id
    assert store.revoke(key_a)[1] is False  # a pasted key revokes that key
    states = {k.name: k.state(clock.now) for k in store.list()}
    assert states == {"alpha": "revoked", "beta": "revoked", "gamma": "active"}
    assert not store.list()[2].revoked and c.id == store.list()[2].id


def test_revoke_by_ambiguous_or_unknown_name(store: ApiKeyStore) -> None:
    # Rotation: a second key with the same name overlaps the old one until it is revoked.
    old, _ = store.create("bot", ["g"], DAY)
    new, _ = store.create("bot", ["g"], DAY)
    with pytest.raises(
        StoreError, match=f"2 unrevoked keys are named 'bot' .*{old.id}.*revoke by id"
    ):
        store.revoke("bot")
    store.revoke(old.id)
    assert store.revoke("bot")[0].id == new.id  # now unambiguous
    with pytest.raises(StoreError, match="no API key with id or name 'nobody'"):
        store.revoke("nobody")


def test_expired_state(store: ApiKeyStore, clock: Clock) -> None:
    store.create("short", ["g"], 60)
    assert store.list()[0].state(clock.now) == "active"
    clock.advance(61)
    assert store.list()[0].state(clock.now) == "expired"


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("not json", "not valid JSON"),
        ('{"keys": []}', "not a phigate API key store"),
        ('{"version": 1, "keys": {}}', '"keys" must be a list'),
        ('{"version": 1, "keys": [{"id": "x"}]}', "key #1 is malformed"),
    ],
)
def test_malformed_store_is_an_error(tmp_path: Path, content: str, why: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(StoreError, match=why):
        read_store(path)


def test_missing_store_is_empty(tmp_path: Path) -> None:
    assert read_store(tmp_path / "nope.json") == {}
    assert ApiKeyStore(tmp_path / "nope.json").list() == []


# --- verification ----------------------------------------------------------------------------


def test_valid_key_gives_an_identity(store: ApiKeyStore, clock: Clock) -> None:
    record, key = store.create("ci-bot", ["readers", "analysts"], 90 * DAY)
    identity = verifier_for(store, clock).verify(key)
    assert identity == Identity(
        subject="ci-bot",
        groups=("readers", "analysts"),
        expires_at=float(record.expires),
        source="apikey",
        key_id=record.id,
        key_name="ci-bot",
    )


def test_refusals_say_which_without_echoing_the_key(store: ApiKeyStore, clock: Clock) -> None:
    revoked, revoked_key = store.create("old-bot", ["g"], DAY)
    store.revoke(revoked.id)
    expired, expired_key = store.create("tmp-bot", ["g"], 60)
    _, good_key = store.create("good-bot", ["g"], DAY)
    clock.advance(3 * 3600)
    v = verifier_for(store, clock)
    good_id = KEY_RE.fullmatch(good_key).group(1)  # type: ignore[union-attr]

    cases = {
        revoked_key: ("28P01", f'API key {revoked.id} ("old-bot") has been revoked'),
        expired_key: ("28P01", f'API key {expired.id} ("tmp-bot") expired 2h59m ago'),
        # unknown id, and a known id with a wrong secret: the same answer
        f"phk_{'0' * 12}_{'a' * 52}": ("28P01", "API key is not recognized"),
        f"phk_{good_id}_{'a' * 52}": ("28P01", "API key is not recognized"),
        "phk_short": ("28P01", "malformed API key"),
        good_key + "x": ("28P01", "malformed API key"),
    }
    for key, (sqlstate, message) in cases.items():
        err = refusal(v, key)
        assert err.sqlstate == sqlstate, key
        assert err.message.startswith(message), (key, err.message)
        assert key not in err.message
        m = KEY_RE.fullmatch(key)
        if m is not None:
            assert m.group(2) not in err.message


def test_state_is_only_told_to_the_holder_of_the_secret(store: ApiKeyStore, clock: Clock) -> None:
    record, _ = store.create("old-bot", ["g"], DAY)
    store.revoke(record.id)
    err = refusal(verifier_for(store, clock), f"phk_{record.id}_{'a' * 52}")
    assert "revoked" not in err.message
    assert err.message.startswith("API key is not recognized")


def test_comparison_is_constant_time_for_known_and_unknown_ids(
    store: ApiKeyStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    record, key = store.create("bot", ["g"], DAY)
    v = verifier_for(store, clock)
    calls: list[tuple[int, int]] = []
    real = apikeys_mod.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(apikeys_mod.hmac, "compare_digest", spy)
    v.verify(key)
    for wrong in (f"phk_{record.id}_{'a' * 52}", f"phk_{'f' * 12}_{'a' * 52}"):
        refusal(v, wrong)
    # Every path, including an unknown id, computes a MAC and compares 32-byte digests.
    assert calls == [(32, 32)] * 3


def test_verification_is_fast(store: ApiKeyStore, clock: Clock) -> None:
    for i in range(200):
        store.create(f"agent-{i}", ["g"], DAY)
    _, key = store.create("bot", ["g"], DAY)
    v = ApiKeyVerifier(store.path)  # real clocks: includes the once-a-second stat
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        v.verify(key)
    per_call = (time.perf_counter() - start) / n
    assert per_call < 0.001, f"{per_call * 1e6:.0f} µs per verification"


def test_looks_like_api_key() -> None:
    assert looks_like_api_key("phk_anything")
    assert not looks_like_api_key("eyJhbGciOi.x.y")
    assert not looks_like_api_key("")


# --- reload ----------------------------------------------------------------------------------


def test_store_changes_apply_after_at_most_a_second(store: ApiKeyStore, clock: Clock) -> None:
    v = verifier_for(store, clock)  # the store does not exist yet
    record, key = store.create("bot", ["g"], DAY)
    assert refusal(v, key).message.startswith("API key is not recognized")
    clock.mono += 0.5
    refusal(v, key)  # checked less than a second ago: not re-read yet
    clock.mono += 0.6
    assert v.verify(key).subject == "bot"

    store.revoke(record.id)
    v.verify(key)  # within the second: still the old view
    clock.mono += 1.0
    assert "revoked" in refusal(v, key).message


def test_reload_is_throttled(
    store: ApiKeyStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, key = store.create("bot", ["g"], DAY)
    v = verifier_for(store, clock)
    stats: list[Any] = []
    real_stat = os.stat

    def counting_stat(path: Any, *a: Any, **kw: Any) -> Any:
        if Path(path) == store.path:
            stats.append(path)
        return real_stat(path, *a, **kw)

    monkeypatch.setattr(apikeys_mod.os, "stat", counting_stat)
    for _ in range(100):
        v.verify(key)
    assert stats == []
    clock.mono += 1.0
    for _ in range(100):
        v.verify(key)
    assert len(stats) == 1


def test_a_broken_store_refuses_every_key_until_fixed(
    store: ApiKeyStore, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    _, key = store.create("bot", ["g"], DAY)
    v = verifier_for(store, clock)
    good = store.path.read_bytes()
    store.path.write_text("{ truncated")
    clock.mono += 1.0
    caplog.set_level(logging.ERROR)
    err = refusal(v, key)
    assert (err.sqlstate, err.message) == (
        "28000",
        "the gateway cannot read its API key store; tell the gateway operator",
    )
    assert "not valid JSON" in caplog.text and "refusing every API key" in caplog.text
    store.path.write_bytes(good)
    clock.mono += 1.0
    assert v.verify(key).subject == "bot"


# --- last use --------------------------------------------------------------------------------


def test_last_used_is_written_at_most_once_a_minute(store: ApiKeyStore, clock: Clock) -> None:
    record, key = store.create("bot", ["g"], DAY)
    v = verifier_for(store, clock)
    assert not v.flush_due()
    v.verify(key)
    assert v.flush_due()
    assert v.flush()
    assert read_store(store.path)[record.id].last_used == int(clock.now)
    mode = stat.S_IMODE(store.path.stat().st_mode)
    assert mode == 0o600

    clock.advance(30)
    v.verify(key)
    assert not v.flush_due()
    clock.advance(31)
    v.verify(key)
    assert v.flush_due()
    v.flush()
    assert read_store(store.path)[record.id].last_used == int(clock.now)
    assert "never" not in _cli_list(store.path)


def test_recording_use_never_undoes_a_concurrent_revoke(store: ApiKeyStore, clock: Clock) -> None:
    record, key = store.create("bot", ["g"], DAY)
    other, other_key = store.create("other", ["g"], DAY)
    v = verifier_for(store, clock)
    v.verify(key)
    store.revoke(other.id)  # the CLI, while the gateway has not re-read the file yet
    v.verify(other_key)  # still the gateway's old view for up to a second
    assert v.flush()
    on_disk = read_store(store.path)
    assert on_disk[other.id].revoked  # not overwritten by the gateway's stale view
    assert on_disk[record.id].last_used == int(clock.now)
    assert "revoked" in refusal(v, other_key).message  # and adopted at once


def test_flush_skips_while_the_cli_holds_the_lock(store: ApiKeyStore, clock: Clock) -> None:
    record, key = store.create("bot", ["g"], DAY)
    v = verifier_for(store, clock)
    v.verify(key)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _locked(store.path, wait=True):
            held.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(5)
        assert v.flush() is False
    finally:
        release.set()
        t.join()
    assert read_store(store.path)[record.id].last_used is None
    assert v.flush_due() and v.flush()
    assert read_store(store.path)[record.id].last_used == int(clock.now)


def test_unwritable_store_logs_and_retries_later(
    store: ApiKeyStore,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, key = store.create("bot", ["g"], DAY)
    v = verifier_for(store, clock)
    v.verify(key)

    def fail(*a: Any, **kw: Any) -> None:
        raise StoreError("cannot write API key store: Read-only file system")

    monkeypatch.setattr(apikeys_mod, "write_store", fail)
    caplog.set_level(logging.WARNING)
    assert v.flush() is False
    assert "could not record API key use" in caplog.text
    assert v.verify(key).subject == "bot"  # logins are unaffected
    assert not v.flush_due()  # backs off
    clock.advance(61)
    v.verify(key)
    assert v.flush_due()


# --- the CLI ---------------------------------------------------------------------------------


def _cli_list(path: Path) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["apikey", "list", "--store", str(path)]) == 0
    return out.getvalue()


def test_cli_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.json"
    rc = cli_main(
        ["apikey", "create", "--name", "ci-bot", "--groups", "readers, analysts", "--expires",
         "90d", "--store", str(path)]
    )  # fmt: skip
    assert rc == 0
    out, err = capsys.readouterr()
    key = out.strip()
    m = KEY_RE.fullmatch(key)
    assert m is not None, out  # stdout is the key alone
    key_id = m.group(1)
    assert f"created API key {key_id} for 'ci-bot'" in err
    assert "only time the key is shown" in err
    assert key not in err

    assert cli_main(["apikey", "list", "--store", str(path)]) == 0
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID",
        "NAME",
        "GROUPS",
        "CREATED",
        "EXPIRES",
        "LAST",
        "USED",
        "STATE",
    ]
    assert lines[1].split()[:3] == [key_id, "ci-bot", "readers,analysts"]
    assert lines[1].split()[-2:] == ["never", "active"]
    assert m.group(2) not in out

    assert cli_main(["apikey", "list", "--json", "--store", str(path)]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["state"] == "active" and entry["last_used"] is None and "hash" not in entry

    assert cli_main(["apikey", "revoke", "ci-bot", "--store", str(path)]) == 0
    assert f"revoked API key {key_id}" in capsys.readouterr().out
    assert cli_main(["apikey", "revoke", key_id, "--store", str(path)]) == 0
    assert "already revoked" in capsys.readouterr().out
    assert cli_main(["apikey", "list", "--store", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "revoked"

    assert cli_main(["apikey", "revoke", "nobody", "--store", str(path)]) == 1
    assert "no API key with id or name 'nobody'" in capsys.readouterr().err


def test_cli_store_from_config_and_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "state").mkdir()
    conf = tmp_path / "phigate.toml"
    # Only [identity.apikeys] is read: the rest may reference files this admin cannot read.
    conf.write_text(
        '[identity.apikeys]\nstore = "state/keys.json"\n\n'
        '[targets.ehr]\npassword_credential = "missing"\n'
    )
    assert apikeys_store_from_file(conf) == tmp_path / "state/keys.json"
    args = ["apikey", "create", "--name", "a", "--groups", "g", "--expires", "1d"]
    assert cli_main([*args, "--config", str(conf)]) == 0
    assert (tmp_path / "state/keys.json").exists()

    monkeypatch.chdir(tmp_path)
    assert cli_main(args) == 0
    assert (tmp_path / "phigate-apikeys.json").exists()

    bare = tmp_path / "bare.toml"
    bare.write_text("[server]\n")
    capsys.readouterr()
    assert cli_main(["apikey", "list", "--config", str(bare)]) == 1
    assert "has no [identity.apikeys] section" in capsys.readouterr().err


def test_cli_rejects_bad_expiry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main(["apikey", "create", "--name", "a", "--groups", "g", "--expires", "soon",
                  "--store", str(tmp_path / "k.json")])  # fmt: skip
    assert info.value.code == 2
    assert "is not a duration" in capsys.readouterr().err


# --- config ----------------------------------------------------------------------------------

OIDC = {"issuer": "https://idp.example/", "audience": "phigate", "jwks_file": "jwks.json"}
TARGETS = {"ehr": {"host": "127.0.0.1", "database": "ehr", "user": "svc", "tls": "disable"}}


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{"kty": "RSA"}]}))
    return tmp_path


def conf(confdir: Path, identity: dict[str, Any]) -> Any:
    data = {
        "server": {"listen": "127.0.0.1:0", "require_tls": False},
        "identity": identity,
        "targets": TARGETS,
    }
    return parse_config(data, source=str(confdir / "phigate.toml"))


def conf_error(confdir: Path, identity: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        conf(confdir, identity)
    return info.value


def test_config_defaults(confdir: Path) -> None:
    identity = conf(confdir, {"oidc": OIDC}).identity
    assert identity.apikeys is None
    assert identity.close_on_expiry is True
    assert identity.oidc is not None


def test_config_apikeys_store_resolves_and_close_on_expiry(confdir: Path) -> None:
    identity = conf(
        confdir, {"oidc": OIDC, "apikeys": {"store": "keys.json"}, "close_on_expiry": False}
    ).identity
    assert identity.apikeys == ApiKeysConfig(store=confdir / "keys.json")
    assert identity.close_on_expiry is False


def test_config_apikeys_only(confdir: Path) -> None:
    identity = conf(confdir, {"apikeys": {"store": str(confdir / "keys.json")}}).identity
    assert identity.oidc is None and identity.apikeys is not None


@pytest.mark.parametrize(
    ("identity", "key", "message"),
    [
        ({}, "identity.oidc", "is required"),
        ({"oidc": OIDC, "apikeys": {}}, "identity.apikeys.store", "is required"),
        (
            {"oidc": OIDC, "apikeys": {"stor": "k.json"}},
            "identity.apikeys.stor",
            "did you mean 'store'",
        ),
        (
            {"oidc": OIDC, "apikeys": {"store": "nodir/k.json"}},
            "identity.apikeys.store",
            "does not exist",
        ),
        ({"oidc": OIDC, "apikeys": {"store": "."}}, "identity.apikeys.store", "not a regular file"),
        ({"oidc": OIDC, "apikeys": {"store": 5}}, "identity.apikeys.store", "must be a string"),
        ({"oidc": OIDC, "close_on_expiry": "yes"}, "identity.close_on_expiry", "true or false"),
        ({"oidc": OIDC, "apikey": {}}, "identity.apikey", "did you mean 'apikeys'"),
    ],
)
def test_config_validation(confdir: Path, identity: dict[str, Any], key: str, message: str) -> None:
    err = conf_error(confdir, identity)
    assert err.key == key
    assert message in err.message


# --- dispatch in the control plane -----------------------------------------------------------


class FakeRequest:
    def __init__(self, password: str) -> None:
        self.id, self.kind = 1, "authenticate"
        self.payload = {"session": "s-1", "user": "u", "database": "ehr", "password": password,
                        "peer": "127.0.0.1:5555", "tls": True, "application_name": "t"}  # fmt: skip
        self.answers: list[dict[str, Any]] = []

    def reply(self, answer: dict[str, Any]) -> bool:
        self.answers.append(answer)
        return True

    @property
    def answer(self) -> dict[str, Any]:
        assert len(self.answers) == 1, self.answers
        return self.answers[0]


class OidcMustNotBeUsed:
    def verify_cached(self, token: str) -> Identity | None:
        raise AssertionError("an API key was handed to the OIDC verifier")

    async def verify(self, token: str) -> Identity:
        raise AssertionError("an API key was handed to the OIDC verifier")


class StaticOidc:
    def verify_cached(self, token: str) -> Identity | None:
        return Identity("oidc-agent", ("clinicians",), 1_900_000_000.0)

    async def verify(self, token: str) -> Identity:
        raise AssertionError("not reached")


def fake_config(
    *, close_on_expiry: bool = True, roles: dict[str, tuple[str, str | None]] | None = None
) -> Any:
    """What ControlPlane needs of a Config: identity.close_on_expiry and maybe roles_for()."""
    cfg = SimpleNamespace(identity=SimpleNamespace(close_on_expiry=close_on_expiry))
    if roles is not None:

        def roles_for(groups: tuple[str, ...], target: str | None = None) -> Any:
            names = sorted({roles[g][0] for g in groups if g in roles})
            if not names:
                return None
            db_roles = {roles[g][1] for g in groups if g in roles}
            return SimpleNamespace(
                identity_class=json.dumps(names), db_role=next(iter(db_roles)) if db_roles else None
            )

        cfg.roles_for = roles_for
    return cfg


def run_auth(control: ControlPlane, password: str) -> dict[str, Any]:
    req = FakeRequest(password)

    async def go() -> None:
        control.dispatch([req])
        await control.wait_idle()

    uvloop.run(go())
    return req.answer


def test_dispatch_api_key_answer(store: ApiKeyStore) -> None:
    record, key = store.create("ci-bot", ["readers"], DAY)
    control = ControlPlane(
        OidcMustNotBeUsed(), apikeys=ApiKeyVerifier(store.path), config=fake_config()
    )
    answer = run_auth(control, key)
    assert answer == {
        "ok": True,
        "subject": "ci-bot",
        "groups": ["readers"],
        "identity_class": Identity("x", ("readers",), None).identity_class,
        "db_role": None,
        "expires_at": float(record.expires),
        "close_on_expiry": True,
        "masked": False,
        "clear_kinds": [],
        "max_rows": None,
        "approval_mode": "hold",
        "roles": [],
        "credential": {"kind": "api_key", "key_id": record.id, "name": "ci-bot"},
    }


def test_dispatch_records_last_use_off_the_loop(store: ApiKeyStore) -> None:
    record, key = store.create("ci-bot", ["readers"], DAY)
    v = ApiKeyVerifier(store.path)
    control = ControlPlane(OidcMustNotBeUsed(), apikeys=v, config=fake_config())
    assert run_auth(control, key)["ok"] is True
    deadline = time.monotonic() + 5
    while read_store(store.path)[record.id].last_used is None:
        assert time.monotonic() < deadline, "last_used was never written"
        time.sleep(0.02)


def test_dispatch_api_key_refused_never_tries_oidc(store: ApiKeyStore) -> None:
    control = ControlPlane(
        OidcMustNotBeUsed(), apikeys=ApiKeyVerifier(store.path), config=fake_config()
    )
    answer = run_auth(control, f"phk_{'1' * 12}_{'a' * 52}")
    assert answer["ok"] is False and answer["sqlstate"] == "28P01"
    assert answer["message"].startswith("API key is not recognized")


def test_dispatch_api_keys_not_enabled() -> None:
    answer = run_auth(ControlPlane(OidcMustNotBeUsed()), f"phk_{'1' * 12}_{'a' * 52}")
    assert answer == {
        "ok": False,
        "sqlstate": "28P01",
        "message": "API keys are not enabled on this gateway: send an OIDC access token as the "
        "password",
        "reason": "not_enabled",
    }


def test_dispatch_api_keys_only_gateway_refuses_tokens() -> None:
    answer = run_auth(ControlPlane(NoOidcVerifier()), "eyJhbGciOiJSUzI1NiJ9.e30.sig")
    assert answer["ok"] is False and answer["sqlstate"] == "28P01"
    assert "accepts API keys only" in answer["message"]


def test_dispatch_maps_groups_to_roles(store: ApiKeyStore) -> None:
    _, key = store.create("ci-bot", ["readers", "unmapped"], DAY)
    cfg = fake_config(close_on_expiry=False, roles={"readers": ("reader", "ehr_read")})
    control = ControlPlane(StaticOidc(), apikeys=ApiKeyVerifier(store.path), config=cfg)
    answer = run_auth(control, key)
    assert answer["ok"] is True
    assert answer["identity_class"] == '["reader"]'
    assert answer["db_role"] == "ehr_read"
    assert answer["close_on_expiry"] is False
    # OIDC identities go through the same mapping.
    cfg = fake_config(roles={"clinicians": ("clinician", None)})
    answer = run_auth(ControlPlane(StaticOidc(), config=cfg), "token")
    assert (answer["identity_class"], answer["db_role"]) == ('["clinician"]', None)
    assert answer["expires_at"] == 1_900_000_000.0


def test_dispatch_refuses_identity_without_role(store: ApiKeyStore) -> None:
    _, key = store.create("ci-bot", ["nobody-maps-this", 'we"ird'], DAY)
    cfg = fake_config(roles={"readers": ("reader", None)})
    control = ControlPlane(StaticOidc(), apikeys=ApiKeyVerifier(store.path), config=cfg)
    assert run_auth(control, key) == {
        "ok": False,
        "sqlstate": "28000",
        "message": 'no role grants access to identity "ci-bot" (groups: "nobody-maps-this", '
        '"we\\"ird"); ask your gateway administrator to map one of your groups to a role',
        "reason": "no_role",
    }
    answer = run_auth(ControlPlane(StaticOidc(), config=cfg), "token")
    assert answer["sqlstate"] == "28000"
    assert answer["message"].startswith('no role grants access to identity "oidc-agent"')


def test_dispatch_passes_the_target_and_relays_mapping_refusals(store: ApiKeyStore) -> None:
    _, key = store.create("ci-bot", ["readers"], DAY)
    seen: list[tuple[tuple[str, ...], str | None]] = []

    def roles_for(groups: tuple[str, ...], target: str | None = None) -> Any:
        seen.append((tuple(groups), target))
        if target == "conflict":
            raise IdentityError("28000", "your groups map to roles that run as different users")
        return SimpleNamespace(identity_class=f'[["reader"],"{target}"]', db_role="")

    cfg = fake_config()
    cfg.roles_for = roles_for
    control = ControlPlane(StaticOidc(), apikeys=ApiKeyVerifier(store.path), config=cfg)
    answer = run_auth(control, key)  # FakeRequest asks for database "ehr"
    assert seen == [(("readers",), "ehr")]
    assert answer["identity_class"] == '[["reader"],"ehr"]'
    assert answer["db_role"] is None  # "" means the gateway's own user too

    req = FakeRequest(key)
    req.payload["database"] = "conflict"

    async def go() -> None:
        control.dispatch([req])

    uvloop.run(go())
    assert req.answer == {
        "ok": False,
        "sqlstate": "28000",
        "message": "your groups map to roles that run as different users",
        "reason": "other",
    }


def test_reload_keeps_the_verifier_of_an_unchanged_store(tmp_path: Path) -> None:
    from phigate.control.server import _apikey_verifier

    def cfg(store: Path | None) -> Any:
        apikeys = ApiKeysConfig(store=store) if store is not None else None
        return SimpleNamespace(identity=SimpleNamespace(apikeys=apikeys))

    first = _apikey_verifier(cfg(tmp_path / "a.json"), None)
    assert first is not None and first.path == tmp_path / "a.json"
    assert _apikey_verifier(cfg(tmp_path / "a.json"), first) is first  # keeps unwritten uses
    other = _apikey_verifier(cfg(tmp_path / "b.json"), first)
    assert other is not None and other is not first and other.path == tmp_path / "b.json"
    assert _apikey_verifier(cfg(None), other) is None  # API keys switched off by a reload
