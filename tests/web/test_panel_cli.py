"""`lineinspect panel ...`: accounts, tokens and the audit log from a shell, and PanelDb rules."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.web.auth import AuthError, LoginLimiter, PanelDb, Role


def cli(data: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", "panel", "--data-dir", str(data), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_cli_user_and_token_lifecycle(tmp_path: Path) -> None:
    d = tmp_path / "panel"
    r = cli(d, "user", "add", "root", "--role", "admin", "--password-stdin", stdin="admin-pass-1\n")
    assert r.returncode == 0, r.stderr
    r = cli(
        d, "user", "add", "tom", "--role", "technician", "--password-stdin", stdin="tech-pass-1\n"
    )
    assert r.returncode == 0
    listed = cli(d, "user", "list").stdout
    assert "root\tadmin" in listed
    assert "tom\ttechnician" in listed
    # bad input: clear message, exit 2, nothing changed
    r = cli(d, "user", "add", "tom", "--password-stdin", stdin="another-pass\n")
    assert r.returncode == 2
    assert "already exists" in r.stderr
    r = cli(d, "user", "add", "eve", "--password-stdin", stdin="short\n")
    assert r.returncode == 2
    assert "at least 8" in r.stderr
    r = cli(d, "user", "del", "root")
    assert r.returncode == 2
    assert "last admin" in r.stderr
    r = cli(d, "user", "passwd", "nobody", "--password-stdin", stdin="whatever-1\n")
    assert r.returncode == 2
    # password change works
    assert (
        cli(d, "user", "passwd", "tom", "--password-stdin", stdin="new-tech-pass\n").returncode == 0
    )
    db = PanelDb(d / "panel.sqlite")
    assert db.verify_password("tom", "new-tech-pass") is not None
    assert db.verify_password("tom", "tech-pass-1") is None
    assert cli(d, "user", "role", "tom", "operator").returncode == 0
    assert db.user("tom").role is Role.OPERATOR  # type: ignore[union-attr]
    # tokens
    r = cli(d, "token", "add", "prometheus", "--user", "tom")
    secret = r.stdout.strip()
    assert secret.startswith("li_")
    session = db.token_session(secret)
    assert session is not None
    assert session.user.username == "tom"
    assert "prometheus\ttom" in cli(d, "token", "list").stdout
    tid = db.tokens()[0].id
    assert cli(d, "token", "revoke", str(tid)).returncode == 0
    assert db.token_session(secret) is None
    assert cli(d, "user", "del", "tom").returncode == 0
    audit = cli(d, "audit").stdout
    for action in (
        "user.add",
        "user.password",
        "user.role",
        "token.add",
        "token.revoke",
        "user.delete",
    ):
        assert action in audit


def test_first_admin_only_once_and_sessions_expire(tmp_path: Path) -> None:
    db = PanelDb(tmp_path / "p.sqlite", time_cost=1, memory_kib=8192)
    user = db.create_first_admin("admin", "admin-pass-1")
    with pytest.raises(AuthError, match="already exists"):
        db.create_first_admin("admin2", "admin-pass-2")
    token, sess = db.open_session(user, ttl_s=0.2)
    assert db.session(token) is not None
    assert sess.csrf
    time.sleep(0.3)
    assert db.session(token) is None
    assert db.session("made-up") is None
    with pytest.raises(AuthError):
        db.set_role("admin", Role.OPERATOR)  # the last admin keeps the role
    with pytest.raises(ValueError, match="unknown role"):
        Role.parse("superuser")


def test_password_change_logs_out_everywhere(tmp_path: Path) -> None:
    db = PanelDb(tmp_path / "p.sqlite", time_cost=1, memory_kib=8192)
    user = db.create_first_admin("admin", "admin-pass-1")
    token, _ = db.open_session(user, 3600)
    db.set_password("admin", "admin-pass-2")
    assert db.session(token) is None


def test_login_limiter_window() -> None:
    lim = LoginLimiter(max_failures=2, window_s=0.3)
    assert lim.retry_after_s("1.2.3.4", "bob") == 0
    lim.failed("1.2.3.4", "bob")
    lim.failed("5.6.7.8", "bob")
    # per user name, whatever the address
    assert lim.retry_after_s("9.9.9.9", "BOB") > 0
    assert lim.retry_after_s("9.9.9.9", "alice") == 0
    time.sleep(0.35)
    assert lim.retry_after_s("9.9.9.9", "bob") == 0
