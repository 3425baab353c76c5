"""Helpers shared by the panel tests (imported by name; pytest puts this folder on sys.path)."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient

ADMIN = ("admin", "admin-secret-1")
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m, "no csrf_token in the page"
    return m.group(1)


def setup_admin(c: TestClient) -> str:
    """Create the first admin through the setup page; returns the session's CSRF token."""
    page = c.get("/setup")
    assert page.status_code == 200
    r = c.post(
        "/setup",
        data={
            "csrf_token": csrf_of(page.text),
            "username": ADMIN[0],
            "password": ADMIN[1],
            "password2": ADMIN[1],
        },
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    return csrf_of(c.get("/live").text)


def login(c: TestClient, username: str, password: str) -> str:
    """Log in through the login form; returns the session's CSRF token."""
    page = c.get("/login")
    r = c.post(
        "/login",
        data={"csrf_token": csrf_of(page.text), "username": username, "password": password},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    return csrf_of(c.get("/live").text)


def add_user(c: TestClient, csrf: str, username: str, password: str, role: str) -> None:
    r = c.post(
        "/users",
        data={
            "csrf_token": csrf,
            "action": "add",
            "username": username,
            "password": password,
            "role": role,
        },
    )
    assert r.status_code == 200, r.text


def state_of(c: TestClient) -> Any:
    """The panel's state object (db, teach service, data_dir) behind a test client."""
    return getattr(c.app, "state").panel  # noqa: B009
