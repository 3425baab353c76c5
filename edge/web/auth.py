"""Users, sessions, API tokens, login rate limiting and the audit log.

Everything lives in one SQLite file (``panel.sqlite`` in the panel's data
folder). Passwords are argon2id hashes (argon2-cffi); session and API tokens
are random and only their SHA-256 is stored, so a copy of the database opens
nothing. There is no default account: the first start asks for the admin.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD_LEN = 8
MAX_PASSWORD_LEN = 1024


class Role(enum.IntEnum):
    """Roles in increasing power; a higher role may do all a lower one may."""

    OPERATOR = 1
    """Views everything, acknowledges parts."""
    TECHNICIAN = 2
    """Also teaches, sets thresholds, camera and pipeline settings."""
    ADMIN = 3
    """Also users, model slots, network settings."""

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown role {text!r}: use operator, technician or admin") from None


@dataclass(frozen=True, slots=True)
class User:
    username: str
    role: Role
    created_unix: float


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in browser (or an API token, then ``csrf`` is empty and ``via_token`` set)."""

    user: User
    csrf: str
    expires_unix: float
    via_token: bool = False


@dataclass(frozen=True, slots=True)
class ApiToken:
    id: int
    name: str
    username: str
    created_unix: float
    last_used_unix: float | None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    time_unix: float
    username: str
    action: str
    target: str
    old: Any
    new: Any
    client: str


class AuthError(ValueError):
    """A refused account operation; the message is shown to the user."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY,
    role INTEGER NOT NULL,
    pw_hash TEXT NOT NULL,
    created_unix REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_sha TEXT PRIMARY KEY,
    username TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    csrf TEXT NOT NULL,
    created_unix REAL NOT NULL,
    expires_unix REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    username TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    token_sha TEXT NOT NULL UNIQUE,
    created_unix REAL NOT NULL,
    last_used_unix REAL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_unix REAL NOT NULL,
    username TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    old_json TEXT,
    new_json TEXT,
    client TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_time ON audit(time_unix);
CREATE TABLE IF NOT EXISTS acks (
    inspection_id INTEGER PRIMARY KEY,
    username TEXT NOT NULL,
    time_unix REAL NOT NULL,
    note TEXT NOT NULL
);
"""


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_username(username: str) -> str:
    if not USERNAME_RE.fullmatch(username):
        raise AuthError("user names are 1-64 letters, digits, '_', '.', '@' or '-'")
    return username


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LEN:
        raise AuthError(f"passwords need at least {MIN_PASSWORD_LEN} characters")
    if len(password) > MAX_PASSWORD_LEN:
        raise AuthError(f"passwords may have at most {MAX_PASSWORD_LEN} characters")
    return password


class PanelDb:
    """The panel's own SQLite database (thread-safe: one connection per call)."""

    def __init__(self, path: Path, time_cost: int = 3, memory_kib: int = 65536) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib)
        self._dummy: str | None = None
        with self._conn() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            with db:
                yield db
        finally:
            db.close()

    # -- users --------------------------------------------------------------
    def has_users(self) -> bool:
        with self._conn() as db:
            return db.execute("SELECT 1 FROM users LIMIT 1").fetchone() is not None

    def create_user(self, username: str, password: str, role: Role) -> User:
        check_username(username)
        check_password(password)
        now = time.time()
        try:
            with self._conn() as db:
                db.execute(
                    "INSERT INTO users VALUES (?, ?, ?, ?)",
                    (username, int(role), self._hasher.hash(password), now),
                )
        except sqlite3.IntegrityError:
            raise AuthError(f"user {username!r} already exists") from None
        return User(username, role, now)

    def create_first_admin(self, username: str, password: str) -> User:
        """Create the admin account, only while no account exists at all."""
        check_username(username)
        check_password(password)
        now = time.time()
        with self._conn() as db:
            db.execute("BEGIN IMMEDIATE")
            if db.execute("SELECT 1 FROM users LIMIT 1").fetchone() is not None:
                raise AuthError("the admin account already exists; log in instead")
            db.execute(
                "INSERT INTO users VALUES (?, ?, ?, ?)",
                (username, int(Role.ADMIN), self._hasher.hash(password), now),
            )
        return User(username, Role.ADMIN, now)

    def users(self) -> list[User]:
        with self._conn() as db:
            rows = db.execute(
                "SELECT username, role, created_unix FROM users ORDER BY username"
            ).fetchall()
        return [User(r[0], Role(r[1]), r[2]) for r in rows]

    def user(self, username: str) -> User | None:
        with self._conn() as db:
            r = db.execute(
                "SELECT username, role, created_unix FROM users WHERE username = ?", (username,)
            ).fetchone()
        return User(r[0], Role(r[1]), r[2]) if r else None

    def set_password(self, username: str, password: str) -> None:
        check_password(password)
        with self._conn() as db:
            cur = db.execute(
                "UPDATE users SET pw_hash = ? WHERE username = ?",
                (self._hasher.hash(password), username),
            )
            if cur.rowcount == 0:
                raise AuthError(f"no user {username!r}")
            db.execute("DELETE FROM sessions WHERE username = ?", (username,))

    def set_role(self, username: str, role: Role) -> None:
        with self._conn() as db:
            old = db.execute("SELECT role FROM users WHERE username = ?", (username,)).fetchone()
            if old is None:
                raise AuthError(f"no user {username!r}")
            if old[0] == Role.ADMIN and role != Role.ADMIN and self._admins(db) <= 1:
                raise AuthError("the last admin cannot lose the admin role")
            db.execute("UPDATE users SET role = ? WHERE username = ?", (int(role), username))

    def delete_user(self, username: str) -> None:
        with self._conn() as db:
            old = db.execute("SELECT role FROM users WHERE username = ?", (username,)).fetchone()
            if old is None:
                raise AuthError(f"no user {username!r}")
            if old[0] == Role.ADMIN and self._admins(db) <= 1:
                raise AuthError("the last admin cannot be deleted")
            db.execute("DELETE FROM users WHERE username = ?", (username,))

    @staticmethod
    def _admins(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT COUNT(*) FROM users WHERE role = ?", (int(Role.ADMIN),))
        return int(row.fetchone()[0])

    def verify_password(self, username: str, password: str) -> User | None:
        """The user when the password matches; spends the same time when the user is unknown."""
        with self._conn() as db:
            r = db.execute(
                "SELECT username, role, created_unix, pw_hash FROM users WHERE username = ?",
                (username,),
            ).fetchone()
        if r is None and self._dummy is None:
            self._dummy = self._hasher.hash(secrets.token_hex(16))
        stored = r[3] if r else self._dummy
        assert stored is not None
        try:
            self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if r is None:
            return None
        if self._hasher.check_needs_rehash(stored):
            with self._conn() as db:
                db.execute(
                    "UPDATE users SET pw_hash = ? WHERE username = ?",
                    (self._hasher.hash(password), username),
                )
        return User(r[0], Role(r[1]), r[2])

    # -- sessions -----------------------------------------------------------
    def open_session(self, user: User, ttl_s: float) -> tuple[str, Session]:
        """A new session; returns the cookie value (only its hash is stored)."""
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = time.time()
        with self._conn() as db:
            db.execute("DELETE FROM sessions WHERE expires_unix < ?", (now,))
            db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?)",
                (_sha(token), user.username, csrf, now, now + ttl_s),
            )
        return token, Session(user, csrf, now + ttl_s)

    def session(self, token: str) -> Session | None:
        with self._conn() as db:
            r = db.execute(
                "SELECT u.username, u.role, u.created_unix, s.csrf, s.expires_unix "
                "FROM sessions s JOIN users u ON u.username = s.username "
                "WHERE s.token_sha = ?",
                (_sha(token),),
            ).fetchone()
        if r is None or r[4] < time.time():
            return None
        return Session(User(r[0], Role(r[1]), r[2]), r[3], r[4])

    def close_session(self, token: str) -> None:
        with self._conn() as db:
            db.execute("DELETE FROM sessions WHERE token_sha = ?", (_sha(token),))

    # -- API tokens ---------------------------------------------------------
    def create_token(self, username: str, name: str) -> tuple[str, ApiToken]:
        """A new API token for ``username``; the secret is returned once, never stored."""
        if not name.strip() or len(name) > 100:
            raise AuthError("a token needs a name of 1-100 characters")
        if self.user(username) is None:
            raise AuthError(f"no user {username!r}")
        secret = "li_" + secrets.token_urlsafe(32)
        now = time.time()
        with self._conn() as db:
            cur = db.execute(
                "INSERT INTO api_tokens (name, username, token_sha, created_unix) "
                "VALUES (?, ?, ?, ?)",
                (name.strip(), username, _sha(secret), now),
            )
            tid = int(cur.lastrowid or 0)
        return secret, ApiToken(tid, name.strip(), username, now, None)

    def tokens(self) -> list[ApiToken]:
        with self._conn() as db:
            rows = db.execute(
                "SELECT id, name, username, created_unix, last_used_unix "
                "FROM api_tokens ORDER BY id"
            ).fetchall()
        return [ApiToken(*r) for r in rows]

    def revoke_token(self, token_id: int) -> None:
        with self._conn() as db:
            if db.execute("DELETE FROM api_tokens WHERE id = ?", (token_id,)).rowcount == 0:
                raise AuthError(f"no token {token_id}")

    def token_session(self, secret: str) -> Session | None:
        now = time.time()
        with self._conn() as db:
            r = db.execute(
                "SELECT u.username, u.role, u.created_unix, t.id FROM api_tokens t "
                "JOIN users u ON u.username = t.username WHERE t.token_sha = ?",
                (_sha(secret),),
            ).fetchone()
            if r is None:
                return None
            db.execute("UPDATE api_tokens SET last_used_unix = ? WHERE id = ?", (now, r[3]))
        return Session(User(r[0], Role(r[1]), r[2]), "", float("inf"), via_token=True)

    # -- audit --------------------------------------------------------------
    def audit(  # noqa: PLR0917
        self,
        username: str,
        action: str,
        target: str = "",
        old: Any = None,
        new: Any = None,
        client: str = "",
    ) -> None:
        """Record one change: who, when, what, old and new value."""
        with self._conn() as db:
            db.execute(
                "INSERT INTO audit (time_unix, username, action, target, old_json, new_json, "
                "client) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    time.time(),
                    username,
                    action,
                    target,
                    json.dumps(old, default=str),
                    json.dumps(new, default=str),
                    client,
                ),
            )

    def audit_entries(self, limit: int = 100, offset: int = 0) -> tuple[list[AuditEntry], int]:
        with self._conn() as db:
            total = int(db.execute("SELECT COUNT(*) FROM audit").fetchone()[0])
            rows = db.execute(
                "SELECT id, time_unix, username, action, target, old_json, new_json, client "
                "FROM audit ORDER BY id DESC LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
        out = [
            AuditEntry(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                json.loads(r[5]) if r[5] else None,
                json.loads(r[6]) if r[6] else None,
                r[7],
            )
            for r in rows
        ]
        return out, total

    # -- acknowledgements ---------------------------------------------------
    def acknowledge(self, inspection_id: int, username: str, note: str) -> None:
        with self._conn() as db:
            db.execute(
                "INSERT OR REPLACE INTO acks VALUES (?, ?, ?, ?)",
                (inspection_id, username, time.time(), note[:500]),
            )

    def acks(self, ids: list[int]) -> dict[int, tuple[str, float, str]]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._conn() as db:
            rows = db.execute(
                f"SELECT inspection_id, username, time_unix, note FROM acks "  # noqa: S608
                f"WHERE inspection_id IN ({marks})",
                ids,
            ).fetchall()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}


class LoginLimiter:
    """Counts failed logins per client address and per user name in a sliding window."""

    def __init__(self, max_failures: int, window_s: float) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._lock = threading.Lock()
        self._fails: dict[str, collections.deque[float]] = {}

    def _prune(self, key: str, now: float) -> collections.deque[float]:
        q = self._fails.setdefault(key, collections.deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def retry_after_s(self, client: str, username: str) -> float:
        """Seconds until another attempt is allowed (0 when allowed now)."""
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            for key in (f"c:{client}", f"u:{username.lower()}"):
                q = self._prune(key, now)
                if len(q) >= self.max_failures:
                    wait = max(wait, q[0] + self.window_s - now)
        return wait

    def failed(self, client: str, username: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in (f"c:{client}", f"u:{username.lower()}"):
                self._prune(key, now).append(now)

    def succeeded(self, client: str, username: str) -> None:
        with self._lock:
            self._fails.pop(f"u:{username.lower()}", None)
            self._fails.pop(f"c:{client}", None)


def tokens_equal(a: str, b: str) -> bool:
    """Constant-time comparison of two tokens (False when either is empty)."""
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())
