"""Fleet-side ingest: verdict logs, telemetry, events and device state into a database.

Workers subscribe through MQTT 5 shared subscriptions
(``$share/<group>/<prefix>/dev/+/logs``), so several workers, on one or
several hosts, split the load; the broker hands each batch to one of them.
Records are deduplicated by (device, sequence) with ``ON CONFLICT DO
NOTHING``; after the batch is committed the worker acknowledges it on the
device's ``logs/ack`` topic and only then does the device forget it.

Storage: SQLite by default (``sqlite:///path`` or a plain path); PostgreSQL
by URL (``postgresql://...``, needs the optional ``psycopg`` package) as the
scale-out path where several ingest hosts share one database.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from cloud_sync.mqtt import LinkSettings, MqttLink
from cloud_sync.topics import (
    DeviceState,
    EventMessage,
    LogAck,
    LogBatch,
    PayloadError,
    Telemetry,
    Topics,
    UpdateStatus,
    device_from_topic,
    fleet_filter,
    parse_payload,
)

log = logging.getLogger(__name__)

MAX_BATCH_BYTES = 8_000_000

_TABLES = [
    """CREATE TABLE IF NOT EXISTS verdicts (
        device TEXT NOT NULL, seq BIGINT NOT NULL, store_id BIGINT, inspection_id BIGINT,
        code TEXT NOT NULL, score DOUBLE PRECISION, threshold DOUBLE PRECISION,
        historical INTEGER NOT NULL, decided_unix DOUBLE PRECISION, model_version TEXT,
        body TEXT NOT NULL, received_unix DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device, seq))""",
    """CREATE TABLE IF NOT EXISTS telemetry (
        device TEXT NOT NULL, time_unix DOUBLE PRECISION NOT NULL, body TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS events (
        device TEXT NOT NULL, time_unix DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL,
        severity TEXT NOT NULL, message TEXT NOT NULL, body TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS devices (
        device TEXT PRIMARY KEY, online INTEGER NOT NULL DEFAULT 0, grp TEXT NOT NULL DEFAULT '',
        model_name TEXT NOT NULL DEFAULT '', model_version TEXT NOT NULL DEFAULT '',
        last_seen_unix DOUBLE PRECISION NOT NULL DEFAULT 0,
        outbox_depth BIGINT, last_update TEXT NOT NULL DEFAULT '',
        last_update_unix DOUBLE PRECISION NOT NULL DEFAULT 0)""",
]


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device: str
    online: bool
    group: str
    model_name: str
    model_version: str
    last_seen_unix: float
    outbox_depth: int | None
    last_update: str
    last_update_unix: float


class IngestDB:
    """SQLite or PostgreSQL behind the few statements ingest needs. Thread-safe."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        if url.startswith(("postgresql://", "postgres://")):
            try:
                import psycopg  # type: ignore[import-not-found, unused-ignore]
            except ImportError as exc:
                raise RuntimeError(
                    "PostgreSQL ingest needs the optional 'psycopg' package: "
                    "pip install 'psycopg[binary]'"
                ) from exc
            self.kind = "postgresql"
            self._conn: Any = psycopg.connect(url, autocommit=False)
            self._ph = "%s"
        else:
            path = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:") else Path(url)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.kind = "sqlite"
            self._conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._ph = "?"
        with self._tx() as cur:
            for stmt in _TABLES:
                cur.execute(stmt)

    def _q(self, sql: str) -> str:
        return sql.replace("?", self._ph)

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._lock:
            cur = self._conn.cursor()
            try:
                yield cur
                self._conn.commit()
            except BaseException:
                self._conn.rollback()
                raise
            finally:
                cur.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def insert_batch(self, batch: LogBatch, received_unix: float) -> tuple[int, int]:
        """Store a batch; returns (inserted, duplicates)."""
        rows = [
            (
                batch.device,
                r.seq,
                r.store_id,
                r.inspection_id,
                r.code,
                r.score,
                r.threshold,
                int(r.historical),
                r.decided_unix,
                r.model_version,
                r.model_dump_json(),
                received_unix,
            )
            for r in batch.records
        ]
        sql = self._q(
            "INSERT INTO verdicts (device, seq, store_id, inspection_id, code, score, threshold, "
            "historical, decided_unix, model_version, body, received_unix) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (device, seq) DO NOTHING"
        )
        inserted = 0
        with self._tx() as cur:
            for row in rows:
                cur.execute(sql, row)
                inserted += max(0, cur.rowcount)
            self._touch(cur, batch.device, received_unix)
        return inserted, len(rows) - inserted

    def _touch(self, cur: Any, device: str, now: float) -> None:
        cur.execute(
            self._q(
                "INSERT INTO devices (device, last_seen_unix) VALUES (?, ?) "
                "ON CONFLICT (device) DO UPDATE SET last_seen_unix=excluded."
                "last_seen_unix"
            ),
            (device, now),
        )

    def insert_telemetry(self, t: Telemetry, now: float) -> None:
        with self._tx() as cur:
            cur.execute(
                self._q("INSERT INTO telemetry (device, time_unix, body) VALUES (?,?,?)"),
                (t.device, t.time_unix, t.model_dump_json()),
            )
            self._touch(cur, t.device, now)
            cur.execute(
                self._q("UPDATE devices SET outbox_depth=? WHERE device=?"),
                (t.outbox_depth, t.device),
            )

    def insert_event(self, e: EventMessage) -> None:
        with self._tx() as cur:
            cur.execute(
                self._q(
                    "INSERT INTO events (device, time_unix, kind, severity, "
                    "message, body) VALUES (?,?,?,?,?,?)"
                ),
                (e.device, e.time_unix, e.kind, e.severity, e.message, e.model_dump_json()),
            )

    def upsert_state(self, device: str, s: DeviceState, now: float) -> None:
        with self._tx() as cur:
            self._touch(cur, device, now)
            cur.execute(
                self._q(
                    "UPDATE devices SET online=?, grp=?, model_name=?, "
                    "model_version=? WHERE device=?"
                ),
                (int(s.online), s.group, s.model_name, s.model_version, device),
            )

    def upsert_update(self, device: str, u: UpdateStatus) -> None:
        with self._tx() as cur:
            self._touch(cur, device, time.time())
            text = f"{u.version} {u.phase}" + (f": {u.message}" if u.message else "")
            cur.execute(
                self._q("UPDATE devices SET last_update=?, last_update_unix=? WHERE device=?"),
                (text[:300], u.time_unix, device),
            )

    def devices(self) -> list[DeviceRow]:
        with self._tx() as cur:
            cur.execute(
                "SELECT device, online, grp, model_name, model_version, last_seen_unix, "
                "outbox_depth, last_update, last_update_unix FROM devices "
                "ORDER BY device"
            )
            rows = cur.fetchall()
        return [
            DeviceRow(
                str(r[0]),
                bool(r[1]),
                str(r[2]),
                str(r[3]),
                str(r[4]),
                float(r[5]),
                None if r[6] is None else int(r[6]),
                str(r[7]),
                float(r[8]),
            )
            for r in rows
        ]

    def verdict_count(self, device: str | None = None) -> int:
        with self._tx() as cur:
            if device is None:
                cur.execute("SELECT COUNT(*) FROM verdicts")
            else:
                cur.execute(self._q("SELECT COUNT(*) FROM verdicts WHERE device=?"), (device,))
            return int(cur.fetchone()[0])

    def seqs(self, device: str) -> list[int]:
        with self._tx() as cur:
            cur.execute(self._q("SELECT seq FROM verdicts WHERE device=? ORDER BY seq"), (device,))
            return [int(r[0]) for r in cur.fetchall()]

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query (``?`` placeholders) for reports and tests."""
        with self._tx() as cur:
            cur.execute(self._q(sql), tuple(params))
            return [tuple(r) for r in cur.fetchall()]


@dataclass(slots=True)
class IngestCounters:
    batches: int = 0
    records: int = 0
    inserted: int = 0
    duplicates: int = 0
    rejected: int = 0
    telemetry: int = 0
    events: int = 0


class IngestWorker:
    """One ingest worker; start several with the same ``share_group`` to split the load."""

    def __init__(
        self,
        settings: LinkSettings,
        db: IngestDB,
        *,
        prefix: str = "lineinspect/v1",
        share_group: str = "ingest",
    ) -> None:
        self.db = db
        self.prefix = prefix
        self.counters = IngestCounters()
        shared = f"$share/{share_group}/"
        subs = (
            (shared + fleet_filter(prefix, "logs"), 1),
            (shared + fleet_filter(prefix, "telemetry"), 0),
            (shared + fleet_filter(prefix, "events"), 1),
            (fleet_filter(prefix, "state"), 1),
            (fleet_filter(prefix, "update/status"), 1),
        )
        if settings.protocol == "3.1.1":
            raise ValueError("ingest needs MQTT 5 (shared subscriptions)")
        from dataclasses import replace

        self.link = MqttLink(
            replace(settings, subscriptions=subs, protocol="5"),
            self._on_message,
            name=f"ingest[{settings.client_id}]",
        )

    def start(self) -> None:
        self.link.start()

    def stop(self) -> None:
        self.link.stop()

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        device = device_from_topic(self.prefix, topic)
        leaf = topic.split("/dev/", 1)[-1].split("/", 1)[-1] if device else ""
        payload = bytes(msg.payload)
        now = time.time()
        try:
            if device is None:
                raise PayloadError("topic outside the namespace")
            if leaf == "logs":
                batch = parse_payload(LogBatch, payload, MAX_BATCH_BYTES)
                if batch.device != device:
                    raise PayloadError(f"batch names device {batch.device!r} on {device}'s topic")
                seqs = [r.seq for r in batch.records]
                if seqs[0] != batch.first_seq or seqs[-1] != batch.last_seq:
                    raise PayloadError("batch first_seq/last_seq do not match its records")
                ins, dup = self.db.insert_batch(batch, now)
                c = self.counters
                c.batches += 1
                c.records += len(seqs)
                c.inserted += ins
                c.duplicates += dup
                ack = LogAck(first_seq=batch.first_seq, last_seq=batch.last_seq)
                self.link.publish(Topics(self.prefix, device).logs_ack, ack.to_bytes(), qos=1)
            elif leaf == "telemetry":
                t = parse_payload(Telemetry, payload, 65536)
                if t.device != device:
                    raise PayloadError("telemetry for another device")
                self.db.insert_telemetry(t, now)
                self.counters.telemetry += 1
            elif leaf == "events":
                e = parse_payload(EventMessage, payload, 65536)
                self.db.insert_event(e)
                self.counters.events += 1
            elif leaf == "state":
                if payload:
                    self.db.upsert_state(device, parse_payload(DeviceState, payload, 65536), now)
            elif leaf == "update/status":
                if payload:
                    self.db.upsert_update(device, parse_payload(UpdateStatus, payload, 65536))
            else:
                raise PayloadError(f"unexpected topic leaf {leaf!r}")
        except PayloadError as exc:
            self.counters.rejected += 1
            log.warning("ingest rejected a message on %s: %s", topic, exc)
        except Exception:
            self.counters.rejected += 1
            log.exception("ingest failed on a message on %s", topic)

    def status_rows(self) -> list[DeviceRow]:
        return self.db.devices()


def format_status_table(rows: Sequence[DeviceRow], now_unix: float | None = None) -> str:
    """The fleet status table as text."""
    now = now_unix or time.time()
    head = ("DEVICE", "ONLINE", "GROUP", "MODEL", "LAST SEEN", "BACKLOG", "LAST UPDATE")
    lines = [head]
    for r in rows:
        ago = now - r.last_seen_unix if r.last_seen_unix else None
        seen = "never" if ago is None else f"{ago:.0f} s ago"
        model = f"{r.model_name} {r.model_version}".strip() or "-"
        backlog = "-" if r.outbox_depth is None else str(r.outbox_depth)
        lines.append(
            (
                r.device,
                "yes" if r.online else "no",
                r.group or "-",
                model,
                seen,
                backlog,
                r.last_update or "-",
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def json_status(rows: Sequence[DeviceRow]) -> str:
    return json.dumps(
        [
            r.__dict__ if hasattr(r, "__dict__") else {f: getattr(r, f) for f in r.__slots__}
            for r in rows
        ],
        indent=1,
    )
