"""The device agent: state, telemetry, verdict logs and model updates over one MQTT link.

All MQTT work (handlers, the outbox feeder and sender, telemetry) runs in the
link's thread; slow update steps (hashing, validation, activation) run in the
update manager's worker thread. Start it with :meth:`Agent.start`, stop with
:meth:`Agent.stop` (publishes ``online: false`` before disconnecting; if the
process dies the broker publishes the same through the Will).
"""

from __future__ import annotations

import collections
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from cloud_sync.config import UplinkConfig
from cloud_sync.edge_link import VerdictSource, stored_to_record
from cloud_sync.mqtt import LinkSettings, MqttLink
from cloud_sync.outbox import NewRecord, Outbox
from cloud_sync.telemetry import VerdictStats, read_system
from cloud_sync.topics import (
    CodeCounts,
    DeviceState,
    EventMessage,
    LatencyStats,
    LogAck,
    LogBatch,
    PayloadError,
    ReleaseCommand,
    Telemetry,
    Topics,
    UpdateStatus,
    decode_chunk,
    parse_payload,
)
from cloud_sync.updates import Activator, UpdateManager, Validator

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from cloud_sync.edge_link import ValidationReport
    from edge.config import LineInspectConfig
    from edge.events import EventBus
    from edge.types import StatusEvent

log = logging.getLogger(__name__)

AGENT_VERSION = "1"
_MAX_EVENTS_QUEUED = 1000


def link_settings(
    cfg: UplinkConfig,
    device_id: str,
    will: tuple[str, bytes] | None,
    subscriptions: tuple[tuple[str, int], ...],
    *,
    client_id: str | None = None,
    clean_start: bool = False,
) -> LinkSettings:
    """Resolve an :class:`UplinkConfig` (secrets included) into link settings."""
    password = cfg.password.resolve() if cfg.password is not None else None
    username = cfg.username
    if username is None and password is not None:
        username = device_id
    key_password = cfg.tls.key_password.resolve() if cfg.tls.key_password else None
    return LinkSettings(
        host=cfg.host,
        port=cfg.port,
        client_id=client_id or cfg.client_id or device_id,
        protocol=cfg.protocol,
        username=username,
        password=password,
        tls=cfg.tls.enabled,
        ca_file=cfg.tls.ca_file,
        cert_file=cfg.tls.cert_file,
        key_file=cfg.tls.key_file,
        key_password=key_password,
        check_hostname=cfg.tls.server_hostname_check,
        keepalive_s=cfg.keepalive_s,
        session_expiry_s=cfg.session_expiry_s,
        clean_start=clean_start,
        reconnect_min_s=cfg.reconnect_min_s,
        reconnect_max_s=cfg.reconnect_max_s,
        subscriptions=subscriptions,
        will=will,
    )


def tls_context(cfg: UplinkConfig) -> ssl.SSLContext | None:
    """An SSL context for HTTPS package downloads trusting the uplink's CA."""
    if not cfg.tls.enabled:
        return None
    ctx = ssl.create_default_context(cafile=str(cfg.tls.ca_file) if cfg.tls.ca_file else None)
    if cfg.tls.cert_file and cfg.tls.key_file:
        ctx.load_cert_chain(str(cfg.tls.cert_file), str(cfg.tls.key_file))
    return ctx


@dataclass(frozen=True, slots=True)
class _Inflight:
    first_seq: int
    last_seq: int
    sent_mono: float


class Agent:
    """The MQTT device agent of one appliance."""

    name = "uplink"

    def __init__(
        self,
        cfg: UplinkConfig,
        device_id: str,
        *,
        source: VerdictSource | None = None,
        trusted_keys: list[Ed25519PublicKey] | None = None,
        activate: Activator | None = None,
        validate: Validator | None = None,
        bus: EventBus | None = None,
        dropped_frames: Callable[[], int | None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = device_id
        self.topics = Topics(cfg.topic_prefix, device_id)
        self.source = source
        self.bus = bus
        self._dropped_frames = dropped_frames
        self.outbox = Outbox(cfg.outbox.path, int(cfg.outbox.quota_mb * 1e6))
        self.stats = VerdictStats()
        self.rejected_messages = 0
        self.rejected_reasons: collections.Counter[str] = collections.Counter()
        self._events: collections.deque[StatusEvent] = collections.deque(maxlen=_MAX_EVENTS_QUEUED)
        self._inflight: list[_Inflight] = []
        self._send_after = 0
        self._mid_to_range: dict[int, tuple[int, int]] = {}
        self._next_telemetry = 0.0
        self._last_model: tuple[str, str] = ("", "")
        self._last_telemetry_mono = time.monotonic()
        self._connected_since_unix: float | None = None
        self._unsub: Callable[[], None] | None = None
        self.updates: UpdateManager | None = None
        if cfg.updates.enabled:
            self.updates = UpdateManager(
                cfg.updates,
                device_id,
                trusted_keys or [],
                self._send_update,
                activate=activate,
                validate=validate,
                tls_context=tls_context(cfg),
                on_event=self._update_event,
            )
        subs: list[tuple[str, int]] = [(self.topics.logs_ack, 1)]
        if self.updates is not None:
            subs += [(self.topics.release, 1), (self.topics.chunk, 1)]
        offline = DeviceState(
            device=device_id, online=False, group=cfg.updates.group, reason="connection lost (will)"
        ).to_bytes()
        self.link = MqttLink(
            link_settings(cfg, device_id, (self.topics.state, offline), tuple(subs)),
            self._on_message,
            on_connected=self._on_connected,
            on_disconnected=self._on_disconnected,
            on_connect_failed=self._on_connect_failed,
            tick=self._tick,
            on_puback=self._on_puback,
            name=f"agent[{device_id}]",
        )
        self._stop_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self.bus is not None:
            self._unsub = self.bus.subscribe(self._on_status_event)
        if self.updates is not None:
            self.updates.resume_after_restart()
        self.link.start()

    def stop(self) -> None:
        with self._stop_lock:
            if self._unsub is not None:
                self._unsub()
                self._unsub = None
            final = (self.topics.state, self._state_payload(False, "agent stopped"))
            self.link.stop(final=final)
            self.outbox.close()

    # -- link callbacks (link thread) --------------------------------------------------------

    def _model(self) -> tuple[str, str]:
        """(name, version) of the active model: the slots, else the last verdict's model."""
        if self.updates is not None:
            ptr = self.updates.slots.read()
            if ptr.active is not None:
                version = ptr.version_of(ptr.active)
                name = ptr.name_of(ptr.active)
                if version:
                    return name or self._last_model[0], version
        return self._last_model

    def _state_payload(self, online: bool, reason: str = "") -> bytes:
        name, version = self._model()
        return DeviceState(
            device=self.device,
            online=online,
            group=self.cfg.updates.group,
            model_name=name,
            model_version=version,
            agent_version=AGENT_VERSION,
            protocol=self.link.stats.protocol,
            since_unix=time.time(),
            reason=reason,
        ).to_bytes()

    def _on_connected(self) -> None:
        self._connected_since_unix = time.time()
        self.link.publish(self.topics.state, self._state_payload(True), qos=1, retain=True)
        # Resend everything not yet acknowledged (at-least-once; ingest deduplicates).
        self._inflight.clear()
        self._mid_to_range.clear()
        self._send_after = 0
        if self.updates is not None:
            self.updates.on_connected()
            last = self.updates.last_status
            if last is not None:  # in case the last one died in flight with the old connection
                self.link.publish(self.topics.update_status, last.to_bytes(), qos=1, retain=True)
        self._emit("uplink.connected", f"connected ({self.link.stats.protocol})")

    def _on_disconnected(self, reason: str) -> None:
        self._connected_since_unix = None
        self._emit("uplink.lost", f"disconnected: {reason}", severity="warning")

    def _on_connect_failed(self, reason: str) -> None:
        self._emit("uplink.connect_failed", reason, severity="warning")

    def _reject(self, topic: str, reason: str) -> None:
        self.rejected_messages += 1
        self.rejected_reasons[reason.split(":", 1)[0]] += 1
        log.warning("rejected message on %s: %s", topic, reason)

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        payload = bytes(msg.payload)
        try:
            if topic == self.topics.logs_ack:
                ack = parse_payload(LogAck, payload, 4096)
                self._handle_ack(ack.first_seq, ack.last_seq)
            elif topic == self.topics.release and self.updates is not None:
                if not payload:
                    return  # retained message cleared
                cmd = parse_payload(ReleaseCommand, payload, self.cfg.max_incoming_bytes)
                self.updates.on_release(cmd)
            elif topic == self.topics.chunk and self.updates is not None:
                if len(payload) > self.cfg.max_incoming_bytes:
                    raise PayloadError(f"chunk of {len(payload)} bytes is too large")
                rid, index, data = decode_chunk(payload)
                self.updates.on_chunk(rid, index, data)
            else:
                raise PayloadError("unexpected topic")
        except PayloadError as exc:
            self._reject(topic, str(exc))
        except Exception as exc:
            log.exception("handling a message on %s failed", topic)
            self._reject(topic, f"handler error: {type(exc).__name__}: {exc}")

    def _handle_ack(self, first: int, last: int) -> None:
        if first > last:
            raise PayloadError("ack with first_seq > last_seq")
        self.outbox.ack(first, last)
        self._inflight = [
            b for b in self._inflight if not (b.first_seq >= first and b.last_seq <= last)
        ]

    def _on_puback(self, mid: int, reason: int) -> None:
        rng = self._mid_to_range.pop(mid, None)
        if rng is None:
            return
        if reason >= 0x80:
            log.error("broker refused log batch %d..%d (reason code %d)", rng[0], rng[1], reason)
            self._emit(
                "uplink.refused", f"broker refused log batch (reason {reason})", severity="error"
            )
            return
        if self.cfg.outbox.ack_mode == "broker":
            self._handle_ack(*rng)

    def _send_update(self, kind: str, payload: bytes, retain: bool) -> bool:
        topic = self.topics.chunk_request if kind == "chunk_request" else self.topics.update_status
        return self.link.publish(topic, payload, qos=1, retain=retain) is not None

    def _update_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        sev = "info" if data.get("ok", True) else "warning"
        self._emit(kind, message, severity=sev, **data)

    # -- periodic work (link thread) ----------------------------------------------------------

    def _tick(self) -> None:
        self._feed()
        connected = self.link.connected
        if self.updates is not None:
            self.updates.tick(connected)
            if connected:  # statuses wait in the queue while offline

                def publish(st: UpdateStatus) -> bool:
                    t = self.topics.update_status
                    return self.link.publish(t, st.to_bytes(), qos=1, retain=True) is not None

                for st in self.updates.send_statuses(publish):
                    if st.phase in ("done", "rolled_back"):
                        payload = self._state_payload(True)
                        self.link.publish(self.topics.state, payload, qos=1, retain=True)
        if not connected:
            return
        self._send_logs()
        self._send_events()
        now = time.monotonic()
        if now >= self._next_telemetry:
            self._next_telemetry = now + self.cfg.telemetry.interval_s
            self.link.publish(self.topics.telemetry, self.telemetry().to_bytes(), qos=0)

    def _feed(self, limit: int = 500) -> None:
        """Copy new verdicts from the result store into the outbox."""
        if self.source is None:
            return
        rows = self.source.verdicts_after(self.outbox.feed_cursor(), limit)
        if not rows:
            return
        records: list[NewRecord] = []
        last_id = 0
        for stored in rows:
            store_id, code, fields = stored_to_record(stored, self.cfg.outbox.include_regions)
            records.append(NewRecord(code, fields))
            last_id = max(last_id, store_id)
            lat = fields["timings_ms"].get("total")
            if fields["model_version"]:
                self._last_model = (fields["model_name"], fields["model_version"])
            self.stats.observe(code, lat)
            if self.updates is not None:
                self.updates.observe(code, lat, fields["model_version"])
        self.outbox.append(records, feed_cursor=last_id, offline=not self.link.connected)

    def enqueue(self, records: list[NewRecord]) -> list[int]:
        """Queue records directly (for callers without a result store, e.g. the bench)."""
        for r in records:
            self.stats.observe(r.code, r.fields.get("timings_ms", {}).get("total"))
        return self.outbox.append(records, offline=not self.link.connected)

    def _send_logs(self) -> None:
        oc = self.cfg.outbox
        now = time.monotonic()
        if self._inflight and now - self._inflight[0].sent_mono > oc.ack_timeout_s:
            log.warning(
                "no ack for log batches since %.0f s; resending", now - self._inflight[0].sent_mono
            )
            self._inflight.clear()
            self._mid_to_range.clear()
            self._send_after = 0
        if self._send_after == 0:
            oldest = self.outbox.oldest_seq()
            self._send_after = (oldest - 1) if oldest is not None else self.outbox.last_seq()
        while len(self._inflight) < oc.max_inflight_batches:
            rows = self.outbox.peek(self._send_after, oc.batch_size)
            if not rows:
                return
            since = self._connected_since_unix or time.time()
            wall = time.time()
            records = []
            for r in rows:
                historical = (
                    r.offline
                    or r.queued_unix < since - 1.0
                    or wall - float(r.fields.get("decided_unix") or wall) > oc.historical_after_s
                )
                records.append({**r.fields, "seq": r.seq, "historical": historical})
            d = self.outbox.dropped()
            batch = LogBatch.model_validate(
                {
                    "device": self.device,
                    "first_seq": rows[0].seq,
                    "last_seq": rows[-1].seq,
                    "sent_unix": wall,
                    "records": records,
                    "dropped": {"ok": d.ok, "ng": d.ng, "error": d.error},
                }
            )
            mid = self.link.publish(self.topics.logs, batch.to_bytes(), qos=1)
            if mid is None:
                return
            self._mid_to_range[mid] = (rows[0].seq, rows[-1].seq)
            if oc.ack_mode == "ingest":
                self._inflight.append(_Inflight(rows[0].seq, rows[-1].seq, now))
            self._send_after = rows[-1].seq

    def _on_status_event(self, ev: StatusEvent) -> None:
        self._events.append(ev)  # bus thread: only append

    def _send_events(self) -> None:
        while self._events:
            ev = self._events.popleft()
            msg = EventMessage(
                device=self.device,
                kind=ev.kind,
                source=ev.source,
                severity=str(ev.severity),
                message=ev.message,
                data={
                    k: v
                    for k, v in ev.data.items()
                    if isinstance(v, str | int | float | bool | None)
                },
                time_unix=ev.time_unix,
            )
            if self.link.publish(self.topics.events, msg.to_bytes(), qos=1) is None:
                self._events.appendleft(ev)
                return

    def _emit(self, kind: str, message: str, severity: str = "info", **data: Any) -> None:
        if self.bus is not None:
            from edge.types import Severity

            self.bus.emit(kind, "uplink", message, Severity(severity), **data)
        else:
            from edge.types import Severity, StatusEvent

            self._events.append(
                StatusEvent(
                    kind=kind,
                    source="uplink",
                    message=message,
                    severity=Severity(severity),
                    data=dict(data),
                )
            )

    def telemetry(self) -> Telemetry:
        """The telemetry message for the interval since the last one."""
        now = time.monotonic()
        interval = max(1e-3, now - self._last_telemetry_mono)
        self._last_telemetry_mono = now
        snap = self.stats.snapshot()
        sysr = read_system(Path(self.cfg.outbox.path).parent)
        d = self.outbox.dropped()
        name, version = self._model()
        return Telemetry(
            device=self.device,
            time_unix=time.time(),
            interval_s=interval,
            throughput_pps=snap.count / interval,
            latency=LatencyStats(
                p50_ms=snap.p50_ms, p95_ms=snap.p95_ms, p99_ms=snap.p99_ms, max_ms=snap.max_ms
            ),
            counts=CodeCounts(ok=snap.ok, ng=snap.ng, error=snap.error),
            counts_total=CodeCounts(ok=snap.total_ok, ng=snap.total_ng, error=snap.total_error),
            dropped_frames=self._dropped_frames() if self._dropped_frames else None,
            outbox_depth=self.outbox.depth(),
            outbox_bytes=self.outbox.size_bytes(),
            outbox_dropped=CodeCounts(ok=d.ok, ng=d.ng, error=d.error),
            rejected_messages=self.rejected_messages,
            disk_free_mb=sysr.disk_free_mb,
            disk_used_pct=sysr.disk_used_pct,
            cpu_temp_c=sysr.cpu_temp_c,
            gpu_temp_c=sysr.gpu_temp_c,
            cpu_pct=sysr.cpu_pct,
            model_name=name,
            model_version=version,
            connected_since_unix=self._connected_since_unix,
        )


def agent_from_config(
    root: LineInspectConfig,
    *,
    source: VerdictSource | None = None,
    activate: Activator | None = None,
    bus: EventBus | None = None,
    dropped_frames: Callable[[], int | None] | None = None,
    validate: Validator | None = None,
) -> Agent:
    """Build the agent from the root configuration (what `lineinspect run` calls).

    ``source`` is the running appliance's result store; ``activate`` its
    ``swap_model``. Releases are verified with ``uplink.updates.trusted_keys``
    (or ``model.trusted_keys`` when empty); staged packages are validated in
    the configured primary backend unless ``validate`` is given.
    """
    from cloud_sync.edge_link import load_trusted_keys, validate_package

    up = root.uplink
    key_paths = up.updates.trusted_keys or root.model.trusted_keys
    keys = load_trusted_keys(key_paths)
    backend = root.backend.primary

    def _validate(path: Path) -> ValidationReport:
        return validate_package(path, keys, backend)

    return Agent(
        up,
        root.station.device_id,
        source=source,
        trusted_keys=keys,
        activate=activate,
        validate=validate or _validate,
        bus=bus,
        dropped_frames=dropped_frames,
    )
