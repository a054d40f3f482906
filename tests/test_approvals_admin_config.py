"""[approvals.admin_socket], [approvals.api] and [[approvals.webhooks]]: values parsed, and every
mistake named by key and file with what to do."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from phigate.config.approvals_admin import parse_admin_socket, parse_api, parse_webhooks
from phigate.errors import ConfigError


def secret_file(tmp_path: Path, mode: int = 0o600, text: str = "s3cret-s3cret-s3cret") -> Path:
    p = tmp_path / "hook.secret"
    p.write_text(text + "\n")
    p.chmod(mode)
    return p


def test_valid_sections(tmp_path: Path, dev_cert: Any) -> None:
    src = tmp_path / "phigate.toml"
    (tmp_path / "run").mkdir()
    sock = parse_admin_socket({"path": "run/admin.sock", "mode": "0640",
                               "local_approvers": {"alice": ["dba-oncall"]}}, src)  # fmt: skip
    assert sock.path == tmp_path / "run" / "admin.sock" and sock.mode == 0o640
    assert sock.local_approvers == {"alice": ("dba-oncall",)}
    api = parse_api({"listen": "[::1]:9443", "cert": str(dev_cert.cert), "key": str(dev_cert.key)},
                    src)  # fmt: skip
    assert (api.host, api.port) == ("::1", 9443)
    secret_file(tmp_path)
    hooks = parse_webhooks([{"url": "https://hooks.example.org/x", "secret": "hook.secret"},
                            {"url": "https://hooks.slack.com/services/T/B/xyz",
                             "format": "slack", "retries": 2}], src)  # fmt: skip
    assert hooks[0].secret is not None and hooks[0].secret.reveal() == b"s3cret-s3cret-s3cret"
    assert "s3cret" not in repr(hooks[0])
    assert hooks[1].where == "https://hooks.slack.com" and hooks[1].retries == 2


def test_secret_from_a_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "creds").mkdir()
    secret_file(tmp_path / "creds")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    [hook] = parse_webhooks([{"url": "https://h.example.org", "secret": "credential:hook.secret"}],
                            tmp_path / "phigate.toml")  # fmt: skip
    assert hook.secret is not None


@pytest.mark.parametrize("section, value, key, phrase", [
    ("socket", {"path": "/nonexistent-dir/admin.sock"}, "approvals.admin_socket.path",
     "does not exist"),
    ("socket", {"path": "{tmp}/a.sock", "mode": "0666"}, "approvals.admin_socket.mode",
     "every local user"),
    ("socket", {"path": "{tmp}/a.sock", "mode": "rw"}, "approvals.admin_socket.mode", "octal"),
    ("socket", {"path": "{tmp}/a.sock", "group": "no-such-group-xyz"},
     "approvals.admin_socket.group", "no unix group"),
    ("socket", {"path": "{tmp}/a.sock", "local_approvers": {"alice": []}},
     "approvals.admin_socket.local_approvers.alice", "at least one"),
    ("socket", {"path": "{tmp}/a.sock", "mdoe": "0660"}, "approvals.admin_socket.mdoe",
     "did you mean 'mode'"),
    ("api", {"listen": "127.0.0.1:8443"}, "approvals.api.cert", "HTTPS only"),
    ("api", {"listen": "localhost:8443", "cert": "x", "key": "y"}, "approvals.api.listen",
     "ip:port"),
    ("hooks", [{"url": "http://hooks.example.org", "format": "slack"}], "approvals.webhooks[0].url",
     "https"),
    ("hooks", [{"url": "https://h.example.org"}], "approvals.webhooks[0].secret", "required"),
    ("hooks", [{"url": "https://h.example.org", "format": "xml"}], "approvals.webhooks[0].format",
     "json, slack"),
    ("hooks", [{"url": "https://h.example.org", "secret": "hook.secret"}],
     "approvals.webhooks[0].secret", "chmod 600"),
    ("hooks", [{"url": "https://h.example.org", "secret": "missing.secret"}],
     "approvals.webhooks[0].secret", "does not exist"),
    ("hooks", {"url": "https://h.example.org"}, "approvals.webhooks", "[[approvals.webhooks]]"),
])  # fmt: skip
def test_mistakes_name_key_and_file(
    tmp_path: Path, section: str, value: Any, key: str, phrase: str
) -> None:
    secret_file(tmp_path, mode=0o644)
    src = tmp_path / "phigate.toml"
    if isinstance(value, dict) and "path" in value:
        value = {**value, "path": value["path"].replace("{tmp}", str(tmp_path))}
    parse = {"socket": parse_admin_socket, "api": parse_api, "hooks": parse_webhooks}[section]
    with pytest.raises(ConfigError) as info:
        parse(value, src)
    assert info.value.key == key and info.value.file == str(src)
    assert phrase in info.value.message
    assert os.fspath(src) in str(info.value)
