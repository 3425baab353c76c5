"""The result store: every verdict in SQLite (WAL), images by a background writer.

Durability: :meth:`ResultStore.commit` inserts the verdict and commits the
transaction before it returns, and the pipeline reports a verdict (PLC,
panel, logs, uplink) only after that. With WAL and ``synchronous=NORMAL`` a
committed transaction survives a crash or SIGKILL of the process (the OS
holds the WAL pages); ``store.synchronous: full`` also survives a power cut
at the price of one fsync per part.

Checkpoints stay off the hot path: the committing connection never
checkpoints (``wal_autocheckpoint = 0``; SQLite's default would copy the WAL
into the database and fsync, every 1 000 pages, inside some part's commit:
measured p99 4 ms and stalls of tens of ms per commit, against 0.1 ms
without); the writer thread runs a PASSIVE checkpoint at most every
``CHECKPOINT_INTERVAL_S`` (which never blocks a commit), and ``stop`` a
final one.

Images never sit on the hot path: :meth:`ResultStore.submit_images` puts a
job on a bounded queue (full queue: the images are skipped and counted) and
a writer thread encodes the frame and the heatmap overlay and writes them
under a disk quota. To make room it deletes the oldest OK images first, then
the oldest others; images older than the retention are deleted too. When the
disk is full (or below the free-space reserve) the writer stores nothing,
raises a ``store.disk_full`` status event and keeps the verdicts flowing.

Schema (table ``verdicts``, one row per inspected part; see docs/runtime.md)::

    inspection_id INTEGER PRIMARY KEY   -- Verdict.inspection_id, +1 per part
    decided_unix REAL, code TEXT ('OK'|'NG'|'ERROR'), score REAL (NULL = NaN),
    threshold REAL (NULL = NaN), defect_class TEXT, regions_json TEXT, model_name TEXT,
    model_version TEXT, timings_json TEXT, total_ms REAL, error TEXT,
    trigger_id INTEGER NULL, source_id TEXT, frame_sequence INTEGER,
    capture_time REAL
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from edge.events import EventBus
from edge.overlay import draw_overlay
from edge.runtime_config import StoreConfig
from edge.types import ImageArray, Region, Severity, Verdict, VerdictCode

log = logging.getLogger(__name__)

DB_NAME = "results.sqlite"
_MEDIAN_SAMPLES = 50_000
SCHEMA_VERSION = 1
CHECKPOINT_INTERVAL_S = 1.0
"""How often the writer thread checkpoints the WAL (it is idle-waiting at most this long)."""
ImageKind = Literal["image", "heatmap"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    inspection_id INTEGER PRIMARY KEY,
    decided_unix REAL NOT NULL,
    code TEXT NOT NULL CHECK (code IN ('OK', 'NG', 'ERROR')),
    score REAL,
    threshold REAL,
    defect_class TEXT NOT NULL DEFAULT '',
    regions_json TEXT NOT NULL DEFAULT '[]',
    model_name TEXT NOT NULL DEFAULT '',
    model_version TEXT NOT NULL DEFAULT '',
    timings_json TEXT NOT NULL DEFAULT '{}',
    total_ms REAL,
    error TEXT NOT NULL DEFAULT '',
    trigger_id INTEGER,
    source_id TEXT NOT NULL DEFAULT '',
    frame_sequence INTEGER NOT NULL DEFAULT 0,
    capture_time REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS verdicts_time ON verdicts (decided_unix);
CREATE INDEX IF NOT EXISTS verdicts_code_time ON verdicts (code, decided_unix);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    inspection_id INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('image', 'heatmap')),
    path TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    is_ok INTEGER NOT NULL,
    created_unix REAL NOT NULL,
    UNIQUE (inspection_id, kind)
);
CREATE INDEX IF NOT EXISTS images_evict ON images (is_ok DESC, id);
CREATE INDEX IF NOT EXISTS images_time ON images (created_unix);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_COLUMNS = (
    "inspection_id, decided_unix, code, score, threshold, defect_class, regions_json, "
    "model_name, model_version, timings_json, error, trigger_id, source_id, "
    "frame_sequence, capture_time"
)


BACKGROUND_NICE = 5
"""How much lower than the hot path the image writer runs (Linux nice steps; about a
third of the CPU weight of a normal thread when the cores are contended)."""


def lower_thread_priority(delta: int = BACKGROUND_NICE) -> bool:
    """Lower the calling thread's CPU priority by ``delta`` nice steps (Linux; best effort).

    On Linux the nice value is per thread (and inherited by threads it starts),
    so background work (encoding and writing images, drawing overlays) yields
    the two cores to capture, inference and the verdict commit.
    Returns False where it cannot be done (other systems, a sandbox).
    """
    if not hasattr(os, "setpriority") or delta <= 0:
        return False
    try:
        tid = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + delta))
    except OSError:
        return False
    return True


class StoreError(Exception):
    """The store could not commit a verdict (disk full, I/O error, closed)."""


@dataclass(frozen=True, slots=True)
class StoredVerdict:
    """One row of the ``verdicts`` table (stable: the uplink's outbox feeder reads it)."""

    inspection_id: int
    decided_unix: float
    code: VerdictCode
    score: float
    """NaN when no score exists (ERROR)."""
    threshold: float
    defect_class: str
    regions: tuple[Region, ...]
    model_name: str
    model_version: str
    timings_ms: dict[str, float]
    error: str
    trigger_id: int | None
    source_id: str
    frame_sequence: int
    capture_time: float

    def to_verdict(self) -> Verdict:
        """The :class:`Verdict` this row was written from."""
        return Verdict(
            inspection_id=self.inspection_id,
            frame_sequence=self.frame_sequence,
            source_id=self.source_id,
            trigger_id=self.trigger_id,
            code=self.code,
            score=self.score,
            threshold=self.threshold,
            regions=self.regions,
            defect_class=self.defect_class,
            model_name=self.model_name,
            model_version=self.model_version,
            timings_ms=dict(self.timings_ms),
            error=self.error,
            capture_time=self.capture_time,
            decided_unix=self.decided_unix,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (NaN score as None, code as its name)."""
        d = dataclasses.asdict(self)
        d["code"] = self.code.name
        d["score"] = None if math.isnan(self.score) else self.score
        d["regions"] = [dataclasses.asdict(r) for r in self.regions]
        return d


@dataclass(frozen=True, slots=True)
class VerdictCounts:
    """Counts over a time window, with rates as fractions of the total."""

    ok: int
    ng: int
    error: int

    @property
    def total(self) -> int:
        return self.ok + self.ng + self.error

    @property
    def ng_rate(self) -> float:
        return self.ng / self.total if self.total else 0.0

    @property
    def error_rate(self) -> float:
        return self.error / self.total if self.total else 0.0


@dataclass(frozen=True, slots=True)
class Bucket:
    """Counts and latency (``timings_ms.total``) in ``[start_unix, start_unix + bucket_s)``."""

    start_unix: float
    ok: int
    ng: int
    error: int
    latency_ms_p50: float | None
    latency_ms_max: float | None


@dataclass(frozen=True, slots=True)
class ImageJob:
    """What the background writer needs to store a part's images."""

    inspection_id: int
    code: VerdictCode
    image: ImageArray
    anomaly_map: npt.NDArray[np.float32] | None
    regions: tuple[Region, ...]
    pixel_threshold: float


@dataclass(slots=True)
class WriterStats:
    """Counters of the image writer (mutable, read as a snapshot via :meth:`snapshot`)."""

    written: int = 0
    skipped_queue_full: int = 0
    skipped_no_space: int = 0
    failed: int = 0
    evicted: int = 0
    bytes_used: int = 0
    degraded: bool = False
    checkpoints: int = 0
    """WAL checkpoints run by the writer thread."""
    wal_pages: int = 0
    """Pages in the WAL at the last checkpoint."""
    extra: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> WriterStats:
        return dataclasses.replace(self, extra=dict(self.extra))


def _region_to_json(r: Region) -> dict[str, Any]:
    return dataclasses.asdict(r)


def _row_to_stored(row: sqlite3.Row | tuple[Any, ...]) -> StoredVerdict:
    (
        iid,
        t,
        code,
        score,
        thr,
        dclass,
        regions_json,
        mname,
        mver,
        timings_json,
        err,
        trig,
        src,
        seq,
        cap,
    ) = tuple(row)
    regions = tuple(Region(**r) for r in json.loads(regions_json))
    return StoredVerdict(
        inspection_id=int(iid),
        decided_unix=float(t),
        code=VerdictCode[code],
        score=float("nan") if score is None else float(score),
        threshold=float("nan") if thr is None else float(thr),
        defect_class=str(dclass),
        regions=regions,
        model_name=str(mname),
        model_version=str(mver),
        timings_ms={str(k): float(v) for k, v in json.loads(timings_json).items()},
        error=str(err),
        trigger_id=None if trig is None else int(trig),
        source_id=str(src),
        frame_sequence=int(seq),
        capture_time=float(cap),
    )


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return "disk is full" in text or "no space" in text


class ResultStore:
    """SQLite result store with a background image writer. A :class:`~edge.types.Component`."""

    name = "store"

    def __init__(self, config: StoreConfig, events: EventBus | None = None) -> None:
        self.config = config
        self.root = Path(config.path)
        self.db_path = self.root / DB_NAME
        self.images_dir = self.root / "images"
        self.events = events or EventBus()
        self._write_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._next_id = 1
        self._ok_seen = 0
        self._queue: queue.Queue[ImageJob | None] = queue.Queue(maxsize=config.writer_queue)
        self._writer: threading.Thread | None = None
        self._stats = WriterStats()
        self._stats_lock = threading.Lock()
        self._last_retention = 0.0
        self._last_checkpoint = 0.0
        # image rows whose files are deleted but whose rows a full disk kept SQLite from
        # deleting (the writer thread's own; retried before each image is written)
        self._orphans: set[int] = set()
        self._degraded_since = 0.0
        self.commit_failures = 0

    # -- lifecycle ------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.db_path, timeout=10.0, check_same_thread=False, isolation_level=None
        )
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute(f"PRAGMA synchronous = {self.config.synchronous.upper()}")
        return conn

    def start(self) -> None:
        """Open (or create) the database and start the image writer."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.db_path}: cannot switch SQLite to WAL (got {mode})")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # the writer thread checkpoints
        conn.executescript(_SCHEMA)
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        row = conn.execute("SELECT COALESCE(MAX(inspection_id), 0) FROM verdicts").fetchone()
        self._next_id = int(row[0]) + 1
        used = conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM images").fetchone()[0]
        self._stats.bytes_used = int(used)
        self._conn = conn
        self._writer = threading.Thread(target=self._writer_loop, name="store-writer", daemon=True)
        self._writer.start()
        log.info(
            "result store %s: next inspection id %d, %.1f MB of images",
            self.db_path,
            self._next_id,
            used / 1e6,
        )

    def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Finish queued images (up to ``drain_timeout_s``) and close the database."""
        if self._writer is not None:
            deadline = time.monotonic() + drain_timeout_s
            while True:
                try:
                    self._queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    if time.monotonic() > deadline:
                        break
            self._writer.join(timeout=max(0.1, deadline - time.monotonic()))
            self._writer = None
        with self._write_lock:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._conn.close()
                self._conn = None
        with self._readers_lock:
            for c in self._readers:
                with contextlib.suppress(sqlite3.Error):
                    c.close()
            self._readers.clear()
        self._local = threading.local()

    # -- hot path -------------------------------------------------------------
    @property
    def next_id(self) -> int:
        """The inspection id the next verdict will get (not reserved)."""
        with self._write_lock:
            return self._next_id

    def next_inspection_id(self) -> int:
        """Reserve the next inspection id (continues after a restart)."""
        with self._write_lock:
            iid = self._next_id
            self._next_id += 1
            return iid

    def commit(self, verdict: Verdict) -> None:
        """Insert and commit ``verdict``; raises :class:`StoreError` if it is not durable."""
        score = verdict.score if math.isfinite(verdict.score) else None
        threshold = verdict.threshold if math.isfinite(verdict.threshold) else None
        row = (
            verdict.inspection_id,
            verdict.decided_unix,
            verdict.code.name,
            score,
            threshold,
            verdict.defect_class,
            json.dumps([_region_to_json(r) for r in verdict.regions]),
            verdict.model_name,
            verdict.model_version,
            json.dumps(verdict.timings_ms),
            verdict.timings_ms.get("total"),
            verdict.error,
            verdict.trigger_id,
            verdict.source_id,
            verdict.frame_sequence,
            verdict.capture_time,
        )
        with self._write_lock:
            if self._conn is None:
                raise StoreError("result store is not open")
            try:
                self._conn.execute(
                    "INSERT INTO verdicts (inspection_id, decided_unix, code, score, threshold, "
                    "defect_class, regions_json, model_name, model_version, timings_json, "
                    "total_ms, error, trigger_id, source_id, frame_sequence, capture_time) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
            except sqlite3.Error as exc:
                self.commit_failures += 1
                full = _is_disk_full(exc)
                self.events.emit(
                    "store.disk_full" if full else "store.error",
                    "store",
                    f"verdict {verdict.inspection_id} not stored: {exc}",
                    Severity.ERROR,
                    inspection_id=verdict.inspection_id,
                )
                raise StoreError(str(exc)) from exc

    def wants_images(self, code: VerdictCode) -> bool:
        """Whether this part's images are kept (NG/ERROR, or the n-th OK sample)."""
        if code is not VerdictCode.OK:
            return self.config.save_ng_images
        n = self.config.ok_sample_every
        if n <= 0:
            return False
        self._ok_seen += 1
        return self._ok_seen % n == 1 or n == 1

    def submit_images(self, job: ImageJob) -> bool:
        """Queue a part's images for the writer; never blocks (False: skipped)."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._stats_lock:
                self._stats.skipped_queue_full += 1
            return False
        return True

    # -- background writer ------------------------------------------------------
    def _writer_loop(self) -> None:
        lower_thread_priority()  # encoding, drawing and disk writes yield to the hot path
        conn = self._connect()
        try:
            while True:
                self._maybe_checkpoint(conn)
                try:
                    job = self._queue.get(timeout=CHECKPOINT_INTERVAL_S)
                except queue.Empty:
                    self._maybe_retention(conn)
                    continue
                if job is None:
                    self._queue.task_done()
                    return
                try:
                    self._write_job(conn, job)
                    self._maybe_retention(conn)
                except Exception:
                    log.exception("image writer failed on part %d", job.inspection_id)
                    with self._stats_lock:
                        self._stats.failed += 1
                finally:
                    self._queue.task_done()
        finally:
            conn.close()

    def _encode(self, image: ImageArray) -> bytes:
        ext = "." + self.config.image_format
        params = [int(cv2.IMWRITE_JPEG_QUALITY), 90] if ext == ".jpg" else []
        ok, buf = cv2.imencode(ext, image, params)
        if not ok:
            raise ValueError("image encoding failed")
        return bytes(buf.tobytes())

    def _write_job(self, conn: sqlite3.Connection, job: ImageJob) -> None:
        files: list[tuple[ImageKind, bytes]] = [("image", self._encode(job.image))]
        if job.anomaly_map is not None:
            over = draw_overlay(
                job.image,
                job.anomaly_map,
                job.regions,
                job.code,
                pixel_threshold=job.pixel_threshold,
            )
            files.append(("heatmap", self._encode(over)))
        need = sum(len(b) for _, b in files)
        if not self._make_room(conn, need):
            with self._stats_lock:
                self._stats.skipped_no_space += 1
            self._set_degraded(True, "not enough space under the quota / free-space reserve")
            return
        day = time.strftime("%Y%m%d", time.gmtime())
        folder = self.images_dir / day
        written: list[tuple[ImageKind, Path, int]] = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for kind, data in files:
                path = folder / f"{job.inspection_id:010d}_{kind}.{self.config.image_format}"
                with open(path, "wb") as f:
                    f.write(data)
                written.append((kind, path, len(data)))
            now = time.time()
            with conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO images (inspection_id, kind, path, bytes, is_ok, "
                    "created_unix) VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (
                            job.inspection_id,
                            kind,
                            str(p.relative_to(self.root)),
                            n,
                            int(job.code is VerdictCode.OK),
                            now,
                        )
                        for kind, p, n in written
                    ],
                )
        except (OSError, sqlite3.Error) as exc:
            for _, p, _ in written:
                with contextlib.suppress(OSError):
                    p.unlink()
            with contextlib.suppress(OSError):
                # a partially written file of the failing kind
                for kind, _ in files:
                    (folder / f"{job.inspection_id:010d}_{kind}.{self.config.image_format}").unlink(
                        missing_ok=True
                    )
            if _is_disk_full(exc):
                with self._stats_lock:
                    self._stats.skipped_no_space += 1
                self._set_degraded(True, f"disk full: {exc}")
                return
            raise
        with self._stats_lock:
            self._stats.written += 1
            self._stats.bytes_used += need
        self._set_degraded(False, "")

    def _free_bytes(self) -> int:
        try:
            return int(shutil.disk_usage(self.root).free)
        except OSError:
            return 0

    def _make_room(self, conn: sqlite3.Connection, need: int) -> bool:
        quota = int(self.config.image_quota_mb * 1e6)
        reserve = int(self.config.min_free_mb * 1e6)
        if need > quota:
            return False
        if self._orphans:
            self._delete_rows(conn, sorted(self._orphans))
        while True:
            with self._stats_lock:
                used = self._stats.bytes_used
            if used + need <= quota and self._free_bytes() - need >= reserve:
                return True
            if not self._evict_oldest(conn):
                return False

    def _evict_oldest(self, conn: sqlite3.Connection) -> bool:
        """Delete the oldest stored part's images, OK parts first. False: nothing left."""
        row = conn.execute(
            "SELECT inspection_id FROM images WHERE id NOT IN "  # noqa: S608
            f"({','.join('?' * len(self._orphans))}) ORDER BY is_ok DESC, id LIMIT 1",
            sorted(self._orphans),
        ).fetchone()
        if row is None:
            return False
        self._delete_images(conn, "inspection_id = ?", (row[0],))
        return True

    def _delete_images(self, conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> int:
        """Delete the files, then the rows, of the images matching ``where``.

        Files go first: on a full disk SQLite needs room for the delete itself, and the
        files are what frees it. Rows a full disk still keeps are remembered and retried.
        """
        rows = [
            r
            for r in conn.execute(
                f"SELECT id, path, bytes FROM images WHERE {where}",  # noqa: S608
                args,
            ).fetchall()
            if int(r[0]) not in self._orphans
        ]
        freed = 0
        for _, rel, n in rows:
            with contextlib.suppress(FileNotFoundError):
                (self.root / rel).unlink()
            freed += int(n)
        with self._stats_lock:
            self._stats.bytes_used = max(0, self._stats.bytes_used - freed)
            self._stats.evicted += len(rows)
        self._delete_rows(conn, [int(r[0]) for r in rows])
        return len(rows)

    def _delete_rows(self, conn: sqlite3.Connection, ids: list[int]) -> None:
        if not ids:
            return
        try:
            with conn:
                conn.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in ids])
        except sqlite3.Error as exc:
            if not _is_disk_full(exc):
                raise
            if not self._orphans:
                log.warning("image rows kept by a full disk (their files are deleted): %s", exc)
            self._orphans.update(ids)
            return
        self._orphans.difference_update(ids)

    def _maybe_checkpoint(self, conn: sqlite3.Connection) -> None:
        """Copy committed WAL pages into the database (PASSIVE: never waits for a commit)."""
        now = time.monotonic()
        if now - self._last_checkpoint < CHECKPOINT_INTERVAL_S:
            return
        self._last_checkpoint = now
        try:
            _busy, wal_pages, _done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            log.warning("WAL checkpoint failed: %s", exc)
            return
        with self._stats_lock:
            self._stats.checkpoints += 1
            self._stats.wal_pages = int(wal_pages)

    def _maybe_retention(self, conn: sqlite3.Connection) -> None:
        now = time.time()
        if now - self._last_retention < 60.0:
            return
        self._last_retention = now
        cutoff = now - self.config.retention_days * 86400.0
        try:
            n = self._delete_images(conn, "created_unix < ?", (cutoff,))
        except (OSError, sqlite3.Error) as exc:
            log.warning("image retention failed: %s", exc)
            return
        if n:
            log.info(
                "retention: deleted %d images older than %.1f days", n, self.config.retention_days
            )

    def _set_degraded(self, degraded: bool, why: str) -> None:
        with self._stats_lock:
            was = self._stats.degraded
            self._stats.degraded = degraded
        if degraded and not was:
            self.events.emit(
                "store.disk_full",
                "store",
                f"images are not stored ({why}); verdicts still are",
                Severity.WARNING,
            )
        elif was and not degraded:
            self.events.emit("store.disk_ok", "store", "images are stored again")

    def writer_stats(self) -> WriterStats:
        """A snapshot of the image writer's counters."""
        with self._stats_lock:
            return self._stats.snapshot()

    def pending_images(self) -> int:
        """Image jobs waiting in the writer's queue."""
        return self._queue.qsize()

    def flush_images(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued image job is written (tests, shutdown). False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks > 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # -- queries (any thread) ----------------------------------------------------
    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._conn is None:
                raise StoreError("result store is not open")
            conn = sqlite3.connect(
                f"file:{self.db_path}?mode=ro", uri=True, timeout=10.0, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout = 10000")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        yield conn

    def get(self, inspection_id: int) -> StoredVerdict | None:
        """One stored verdict, or None."""
        with self._reader() as c:
            row = c.execute(
                f"SELECT {_COLUMNS} FROM verdicts WHERE inspection_id = ?",  # noqa: S608
                (inspection_id,),
            ).fetchone()
        return None if row is None else _row_to_stored(row)

    def verdicts_after(self, after_id: int, limit: int) -> list[StoredVerdict]:
        """Verdicts with ``inspection_id > after_id``, oldest first, at most ``limit``.

        The uplink's outbox feeder calls this with the last id it has taken.
        """
        with self._reader() as c:
            rows = c.execute(
                f"SELECT {_COLUMNS} FROM verdicts WHERE inspection_id > ? "  # noqa: S608
                "ORDER BY inspection_id LIMIT ?",
                (after_id, max(0, limit)),
            ).fetchall()
        return [_row_to_stored(r) for r in rows]

    @staticmethod
    def _where(
        code: VerdictCode | None,
        defect_class: str | None,
        since_unix: float | None,
        until_unix: float | None,
    ) -> tuple[str, list[Any]]:
        conds: list[str] = []
        args: list[Any] = []
        if code is not None:
            conds.append("code = ?")
            args.append(code.name)
        if defect_class is not None:
            conds.append("defect_class = ?")
            args.append(defect_class)
        if since_unix is not None:
            conds.append("decided_unix >= ?")
            args.append(since_unix)
        if until_unix is not None:
            conds.append("decided_unix < ?")
            args.append(until_unix)
        return (" WHERE " + " AND ".join(conds)) if conds else "", args

    def query(
        self,
        *,
        code: VerdictCode | None = None,
        defect_class: str | None = None,
        since_unix: float | None = None,
        until_unix: float | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[StoredVerdict], int]:
        """Verdicts matching every given condition, newest first, and how many match in all."""
        where, args = self._where(code, defect_class, since_unix, until_unix)
        with self._reader() as c:
            total = int(
                c.execute(
                    f"SELECT COUNT(*) FROM verdicts{where}",  # noqa: S608
                    args,
                ).fetchone()[0]
            )
            rows = c.execute(
                f"SELECT {_COLUMNS} FROM verdicts{where} "  # noqa: S608
                "ORDER BY inspection_id DESC LIMIT ? OFFSET ?",
                [*args, max(0, limit), max(0, offset)],
            ).fetchall()
        return [_row_to_stored(r) for r in rows], total

    def counts(
        self, since_unix: float | None = None, until_unix: float | None = None
    ) -> VerdictCounts:
        """OK / NG / ERROR counts in the window (rates on the result)."""
        where, args = self._where(None, None, since_unix, until_unix)
        with self._reader() as c:
            rows = c.execute(
                f"SELECT code, COUNT(*) FROM verdicts{where} GROUP BY code",  # noqa: S608
                args,
            ).fetchall()
        n = {str(k): int(v) for k, v in rows}
        return VerdictCounts(ok=n.get("OK", 0), ng=n.get("NG", 0), error=n.get("ERROR", 0))

    def buckets(
        self, since_unix: float, bucket_s: float, until_unix: float | None = None
    ) -> list[Bucket]:
        """Counts and latency per time bucket since ``since_unix``, oldest first.

        Counts and the maximum are exact (SQL aggregates); the median latency
        is computed from at most about ``_MEDIAN_SAMPLES`` rows of the window.
        """
        if bucket_s <= 0:
            raise ValueError("bucket_s must be positive")
        where, args = self._where(None, None, since_unix, until_unix)
        bucket = "CAST((decided_unix - ?) / ? AS INTEGER)"
        with self._reader() as c:
            agg = c.execute(
                f"SELECT {bucket} AS b, "  # noqa: S608
                "SUM(code = 'OK'), SUM(code = 'NG'), SUM(code = 'ERROR'), MAX(total_ms), "
                f"COUNT(*) FROM verdicts{where} GROUP BY b ORDER BY b",
                [since_unix, bucket_s, *args],
            ).fetchall()
            n = sum(int(r[5]) for r in agg)
            step = max(1, n // _MEDIAN_SAMPLES)
            sampled = c.execute(
                f"SELECT {bucket}, total_ms FROM verdicts{where}"  # noqa: S608
                + (" AND" if where else " WHERE")
                + " total_ms IS NOT NULL AND inspection_id % ? = 0",
                [since_unix, bucket_s, *args, step],
            ).fetchall()
        lat: dict[int, list[float]] = {}
        for b, ms in sampled:
            lat.setdefault(int(b), []).append(float(ms))
        return [
            Bucket(
                start_unix=since_unix + int(b) * bucket_s,
                ok=int(ok or 0),
                ng=int(ng or 0),
                error=int(err or 0),
                latency_ms_p50=float(np.median(lat[int(b)])) if lat.get(int(b)) else None,
                latency_ms_max=None if mx is None else float(mx),
            )
            for b, ok, ng, err, mx, _ in agg
        ]

    def defect_classes(self) -> list[str]:
        """Distinct non-empty defect classes in the store."""
        with self._reader() as c:
            rows = c.execute(
                "SELECT DISTINCT defect_class FROM verdicts WHERE defect_class != '' ORDER BY 1"
            ).fetchall()
        return [str(r[0]) for r in rows]

    def image_path(self, inspection_id: int, kind: ImageKind) -> Path | None:
        """The stored file of a part's ``image`` or ``heatmap``, or None."""
        with self._reader() as c:
            row = c.execute(
                "SELECT path FROM images WHERE inspection_id = ? AND kind = ?",
                (inspection_id, kind),
            ).fetchone()
        if row is None:
            return None
        path = self.root / str(row[0])
        return path if path.exists() else None

    def image_kinds(self, inspection_ids: list[int]) -> dict[int, set[str]]:
        """Which image kinds are stored for each of ``inspection_ids``."""
        if not inspection_ids:
            return {}
        marks = ",".join("?" * len(inspection_ids))
        with self._reader() as c:
            rows = c.execute(
                f"SELECT inspection_id, kind FROM images "  # noqa: S608
                f"WHERE inspection_id IN ({marks})",
                inspection_ids,
            ).fetchall()
        out: dict[int, set[str]] = {}
        for iid, kind in rows:
            out.setdefault(int(iid), set()).add(str(kind))
        return out
