"""Durable store-and-forward queue of verdict log records (SQLite, WAL).

Each record gets the next per-device sequence number (64-bit, starts at 1,
never reused) in the same transaction that advances the feed cursor over
the result store, so a crash neither skips nor repeats a verdict on the
way in. Records leave only when acknowledged (:meth:`Outbox.ack`).

Quota policy (documented in docs/mqtt.md): when the stored bodies pass the
quota, the oldest OK records are dropped first, then the oldest ERROR
records, and NG records only when nothing else is left. Every drop is
counted per code and reported in telemetry and in each log batch.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CODES = ("OK", "NG", "ERROR")
DROP_ORDER = ("OK", "ERROR", "NG")
"""Which records the quota drops first (NG last: a rejected part's log matters most)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    code TEXT NOT NULL,
    body TEXT NOT NULL,
    size INTEGER NOT NULL,
    queued_unix REAL NOT NULL,
    offline INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_code_seq ON records(code, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One queued record."""

    seq: int
    code: str
    fields: dict[str, Any]
    queued_unix: float
    offline: bool


@dataclass(frozen=True, slots=True)
class DropCounts:
    ok: int = 0
    ng: int = 0
    error: int = 0


@dataclass(frozen=True, slots=True)
class NewRecord:
    """A verdict to queue: its code (OK/NG/ERROR) and JSON-able fields."""

    code: str
    fields: dict[str, Any]


class Outbox:
    """The SQLite outbox. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path, quota_bytes: int) -> None:
        if quota_bytes <= 0:
            raise ValueError("quota_bytes must be positive")
        self.path = path
        self.quota_bytes = quota_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _meta(self, key: str, default: int = 0) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else default

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    def feed_cursor(self) -> int:
        """Id of the last result-store row already queued (0 before any)."""
        with self._lock:
            return self._meta("feed_cursor")

    def last_seq(self) -> int:
        """Highest sequence number handed out so far (0 before any)."""
        with self._lock:
            return self._meta("next_seq", 1) - 1

    def append(
        self,
        records: Sequence[NewRecord],
        *,
        feed_cursor: int | None = None,
        offline: bool = False,
    ) -> list[int]:
        """Queue records in order; returns their sequence numbers.

        ``feed_cursor`` (the result-store id of the last record) is saved in
        the same transaction, so a crash never loses or repeats a record.
        """
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._meta("next_seq", 1)
                seqs: list[int] = []
                added = 0
                for rec in records:
                    if rec.code not in CODES:
                        raise ValueError(f"unknown verdict code {rec.code!r}")
                    body = json.dumps(rec.fields, separators=(",", ":"), allow_nan=False)
                    self._db.execute(
                        "INSERT INTO records(seq, code, body, size, queued_unix, offline) "
                        "VALUES(?,?,?,?,?,?)",
                        (seq, rec.code, body, len(body), now, int(offline)),
                    )
                    seqs.append(seq)
                    added += len(body)
                    seq += 1
                self._set_meta("next_seq", seq)
                self._set_meta("bytes", self._meta("bytes") + added)
                if feed_cursor is not None:
                    self._set_meta("feed_cursor", feed_cursor)
                self._enforce_quota()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return seqs

    def _enforce_quota(self) -> None:
        total = self._meta("bytes")
        if total <= self.quota_bytes:
            return
        for code in DROP_ORDER:
            while total > self.quota_bytes:
                rows = self._db.execute(
                    "SELECT seq, size FROM records WHERE code=? ORDER BY seq LIMIT 256", (code,)
                ).fetchall()
                if not rows:
                    break
                victims: list[int] = []
                for seq, size in rows:
                    if total <= self.quota_bytes:
                        break
                    victims.append(int(seq))
                    total -= int(size)
                self._db.executemany("DELETE FROM records WHERE seq=?", [(s,) for s in victims])
                key = f"dropped_{code.lower()}"
                self._set_meta(key, self._meta(key) + len(victims))
        self._set_meta("bytes", total)

    def peek(self, after_seq: int, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` queued records with ``seq > after_seq``, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, code, body, queued_unix, offline FROM records WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [
            OutboxRow(
                seq=int(s), code=str(c), fields=json.loads(b), queued_unix=float(q), offline=bool(o)
            )
            for s, c, b, q, o in rows
        ]

    def ack(self, first_seq: int, last_seq: int) -> int:
        """Forget records ``first_seq..last_seq`` (delivered); returns how many went."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                size = self._db.execute(
                    "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM records "
                    "WHERE seq BETWEEN ? AND ?",
                    (first_seq, last_seq),
                ).fetchone()
                self._db.execute(
                    "DELETE FROM records WHERE seq BETWEEN ? AND ?", (first_seq, last_seq)
                )
                self._set_meta("bytes", max(0, self._meta("bytes") - int(size[0])))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return int(size[1])

    def depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def size_bytes(self) -> int:
        with self._lock:
            return self._meta("bytes")

    def oldest_seq(self) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(seq) FROM records").fetchone()
        return None if row[0] is None else int(row[0])

    def dropped(self) -> DropCounts:
        with self._lock:
            return DropCounts(
                ok=self._meta("dropped_ok"),
                ng=self._meta("dropped_ng"),
                error=self._meta("dropped_error"),
            )


def codes_of(rows: Iterable[OutboxRow]) -> list[str]:
    """The codes of some rows (a small helper for reports and tests)."""
    return [r.code for r in rows]
