"""Signed model releases: verify, receive in chunks (or over HTTP), stage, validate, activate.

Device-side flow, every step persisted before the next begins::

    offered -> downloading -> downloaded (sha256 checked) -> staged (slot written)
      -> validating -> validated -> activating -> watching -> done
    with exits: refused | failed | cancelled | rolled_back

A release is a :class:`~cloud_sync.topics.SignedRelease`: the manifest's
canonical JSON bytes signed with Ed25519 (:func:`canonical_bytes`). The
device refuses a release whose signature does not verify under its trusted
keys, which targets another group, or whose version is not newer than the
active one (unless the release is signed as an explicit ``rollback``).

Chunks over MQTT carry their index; the download state (a preallocated
``.part`` file plus a bitmap of received chunks) is fsynced, so a
disconnect or a restart resumes by chunk index. Each chunk is checked
against the manifest's per-chunk sha256, the whole file against the
manifest's sha256 before anything else happens.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import logging
import os
import signal
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from cloud_sync.config import UpdatesConfig
from cloud_sync.slots import HealthWatch, SlotError, SlotStore, atomic_write_bytes, slot_name_for
from cloud_sync.topics import (
    ChunkRequest,
    PayloadError,
    ReleaseCommand,
    ReleaseManifest,
    SignedRelease,
    UpdateStatus,
    semver_key,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from cloud_sync.edge_link import ValidationReport

log = logging.getLogger(__name__)

FAILPOINTS_ENV = "LINEINSPECT_FAILPOINTS"
MAX_CHUNK_FAILURES = 5


def failpoint(name: str) -> None:
    """Test hook: SIGKILL this process at ``name`` when listed in $LINEINSPECT_FAILPOINTS.

    Used by the crash tests to kill the agent at exact points of an update.
    """
    names = os.environ.get(FAILPOINTS_ENV, "")
    if names and name in names.split(","):
        log.warning("failpoint %s: killing the process", name)
        os.kill(os.getpid(), signal.SIGKILL)


class UpdateRefusedError(Exception):
    """A release this device will not install (the message says why)."""


# -- signing ------------------------------------------------------------------------------------


def canonical_bytes(manifest: ReleaseManifest) -> bytes:
    """The exact bytes a release signature covers (sorted keys, no spaces)."""
    return json.dumps(
        manifest.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), allow_nan=False
    ).encode("utf-8")


def sign_release(manifest: ReleaseManifest, key: Ed25519PrivateKey) -> SignedRelease:
    from models.signing import key_fingerprint, sign_bytes

    sig = sign_bytes(canonical_bytes(manifest), key)
    return SignedRelease(
        manifest=manifest,
        key_id=key_fingerprint(key.public_key()),
        signature=base64.b64encode(sig).decode("ascii"),
    )


def verify_release(release: SignedRelease, trusted_keys: Sequence[Ed25519PublicKey]) -> str:
    """Fingerprint of the trusted key that signed ``release``; raises UpdateRefusedError."""
    from models.signing import key_fingerprint, verify_bytes

    if not trusted_keys:
        raise UpdateRefusedError("no trusted release keys are configured")
    try:
        sig = base64.b64decode(release.signature, validate=True)
    except ValueError:
        raise UpdateRefusedError("signature is not base64") from None
    key = verify_bytes(canonical_bytes(release.manifest), sig, trusted_keys)
    if key is None:
        raise UpdateRefusedError(
            f"signature does not verify under any trusted key (signed by key {release.key_id})"
        )
    return key_fingerprint(key)


def chunk_hashes(path: Path, chunk_size: int) -> tuple[str, int, list[str]]:
    """(sha256, size, per-chunk sha256 list) of a file."""
    whole = hashlib.sha256()
    chunks: list[str] = []
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_size)
            if not block:
                break
            whole.update(block)
            chunks.append(hashlib.sha256(block).hexdigest())
            size += len(block)
    return whole.hexdigest(), size, chunks


def check_release(
    manifest: ReleaseManifest,
    *,
    group: str,
    active_version: str | None,
    active_slot: str | None,
    max_bytes: int,
) -> str | None:
    """Why a verified release must not be installed here (None: go ahead; "" already active)."""
    if manifest.target_group not in (group, "*"):
        return f"release targets group {manifest.target_group!r}, this device is in {group!r}"
    if manifest.size_bytes > max_bytes:
        return f"package of {manifest.size_bytes} bytes exceeds the {max_bytes} byte limit"
    if len(manifest.chunk_sha256) != manifest.chunk_count:
        return (
            f"manifest lists {len(manifest.chunk_sha256)} chunk hashes for "
            f"{manifest.chunk_count} chunks"
        )
    if active_version is None:
        return None
    if active_slot == slot_name_for(manifest.package_name, manifest.version, manifest.sha256):
        return ""
    new, cur = semver_key(manifest.version), semver_key(active_version)
    if manifest.rollback:
        if new >= cur:
            return (
                f"rollback release {manifest.version} is not older than the active {active_version}"
            )
        return None
    if new <= cur:
        return (
            f"version {manifest.version} is not newer than the active {active_version} "
            "(a downgrade needs a release signed as rollback)"
        )
    return None


# -- persisted state ----------------------------------------------------------------------------


class UpdateState(BaseModel):
    """``incoming/state.json``: the update in progress."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    release: SignedRelease
    phase: str
    slot: str | None = None
    message: str = ""
    baseline_error_rate: float | None = None
    baseline_p95_ms: float | None = None


class FinishedLog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    finished: dict[str, str] = Field(default_factory=dict, description="release id -> phase")


Activator = Callable[[Path], None]
"""Swaps the running model for the package at a path, between parts (Appliance.swap_model)."""
Validator = Callable[[Path], "ValidationReport"]
StatusSink = Callable[[UpdateStatus], None]


@dataclass(frozen=True, slots=True)
class HealthSample:
    code: str
    latency_ms: float | None
    model_version: str


class UpdateManager:
    """The device side of model updates. Owned by the agent; ``tick`` runs in its thread.

    ``send(topic_kind, payload)`` is how it talks to the broker: ``"status"``
    (retained status) and ``"chunk_request"``.
    """

    def __init__(
        self,
        config: UpdatesConfig,
        device: str,
        trusted_keys: Sequence[Ed25519PublicKey],
        send: Callable[[str, bytes, bool], bool],
        *,
        activate: Activator | None = None,
        validate: Validator | None = None,
        tls_context: ssl.SSLContext | None = None,
        on_event: Callable[[str, str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.cfg = config
        self.device = device
        self.trusted_keys = list(trusted_keys)
        self._send = send
        self._activate = activate
        self._validate = validate
        self._tls = tls_context
        self._on_event = on_event
        self.slots = SlotStore(config.slots_dir)
        self._state_path = self.slots.incoming / "state.json"
        self._finished_path = self.slots.incoming / "finished.json"
        self._state: UpdateState | None = self._load_state()
        self._have: bytearray = bytearray()
        self._requested: dict[int, float] = {}
        self._chunk_failures: dict[int, int] = {}
        self._worker: threading.Thread | None = None
        self._outgoing: collections.deque[UpdateStatus] = collections.deque()
        self._out_lock = threading.Lock()
        self.last_status: UpdateStatus | None = None
        """The latest status, re-published (retained) at every connect."""
        self._lock = threading.Lock()
        self._sample_lock = threading.Lock()
        self._cancel_requested: str | None = None
        self._samples: list[HealthSample] = []
        self._before: list[HealthSample] = []
        self.counters = {"rejected_chunks": 0, "refused_releases": 0, "rollbacks": 0}
        self.last_result = ""
        if self._state is not None and self._state.phase == "downloading":
            self._have = self._load_bitmap(self._state.release.manifest)

    # -- persistence ----------

    def _load_state(self) -> UpdateState | None:
        try:
            return UpdateState.model_validate_json(self._state_path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            log.error("update state %s is corrupt (%s); discarding it", self._state_path, exc)
            self._state_path.unlink(missing_ok=True)
            return None

    def _save_state(self, state: UpdateState | None) -> None:
        self._state = state
        if state is None:
            self._state_path.unlink(missing_ok=True)
        else:
            atomic_write_bytes(self._state_path, state.model_dump_json().encode())

    def _finished(self) -> dict[str, str]:
        try:
            return FinishedLog.model_validate_json(self._finished_path.read_bytes()).finished
        except (FileNotFoundError, ValueError):
            return {}

    def _mark_finished(self, release_id: str, phase: str) -> None:
        done = self._finished()
        done[release_id] = phase
        keep = dict(list(done.items())[-200:])
        atomic_write_bytes(
            self._finished_path, FinishedLog(finished=keep).model_dump_json().encode()
        )

    def _part_path(self, release_id: str) -> Path:
        return self.slots.incoming / f"{release_id}.part"

    def _bitmap_path(self, release_id: str) -> Path:
        return self.slots.incoming / f"{release_id}.have"

    def _load_bitmap(self, m: ReleaseManifest) -> bytearray:
        try:
            data = bytearray(self._bitmap_path(m.release_id).read_bytes())
        except FileNotFoundError:
            data = bytearray()
        if len(data) != m.chunk_count or not self._part_path(m.release_id).is_file():
            return bytearray(m.chunk_count)
        return data

    # -- status ----------

    @property
    def state(self) -> UpdateState | None:
        return self._state

    def active_version(self) -> str:
        ptr = self.slots.read()
        return ptr.version_of(ptr.active) or ""

    def _status(
        self,
        release: SignedRelease,
        phase: str,
        ok: bool = True,
        message: str = "",
        progress: float | None = None,
    ) -> None:
        st = UpdateStatus(
            device=self.device,
            release_id=release.manifest.release_id,
            version=release.manifest.version,
            phase=phase,
            ok=ok,
            message=message,
            progress=progress,
            active_version=self.active_version(),
            time_unix=time.time(),
        )
        with self._out_lock:
            self._outgoing.append(st)
        if phase in ("done", "failed", "refused", "rolled_back", "cancelled"):
            self.last_result = f"{release.manifest.version}: {phase}"
        if self._on_event is not None:
            self._on_event(
                f"update.{phase}",
                message or phase,
                {
                    "release_id": release.manifest.release_id,
                    "version": release.manifest.version,
                    "ok": ok,
                },
            )

    def _set_phase(self, phase: str, message: str = "", ok: bool = True, **extra: Any) -> None:
        st = self._state
        assert st is not None
        new = st.model_copy(update={"phase": phase, "message": message, **extra})
        self._save_state(new)
        self._status(st.release, phase, ok, message)

    def _finish(self, phase: str, message: str, ok: bool) -> None:
        st = self._state
        if st is None:
            return
        rid = st.release.manifest.release_id
        self._status(st.release, phase, ok, message)
        self._mark_finished(rid, phase)
        self._part_path(rid).unlink(missing_ok=True)
        self._bitmap_path(rid).unlink(missing_ok=True)
        self._save_state(None)
        self._requested.clear()
        self._chunk_failures.clear()

    # -- incoming messages ----------

    def on_release(self, cmd: ReleaseCommand) -> None:
        """A release or cancel for this device (retained: may arrive again at every connect)."""
        if cmd.action == "cancel":
            self._cancel(cmd.release_id)
            return
        release = cmd.release
        if release is None or release.manifest.release_id != cmd.release_id:
            raise PayloadError("install command without a matching release")
        rid = release.manifest.release_id
        if self._state is not None and self._state.release.manifest.release_id == rid:
            return  # already working on it
        if rid in self._finished():
            return
        if self._state is not None and self._busy():
            self.counters["refused_releases"] += 1
            self._status(
                release,
                "refused",
                False,
                f"busy with release {self._state.release.manifest.release_id}",
            )
            return
        try:
            verify_release(release, self.trusted_keys)
            ptr = self.slots.read()
            why = check_release(
                release.manifest,
                group=self.cfg.group,
                active_version=ptr.version_of(ptr.active),
                active_slot=ptr.active,
                max_bytes=int(self.cfg.max_package_mb * 1e6),
            )
        except UpdateRefusedError as exc:
            why = str(exc)
        if why == "":
            self._mark_finished(rid, "done")
            self._status(release, "done", True, "already the active model")
            return
        if why is not None:
            self.counters["refused_releases"] += 1
            self._mark_finished(rid, "refused")
            self._status(release, "refused", False, why)
            return
        if self._state is not None:
            self._finish("cancelled", f"superseded by release {rid}", False)
        m = release.manifest
        self._prepare_part(m)
        self._save_state(UpdateState(release=release, phase="downloading"))
        self._status(
            release, "offered", True, f"{m.package_name} {m.version}, {m.size_bytes} bytes"
        )
        self._status(release, "downloading", True, progress=0.0)
        if m.url is not None:
            self._start_worker(self._http_download_then_install)

    def _busy(self) -> bool:
        return self._state is not None and self._state.phase not in ("downloading",)

    def _cancel(self, release_id: str) -> None:
        st = self._state
        if st is None or st.release.manifest.release_id != release_id:
            return
        if self._worker_busy():
            self._cancel_requested = release_id  # the worker stops at its next step
            return
        if st.phase in ("downloading", "downloaded", "staged", "validating", "validated"):
            self._drop_cancelled()

    def _drop_cancelled(self) -> None:
        st = self._state
        if st is None:
            return
        if st.slot is not None and self.slots.read().staged == st.slot:
            self.slots.clear_staged()
            self.slots.gc()
        self._cancel_requested = None
        self._finish("cancelled", "cancelled by the fleet", False)

    def _cancelled(self) -> bool:
        """In the worker: stop here if the fleet cancelled this release (before activation)."""
        st = self._state
        if st is not None and self._cancel_requested == st.release.manifest.release_id:
            self._drop_cancelled()
            return True
        return False

    def _prepare_part(self, m: ReleaseManifest) -> None:
        part = self._part_path(m.release_id)
        with open(part, "wb") as f:
            f.truncate(m.size_bytes)
        self._have = bytearray(m.chunk_count)
        atomic_write_bytes(self._bitmap_path(m.release_id), bytes(self._have))

    def on_chunk(self, release_id: str, index: int, data: bytes) -> None:
        """One chunk from the fleet (over MQTT)."""
        st = self._state
        if st is None or st.phase != "downloading" or st.release.manifest.release_id != release_id:
            return  # late or duplicate: harmless
        m = st.release.manifest
        if not 0 <= index < m.chunk_count:
            raise PayloadError(f"chunk index {index} out of range")
        self._requested.pop(index, None)
        if self._have[index]:
            return
        if hashlib.sha256(data).hexdigest() != m.chunk_sha256[index]:
            self.counters["rejected_chunks"] += 1
            n = self._chunk_failures.get(index, 0) + 1
            self._chunk_failures[index] = n
            log.warning(
                "chunk %d of %s does not match its signed sha256 (%d)", index, release_id, n
            )
            if self._on_event is not None:
                self._on_event(
                    "update.chunk_rejected",
                    f"chunk {index} failed its sha256",
                    {"release_id": release_id, "index": index},
                )
            if n >= MAX_CHUNK_FAILURES:
                self._finish("failed", f"chunk {index} failed its sha256 {n} times", False)
            return
        self._write_chunk(m, index, data)

    def _write_chunk(self, m: ReleaseManifest, index: int, data: bytes) -> None:
        self._write_chunk_nostart(m, index, data)
        done = sum(self._have)
        failpoint(f"update.after_chunks_{done}")
        if done == m.chunk_count:
            self._set_phase("downloaded", "all chunks received")
            self._start_worker(self._install)
        elif done % max(1, m.chunk_count // 10) == 0:
            assert self._state is not None
            self._status(self._state.release, "downloading", True, progress=done / m.chunk_count)

    def on_connected(self) -> None:
        """Re-request everything outstanding after a (re)connect."""
        self._requested.clear()

    # -- periodic work ----------

    def send_statuses(self, publish: Callable[[UpdateStatus], bool]) -> list[UpdateStatus]:
        """Publish queued statuses in order; stops (keeping the rest) at the first failure."""
        sent: list[UpdateStatus] = []
        while True:
            with self._out_lock:
                if not self._outgoing:
                    return sent
                st = self._outgoing[0]
            if not publish(st):
                return sent
            with self._out_lock:
                self._outgoing.popleft()
            self.last_status = st
            sent.append(st)

    def _worker_busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def tick(self, connected: bool) -> None:
        st = self._state
        if st is None or self._worker_busy():
            return  # the worker owns the state while it runs
        if st.phase == "downloading" and st.release.manifest.url is None:
            if connected:
                self._request_chunks(st.release.manifest)
        elif st.phase in ("downloaded", "staged", "validating", "validated", "activating"):
            self._start_worker(self._install)  # resume after a restart
        elif st.phase == "downloading":
            self._start_worker(self._http_download_then_install)
        elif st.phase == "watching":
            self._check_health()

    def _request_chunks(self, m: ReleaseManifest) -> None:
        now = time.monotonic()
        for idx, t in list(self._requested.items()):
            if now - t > self.cfg.chunk_timeout_s:
                del self._requested[idx]
        want: list[int] = []
        free = self.cfg.chunk_window - len(self._requested)
        if free <= 0:
            return
        for i, have in enumerate(self._have):
            if not have and i not in self._requested:
                want.append(i)
                if len(want) >= free:
                    break
        if not want:
            return
        req = ChunkRequest(release_id=m.release_id, indexes=want)
        if self._send("chunk_request", req.to_bytes(), False):
            for i in want:
                self._requested[i] = now

    def _start_worker(self, fn: Callable[[], None]) -> None:
        if self._worker is not None and self._worker.is_alive():
            return
        self._worker = threading.Thread(target=self._guard(fn), name="update-worker", daemon=True)
        self._worker.start()

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                with self._lock:
                    fn()
            except Exception as exc:
                log.exception("update step failed")
                self._finish("failed", f"{type(exc).__name__}: {exc}", False)

        return run

    # -- HTTP(S) download ----------

    def _http_download_then_install(self) -> None:
        st = self._state
        if st is None or st.release.manifest.url is None:
            return
        m = st.release.manifest
        url = m.url
        assert url is not None
        if not url.startswith(("http://", "https://")):
            self._finish("failed", f"unsupported package URL scheme in {url!r}", False)
            return
        attempts = 0
        while sum(self._have) < m.chunk_count:
            if self._cancelled():
                return
            first_missing = self._have.index(0)
            start = first_missing * m.chunk_size
            req = urllib.request.Request(url, headers={"Range": f"bytes={start}-"})  # noqa: S310
            try:
                with urllib.request.urlopen(req, timeout=30, context=self._tls) as resp:  # noqa: S310
                    if resp.status == 200 and start:
                        resp.read(start)  # server ignored the range: skip what we have
                    elif resp.status not in (200, 206):
                        raise OSError(f"HTTP {resp.status}")
                    idx = first_missing
                    while idx < m.chunk_count:
                        want = min(m.chunk_size, m.size_bytes - idx * m.chunk_size)
                        data = resp.read(want)
                        if len(data) != want:
                            raise OSError("connection closed mid-chunk")
                        if hashlib.sha256(data).hexdigest() != m.chunk_sha256[idx]:
                            self.counters["rejected_chunks"] += 1
                            raise OSError(f"chunk {idx} failed its sha256")
                        if not self._have[idx]:
                            self._write_chunk_nostart(m, idx, data)
                        idx += 1
            except OSError as exc:
                refused = _tls_refusal(exc)
                if refused is not None:
                    # retrying cannot fix a certificate the device does not trust
                    self._finish(
                        "failed",
                        f"download refused: the package server's TLS certificate was not "
                        f"accepted ({refused}); check uplink.tls.ca_file",
                        False,
                    )
                    return
                progressed = self._have.index(0) > first_missing if 0 in self._have else True
                attempts = 1 if progressed else attempts + 1  # a cut that made progress is fine
                log.warning("package download from %s failed (%s); retry %d", url, exc, attempts)
                if attempts >= 20:
                    self._finish("failed", f"download failed: {exc}", False)
                    return
                if self._state is None:  # cancelled meanwhile
                    return
                time.sleep(min(30.0, 0.1 * 2 ** min(attempts, 8)))
        if self._cancelled():
            return
        self._set_phase("downloaded", "all chunks received")
        self._install()

    def _write_chunk_nostart(self, m: ReleaseManifest, index: int, data: bytes) -> None:
        """Write one verified chunk durably and record it in the bitmap (no phase change)."""
        with open(self._part_path(m.release_id), "r+b") as f:
            f.seek(index * m.chunk_size)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._have[index] = 1
        atomic_write_bytes(self._bitmap_path(m.release_id), bytes(self._have))

    # -- install pipeline (worker thread) ----------

    def _install(self) -> None:
        st = self._state
        if st is None:
            return
        m = st.release.manifest
        slot = slot_name_for(m.package_name, m.version, m.sha256)
        if st.phase == "downloaded":
            part = self._part_path(m.release_id)
            sha, size, _ = chunk_hashes(part, m.chunk_size)
            if size != m.size_bytes or sha != m.sha256:
                self._finish(
                    "failed",
                    f"package sha256 {sha[:16]}… ({size} bytes) does not "
                    f"match the release's {m.sha256[:16]}… ({m.size_bytes} bytes)",
                    False,
                )
                return
            failpoint("update.before_stage")
            self.slots.add_package(part, slot, move=True)
            self.slots.stage(slot, m.version, m.package_name)
            self._bitmap_path(m.release_id).unlink(missing_ok=True)
            self._set_phase("staged", f"staged in slot {slot}", slot=slot)
            st = self._state
            assert st is not None
        if self._cancelled():
            return
        if st.phase in ("staged", "validating"):
            self._set_phase("validating", "loading in the backend, scoring reference images")
            report = self._validate(self.slots.package_path(slot)) if self._validate else None
            if report is not None and not report.ok:
                self.slots.clear_staged()
                self._finish("failed", f"validation failed: {report.message}", False)
                self.slots.gc()
                return
            self._set_phase("validated", report.message if report else "no validator configured")
            failpoint("update.after_validate")
            st = self._state
            assert st is not None
        if st.phase == "validated" and self._cancelled():
            return
        if st.phase in ("validated", "activating"):
            self._activate_slot(slot)

    def _activate_slot(self, slot: str) -> None:
        st = self._state
        assert st is not None
        ptr = self.slots.read()
        before_err, before_p95 = self._baseline()
        self._set_phase(
            "activating",
            f"swapping in slot {slot} between parts",
            baseline_error_rate=before_err,
            baseline_p95_ms=before_p95,
        )
        failpoint("update.before_swap")
        if self._activate is not None:
            try:
                self._activate(self.slots.package_path(slot))
            except Exception as exc:
                if ptr.staged == slot:
                    self.slots.clear_staged()
                self._finish("failed", f"activation failed, old model kept: {exc}", False)
                return
        failpoint("update.after_swap")
        now = time.time()
        watch = HealthWatch(
            release_id=st.release.manifest.release_id,
            started_unix=now,
            until_unix=now + self.cfg.health.window_s,
            baseline_error_rate=before_err,
            baseline_p95_ms=before_p95,
        )
        if ptr.active != slot:
            if ptr.staged != slot:
                self.slots.stage(
                    slot, st.release.manifest.version, st.release.manifest.package_name
                )
            self.slots.activate_staged(watch)
        failpoint("update.after_pointer")
        with self._sample_lock:
            self._samples = []
        self._set_phase("watching", f"active; watching health for {self.cfg.health.window_s:g} s")

    # -- health watch ----------

    def observe(self, code: str, latency_ms: float | None, model_version: str) -> None:
        """Every verdict the agent sees (for the baseline and the health watch)."""
        s = HealthSample(code, latency_ms, model_version)
        with self._sample_lock:
            st = self._state
            if st is not None and st.phase == "watching":
                if not model_version or model_version == st.release.manifest.version:
                    self._samples.append(s)
            else:
                self._before.append(s)
                if len(self._before) > 500:
                    del self._before[:-500]

    def _baseline(self) -> tuple[float | None, float | None]:
        from cloud_sync.telemetry import error_rate_and_p95

        with self._sample_lock:
            samples = [(s.code, s.latency_ms) for s in self._before]
        return error_rate_and_p95(samples)

    def _check_health(self) -> None:
        from cloud_sync.telemetry import error_rate_and_p95

        st = self._state
        assert st is not None
        h = self.cfg.health
        with self._sample_lock:
            samples = [(s.code, s.latency_ms) for s in self._samples]
        ptr = self.slots.read()
        watch = ptr.watch
        until = watch.until_unix if watch is not None else 0.0
        if len(samples) >= h.min_verdicts:
            err, p95 = error_rate_and_p95(samples)
            reason = ""
            base_err = st.baseline_error_rate or 0.0
            if err is not None and err > max(h.max_error_rate, base_err + 0.02):
                reason = (
                    f"ERROR share {err:.1%} over {len(samples)} verdicts (before: {base_err:.1%})"
                )
            elif (
                p95 is not None
                and st.baseline_p95_ms
                and p95 > h.max_latency_ratio * st.baseline_p95_ms
            ):
                reason = f"p95 latency {p95:.1f} ms vs {st.baseline_p95_ms:.1f} ms before"
            if reason:
                self._rollback(reason)
                return
        if time.time() >= until:
            self.slots.end_watch()
            self.slots.gc()
            self._finish("done", f"healthy after {len(samples)} verdicts", True)

    def _rollback(self, reason: str) -> None:
        try:
            ptr = self.slots.rollback()
        except SlotError as exc:
            self._finish("failed", f"degraded ({reason}) but cannot roll back: {exc}", False)
            return
        self.counters["rollbacks"] += 1
        if self._activate is not None and ptr.active is not None:
            try:
                self._activate(self.slots.package_path(ptr.active))
            except Exception as exc:
                log.exception("re-activating the previous model failed")
                reason += f"; re-activation failed: {exc}"
        self._finish("rolled_back", f"rolled back: {reason}", False)

    def resume_after_restart(self) -> None:
        """Called once at start: report where an interrupted update stands."""
        st = self._state
        if st is None:
            return
        ptr = self.slots.read()
        if st.phase == "activating" and st.slot is not None and ptr.active == st.slot:
            self._set_phase("watching", "resumed after restart; new model is active")
        self._status(st.release, st.phase, True, f"resuming at {st.phase}")


def _tls_refusal(exc: BaseException) -> str | None:
    """The reason when ``exc`` is a TLS certificate verification failure, else None."""
    reason = getattr(exc, "reason", None)  # urllib wraps it in URLError.reason
    for e in (exc, reason):
        if isinstance(e, ssl.SSLCertVerificationError):
            return str(e.verify_message or e)
    return None
