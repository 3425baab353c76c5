"""Fleet side of model updates: releases, the chunk server, staged rollouts, cancel.

- :func:`make_release` turns a (signed) model package into a signed
  :class:`~cloud_sync.topics.ReleaseManifest` and files it in a
  :class:`ReleaseStore` (``<state_dir>/releases/<release_id>/``).
- :class:`ChunkServer` answers devices' chunk requests (shared subscription
  ``$share/chunks/<prefix>/dev/+/update/chunk/req``, so several servers can
  run) from the release store.
- :class:`RolloutController` assigns a release to a group in stages: a
  canary share first, then the rest; a stage whose failures pass the
  release's ``failure_threshold`` pauses the rollout. Every device outcome
  is persisted in ``<state_dir>/fleet.sqlite``.
"""

from __future__ import annotations

import http.server
import json
import logging
import math
import re
import sqlite3
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt

from cloud_sync.mqtt import LinkSettings, MqttLink
from cloud_sync.slots import atomic_write_bytes
from cloud_sync.topics import (
    ChunkRequest,
    DeviceState,
    PayloadError,
    ReleaseCommand,
    ReleaseManifest,
    RolloutSettings,
    SignedRelease,
    Topics,
    UpdateStatus,
    device_from_topic,
    encode_chunk,
    fleet_filter,
    parse_payload,
)
from cloud_sync.updates import chunk_hashes, sign_release

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 256 * 1024
TERMINAL = frozenset({"done", "failed", "refused", "rolled_back", "cancelled"})
# A stage device that has published nothing for the release this long gets it again.
REASSIGN_S = 10.0


class ReleaseStore:
    """Releases on disk plus the rollout ledger (SQLite)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir
        self.releases_dir = state_dir / "releases"
        self.releases_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            str(state_dir / "fleet.sqlite"),
            check_same_thread=False,
            isolation_level=None,
            timeout=30,
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS rollouts (
                release_id TEXT NOT NULL, device TEXT NOT NULL, stage TEXT NOT NULL,
                phase TEXT NOT NULL, message TEXT NOT NULL, updated_unix REAL NOT NULL,
                PRIMARY KEY (release_id, device));
            CREATE TABLE IF NOT EXISTS release_state (
                release_id TEXT PRIMARY KEY, status TEXT NOT NULL, updated_unix REAL NOT NULL);
        """)

    def add(self, release: SignedRelease, package: Path) -> Path:
        d = self.releases_dir / release.manifest.release_id
        d.mkdir(parents=True, exist_ok=True)
        dest = d / "package.tar"
        if package.resolve() != dest.resolve():
            tmp = d / ".package.tar.tmp"
            tmp.write_bytes(package.read_bytes())
            tmp.replace(dest)
        atomic_write_bytes(d / "release.json", release.model_dump_json(indent=1).encode())
        self.set_status(release.manifest.release_id, "created")
        return dest

    def get(self, release_id: str) -> tuple[SignedRelease, Path] | None:
        d = self.releases_dir / release_id
        try:
            rel = SignedRelease.model_validate_json((d / "release.json").read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return rel, d / "package.tar"

    def set_status(self, release_id: str, status: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO release_state VALUES (?,?,?) ON CONFLICT(release_id) "
                "DO UPDATE SET status=excluded.status, "
                "updated_unix=excluded.updated_unix",
                (release_id, status, time.time()),
            )

    def status(self, release_id: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT status FROM release_state WHERE release_id=?", (release_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def record(self, release_id: str, device: str, stage: str, phase: str, message: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO rollouts VALUES (?,?,?,?,?,?) ON CONFLICT(release_id, device) DO "
                "UPDATE SET phase=excluded.phase, message=excluded.message, "
                "updated_unix=excluded.updated_unix",
                (release_id, device, stage, phase, message[:500], time.time()),
            )

    def ledger(self, release_id: str) -> list[tuple[str, str, str, str]]:
        """(device, stage, phase, message) rows of one release."""
        with self._lock:
            rows = self._db.execute(
                "SELECT device, stage, phase, message FROM rollouts WHERE "
                "release_id=? ORDER BY device",
                (release_id,),
            ).fetchall()
        return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def make_release(
    package: Path,
    key: Ed25519PrivateKey,
    *,
    group: str,
    release_id: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    url: str | None = None,
    rollback: bool = False,
    rollout: RolloutSettings | None = None,
    version: str | None = None,
    package_name: str | None = None,
) -> SignedRelease:
    """Sign a release of ``package`` (a model package .tar) for ``group``.

    Name and version are read from the package's own manifest (which is
    verified) unless given (a bench may ship an opaque payload).
    """
    if package_name is None or version is None:
        from cloud_sync.edge_link import package_info

        info = package_info(package, None)
        package_name = package_name or info.name
        version = version or info.version
    sha, size, chunks = chunk_hashes(package, chunk_size)
    rid = release_id or f"{package_name}-{version}-{uuid.uuid4().hex[:8]}"
    manifest = ReleaseManifest(
        release_id=rid,
        package_name=package_name,
        version=version,
        sha256=sha,
        size_bytes=size,
        chunk_size=chunk_size,
        chunk_sha256=chunks,
        url=url,
        target_group=group,
        rollback=rollback,
        created_unix=time.time(),
        rollout=rollout or RolloutSettings(),
    )
    return sign_release(manifest, key)


ChunkFilter = Callable[[str, str, int, bytes], bytes]
"""(device, release_id, index, data) -> data actually sent (test hook for tampering)."""


class ChunkServer:
    """Serves package chunks to devices on request."""

    def __init__(
        self,
        settings: LinkSettings,
        store: ReleaseStore,
        *,
        prefix: str = "lineinspect/v1",
        share_group: str = "chunks",
        chunk_filter: ChunkFilter | None = None,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.chunk_filter = chunk_filter
        self.served = 0
        self.rejected = 0
        self._cache: dict[str, tuple[SignedRelease, Path]] = {}
        sub = (f"$share/{share_group}/" + fleet_filter(prefix, "update/chunk/req"), 1)
        self.link = MqttLink(
            replace(settings, subscriptions=(sub,), protocol="5"),
            self._on_message,
            name=f"chunks[{settings.client_id}]",
        )

    def start(self) -> None:
        self.link.start()

    def stop(self) -> None:
        self.link.stop()

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        device = device_from_topic(self.prefix, msg.topic)
        try:
            if device is None:
                raise PayloadError("topic outside the namespace")
            req = parse_payload(ChunkRequest, bytes(msg.payload), 16384)
            entry = self._cache.get(req.release_id) or self.store.get(req.release_id)
            if entry is None:
                raise PayloadError(f"unknown release {req.release_id}")
            self._cache[req.release_id] = entry
            rel, path = entry
            m = rel.manifest
            topic = Topics(self.prefix, device).chunk
            with open(path, "rb") as f:
                for idx in req.indexes:
                    if not 0 <= idx < m.chunk_count:
                        raise PayloadError(f"chunk index {idx} out of range")
                    f.seek(idx * m.chunk_size)
                    data = f.read(m.chunk_size)
                    if self.chunk_filter is not None:
                        data = self.chunk_filter(device, m.release_id, idx, data)
                    self.link.publish(topic, encode_chunk(m.release_id, idx, data), qos=1)
                    self.served += 1
        except PayloadError as exc:
            self.rejected += 1
            log.warning("chunk request on %s rejected: %s", msg.topic, exc)


@dataclass
class RolloutResult:
    """Outcome of a rollout (also printed as JSON by ``fleet publish``)."""

    release_id: str
    status: str
    """completed | paused | cancelled | no_devices"""
    stages: list[dict[str, object]] = field(default_factory=list)
    duration_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(
            {
                "release_id": self.release_id,
                "status": self.status,
                "stages": self.stages,
                "duration_s": round(self.duration_s, 3),
            },
            indent=1,
        )


class RolloutController:
    """Tracks device states and update statuses; drives staged rollouts."""

    def __init__(
        self, settings: LinkSettings, store: ReleaseStore, *, prefix: str = "lineinspect/v1"
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.devices: dict[str, DeviceState] = {}
        self.status: dict[str, UpdateStatus] = {}
        self._cond = threading.Condition()
        subs = ((fleet_filter(prefix, "state"), 1), (fleet_filter(prefix, "update/status"), 1))
        self.link = MqttLink(
            replace(settings, subscriptions=subs),
            self._on_message,
            name=f"rollout[{settings.client_id}]",
        )

    def start(self) -> None:
        self.link.start()

    def stop(self) -> None:
        self.link.stop()

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        device = device_from_topic(self.prefix, msg.topic)
        payload = bytes(msg.payload)
        if device is None or not payload:
            return
        try:
            if msg.topic.endswith("/state"):
                st = parse_payload(DeviceState, payload, 65536)
                with self._cond:
                    self.devices[device] = st
                    self._cond.notify_all()
            else:
                us = parse_payload(UpdateStatus, payload, 65536)
                with self._cond:
                    self.status[device] = us
                    self._cond.notify_all()
        except PayloadError as exc:
            log.warning("rollout: bad message on %s: %s", msg.topic, exc)

    def group_members(self, group: str) -> list[str]:
        with self._cond:
            return sorted(d for d, s in self.devices.items() if group in ("*", s.group))

    def _assign(self, release: SignedRelease, device: str) -> bool:
        """Publish the retained install command; False when the link could not take it."""
        cmd = ReleaseCommand(
            action="install", release_id=release.manifest.release_id, release=release
        )
        topic = Topics(self.prefix, device).release
        return self.link.publish(topic, cmd.to_bytes(), qos=1, retain=True) is not None

    def _heard_from(self, device: str, release_id: str) -> bool:
        """Whether ``device`` has published any status for ``release_id`` (caller holds _cond)."""
        st = self.status.get(device)
        return st is not None and st.release_id == release_id

    def cancel(self, release_id: str, devices: Sequence[str]) -> int:
        """Send a retained cancel to devices that have not finished; returns how many."""
        n = 0
        for d in devices:
            st = self.status.get(d)
            if st is not None and st.release_id == release_id and st.phase in TERMINAL:
                continue
            cmd = ReleaseCommand(action="cancel", release_id=release_id)
            self.link.publish(Topics(self.prefix, d).release, cmd.to_bytes(), qos=1, retain=True)
            self.store.record(release_id, d, "cancel", "cancel_sent", "")
            n += 1
        self.store.set_status(release_id, "cancelled")
        return n

    def _run_stage(
        self, release: SignedRelease, name: str, devices: list[str], timeout_s: float
    ) -> dict[str, object]:
        rid = release.manifest.release_id
        deadline = time.monotonic() + timeout_s
        t0 = time.monotonic()
        # When the assignment was last handed to the link, per device; None = not yet (the
        # loop below sends it). A device that has not answered in ``REASSIGN_S`` gets the
        # (idempotent, retained) command again: a broker restart or a dropped connection
        # must not turn into a device silently left out of the rollout.
        sent: dict[str, float | None] = dict.fromkeys(devices)
        for d in devices:
            self.store.record(rid, d, name, "assigned", "")
        recorded: dict[str, str] = {}
        finished: dict[str, UpdateStatus] = {}  # sticky: a final status is final
        while True:
            now = time.monotonic()
            with self._cond:
                resend = [
                    d
                    for d, at in sent.items()
                    if not self._heard_from(d, rid) and (at is None or now - at >= REASSIGN_S)
                ]
            for d in resend:
                if self._assign(release, d):
                    if sent[d] is not None:
                        log.info("rollout %s: no answer from %s yet; assignment re-sent", rid, d)
                    sent[d] = now
            with self._cond:
                for d in devices:
                    st = self.status.get(d)
                    if (
                        d not in finished
                        and st is not None
                        and st.release_id == rid
                        and st.phase in TERMINAL
                    ):
                        finished[d] = st
                left = deadline - time.monotonic()
                if (
                    len(finished) < len(devices)
                    and left > 0
                    and (self.store.status(rid) != "cancelled")
                ):
                    self._cond.wait(min(left, 0.5))
            for d, st in finished.items():
                if recorded.get(d) != st.phase:
                    recorded[d] = st.phase
                    self.store.record(rid, d, name, st.phase, st.message)
            if (
                len(finished) == len(devices)
                or time.monotonic() >= deadline
                or (self.store.status(rid) == "cancelled")
            ):
                break
        ok = sum(1 for st in finished.values() if st.phase == "done")
        timed_out = [d for d in devices if d not in finished]
        for d in timed_out:
            self.store.record(rid, d, name, "timeout", "no final status in time")
        failed = len(devices) - ok
        return {
            "stage": name,
            "devices": len(devices),
            "done": ok,
            "failed": failed,
            "timed_out": len(timed_out),
            "seconds": round(time.monotonic() - t0, 3),
        }

    def rollout(
        self,
        release: SignedRelease,
        *,
        devices: Sequence[str] | None = None,
        discover_s: float = 2.0,
    ) -> RolloutResult:
        """Roll ``release`` out to its group: canary stage, then the rest."""
        t0 = time.monotonic()
        m = release.manifest
        rid = m.release_id
        if devices is None:
            self.link.wait_connected(10)
            time.sleep(discover_s)  # retained states arrive
            devices = self.group_members(m.target_group)
        targets = sorted(devices)
        if not targets:
            self.store.set_status(rid, "no_devices")
            return RolloutResult(rid, "no_devices")
        r = m.rollout
        n_canary = (
            min(len(targets), max(1, math.ceil(r.canary_share * len(targets))))
            if (r.canary_share > 0)
            else 0
        )
        stages = [("canary", targets[:n_canary]), ("rest", targets[n_canary:])]
        result = RolloutResult(rid, "completed")
        self.store.set_status(rid, "rolling_out")
        for name, members in stages:
            if not members:
                continue
            res = self._run_stage(release, name, members, r.stage_timeout_s)
            result.stages.append(res)
            if self.store.status(rid) == "cancelled":
                result.status = "cancelled"
                break
            failed = int(str(res["failed"]))
            if failed / len(members) > r.failure_threshold:
                result.status = "paused"
                self.store.set_status(rid, "paused")
                log.error(
                    "rollout %s paused: %d of %d devices failed in stage %s",
                    rid,
                    failed,
                    len(members),
                    name,
                )
                break
        if result.status == "completed":
            self.store.set_status(rid, "completed")
        result.duration_s = time.monotonic() - t0
        return result


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """GET /releases/<release_id>/package.tar with single byte-range support."""

    store: ReleaseStore
    served_bytes: list[int]
    max_response_bytes: int | None = None

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http: " + format, *args)

    def do_GET(self) -> None:
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        if len(parts) != 3 or parts[0] != "releases" or parts[2] != "package.tar":
            self.send_error(404, "no such path")
            return
        entry = self.store.get(parts[1])
        if entry is None:
            self.send_error(404, "no such release")
            return
        path = entry[1]
        size = path.stat().st_size
        start, end = 0, size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m is None:
                self.send_error(416, "only one 'bytes=a-b' range is supported")
                return
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start + 1
            if self.max_response_bytes is not None:
                left = min(left, self.max_response_bytes)  # the client sees a cut download
            while left > 0:
                block = f.read(min(65536, left))
                if not block:
                    break
                try:
                    self.wfile.write(block)
                except (BrokenPipeError, ConnectionResetError):
                    return
                left -= len(block)
                self.served_bytes[0] += len(block)


class PackageHttpServer:
    """Serves release packages over HTTP(S) with range requests (resumable downloads)."""

    def __init__(
        self,
        store: ReleaseStore,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        max_response_bytes: int | None = None,
    ) -> None:
        """``max_response_bytes`` cuts every response short (bandwidth and resume tests)."""
        handler: type[_RangeHandler] = type(
            "Handler",
            (_RangeHandler,),
            {"store": store, "served_bytes": [0], "max_response_bytes": max_response_bytes},
        )
        self._handler = handler
        self._httpd = http.server.ThreadingHTTPServer((host, port), handler)
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self.scheme = "http" if tls is None else "https"
        self._thread: threading.Thread | None = None

    @property
    def served_bytes(self) -> int:
        return int(self._handler.served_bytes[0])

    def url(self, release_id: str) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/releases/{release_id}/package.tar"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="package-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
