"""One MQTT connection with its own network thread, used by the agent and the fleet side.

paho-mqtt 2.x with ``CallbackAPIVersion.VERSION2``. The thread connects,
runs the network loop, calls a ``tick`` function about ten times a second
(the owner's periodic work happens there, in the same thread as message
handlers), and reconnects with exponential backoff and jitter. Every failed
attempt is reported with its reason: the socket/TLS exception, or the
CONNACK reason code (checked, never assumed). With ``protocol="auto"`` an
MQTT 5 CONNACK refusing the protocol version switches to MQTT 3.1.1.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

# CONNACK codes meaning "I do not speak this protocol version" (3.1.1: 1, MQTT 5: 0x84).
_PROTOCOL_REFUSED = {1, 0x84}


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """Where and how to connect (already resolved: secrets are values here)."""

    host: str
    port: int
    client_id: str
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    key_password: str | None = None
    check_hostname: bool = True
    keepalive_s: int = 30
    session_expiry_s: int = 3600
    clean_start: bool = False
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    subscriptions: tuple[tuple[str, int], ...] = ()
    will: tuple[str, bytes] | None = None
    """Topic and payload published retained (QoS 1) by the broker if we vanish."""
    max_inflight: int = 100


MessageHandler = Callable[[mqtt.MQTTMessage], None]


@dataclass(slots=True)
class LinkStats:
    """Counters of one link (read by telemetry and status pages)."""

    connect_attempts: int = 0
    connects: int = 0
    disconnects: int = 0
    last_error: str = ""
    last_error_unix: float = 0.0
    connected_since_unix: float | None = None
    protocol: str = ""
    refused_subscriptions: list[str] = field(default_factory=list)


def _leave_writes_to_the_loop(_client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
    """paho's write-registration callback: nothing to do, the link's loop selects on writes."""


class MqttLink:
    """A reconnecting MQTT client running in its own thread."""

    def __init__(
        self,
        settings: LinkSettings,
        on_message: MessageHandler,
        *,
        on_connected: Callable[[], None] | None = None,
        on_disconnected: Callable[[str], None] | None = None,
        on_connect_failed: Callable[[str], None] | None = None,
        tick: Callable[[], None] | None = None,
        on_puback: Callable[[int, int], None] | None = None,
        name: str = "mqtt",
    ) -> None:
        self.settings = settings
        self._on_message = on_message
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._on_connect_failed = on_connect_failed
        self._tick = tick
        self._on_puback = on_puback
        self.name = name
        self.stats = LinkStats()
        self._protocol: Literal["5", "3.1.1"] = "3.1.1" if settings.protocol == "3.1.1" else "5"
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- public -------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def protocol(self) -> str:
        return self._protocol

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-link", daemon=True)
        self._thread.start()

    def stop(self, final: tuple[str, bytes] | None = None, timeout_s: float = 5.0) -> None:
        """Publish ``final`` (retained, QoS 1) if connected, disconnect cleanly, join."""
        if self._thread is None:
            return
        client = self._client
        if final is not None and client is not None and self.connected:
            # Best effort: the connection can drop between the check above and the
            # publish; paho then reports it by raising from is_published(). The Will
            # (retained "offline") covers that case, so stop() must never fail on it.
            try:
                info = client.publish(final[0], final[1], qos=1, retain=True)
                deadline = time.monotonic() + min(timeout_s, 2.0)
                while (
                    info.rc == mqtt.MQTT_ERR_SUCCESS
                    and not info.is_published()
                    and time.monotonic() < deadline
                    and self.connected
                ):
                    time.sleep(0.02)
            except (RuntimeError, ValueError) as exc:
                log.info("%s: final message not delivered at stop: %s", self.name, exc)
        self._stop.set()
        self._thread.join(timeout_s)
        self._thread = None

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Wait for the broker's answer (SUBACK) to this connection's subscriptions.

        Messages published before it may have no subscriber to reach (``refused_subscriptions``
        lists the ones the broker refused). True at once for a link without subscriptions.
        """
        return self._subscribed.wait(timeout_s)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Queue a message; returns its message id, or None when not connected."""
        client = self._client
        if client is None or not self.connected:
            return None
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        return int(info.mid)

    def subscribe(self, topics: Sequence[tuple[str, int]]) -> None:
        client = self._client
        if client is not None and self.connected and topics:
            client.subscribe(list(topics))

    # -- internals ------------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        self.stats.last_error = reason
        self.stats.last_error_unix = time.time()
        log.warning(
            "%s: connect to %s:%d failed: %s",
            self.name,
            self.settings.host,
            self.settings.port,
            reason,
        )
        if self._on_connect_failed is not None:
            self._on_connect_failed(reason)

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        v5 = self._protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else s.clean_start,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(0)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            client.tls_set(
                ca_certs=str(s.ca_file) if s.ca_file else None,
                certfile=str(s.cert_file) if s.cert_file else None,
                keyfile=str(s.key_file) if s.key_file else None,
                keyfile_password=s.key_password,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(not s.check_hostname)
        if s.will is not None:
            client.will_set(s.will[0], s.will[1], qos=1, retain=True)
        # Only this link's thread touches the socket. In paho's manual-loop mode publish()
        # from another thread writes to the socket at once, from that thread, while this
        # one may be reading it: two threads in one TLS connection corrupt it (seen as
        # "Unspecified error" disconnects under load). With a write-registration callback
        # paho only queues the packet and wakes this thread's select (its socket pair).
        client.on_socket_register_write = _leave_writes_to_the_loop
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        client.on_publish = self._handle_publish
        return client

    def _handle_connect(
        self, client: mqtt.Client, _ud: Any, _flags: Any, rc: ReasonCode, _props: Properties | None
    ) -> None:
        if rc.is_failure:
            name = rc.getName()
            self._fail(f"broker refused the connection: {name} (reason code {rc.value})")
            if (
                self.settings.protocol == "auto"
                and self._protocol == "5"
                and (rc.value in _PROTOCOL_REFUSED)
            ):
                log.warning("%s: broker does not speak MQTT 5; falling back to 3.1.1", self.name)
                self._protocol = "3.1.1"
            return
        self.stats.connects += 1
        self.stats.connected_since_unix = time.time()
        self.stats.protocol = "MQTT 5" if self._protocol == "5" else "MQTT 3.1.1"
        self.stats.refused_subscriptions = []
        self._subscribed.clear()
        log.info(
            "%s: connected to %s:%d (%s)",
            self.name,
            self.settings.host,
            self.settings.port,
            self.stats.protocol,
        )
        if self.settings.subscriptions:
            client.subscribe(list(self.settings.subscriptions))
        else:
            self._subscribed.set()
        self._connected.set()
        if self._on_connected is not None:
            self._on_connected()

    def _handle_disconnect(
        self, _client: mqtt.Client, _ud: Any, _flags: Any, rc: ReasonCode, _props: Properties | None
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._subscribed.clear()
        if was:
            self.stats.disconnects += 1
            self.stats.connected_since_unix = None
            reason = f"{rc.getName()} (reason code {rc.value})"
            level = logging.INFO if self._stop.is_set() else logging.WARNING
            log.log(level, "%s: disconnected: %s", self.name, reason)
            if self._on_disconnected is not None:
                self._on_disconnected(reason)

    def _handle_message(self, _client: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        self._on_message(msg)

    def _handle_subscribe(
        self,
        _client: mqtt.Client,
        _ud: Any,
        _mid: int,
        codes: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        for (topic, _qos), rc in zip(self.settings.subscriptions, codes, strict=False):
            if rc.is_failure:
                msg = f"{topic}: {rc.getName()}"
                self.stats.refused_subscriptions.append(msg)
                log.error("%s: subscription refused: %s", self.name, msg)
        self._subscribed.set()

    def _handle_publish(
        self, _client: mqtt.Client, _ud: Any, mid: int, rc: ReasonCode, _props: Properties | None
    ) -> None:
        if self._on_puback is not None:
            self._on_puback(mid, int(rc.value))

    def _connect_properties(self) -> Properties | None:
        if self._protocol != "5":
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        return props

    def _run(self) -> None:
        s = self.settings
        delay = s.reconnect_min_s
        client: mqtt.Client | None = None
        client_protocol = ""
        while not self._stop.is_set():
            self.stats.connect_attempts += 1
            # One client object across reconnects: paho re-sends QoS 1 messages that were in
            # flight when the connection died. A new one only when the protocol changes.
            if client is None or client_protocol != self._protocol:
                client = self._make_client()
                client_protocol = self._protocol
            self._client = client
            try:
                if self._protocol == "5":
                    client.connect(
                        s.host,
                        s.port,
                        s.keepalive_s,
                        clean_start=s.clean_start,
                        properties=self._connect_properties(),
                    )
                else:
                    client.connect(s.host, s.port, s.keepalive_s)
            except ssl.SSLError as exc:
                self._fail(f"TLS error: {exc.reason or exc}")
            except OSError as exc:
                self._fail(f"{type(exc).__name__}: {exc.strerror or exc}")
            else:
                if self._serve(client):
                    delay = s.reconnect_min_s
            if self._stop.is_set():
                break
            wait = delay * (0.5 + random.random() / 2)
            self._idle(wait)
            delay = min(delay * 2, s.reconnect_max_s)
        self._connected.clear()

    def _idle(self, wait_s: float) -> None:
        """Wait before reconnecting, still running the owner's tick."""
        end = time.monotonic() + wait_s
        while not self._stop.is_set() and time.monotonic() < end:
            self._run_tick()
            self._stop.wait(min(0.1, max(0.0, end - time.monotonic())))

    def _run_tick(self) -> None:
        if self._tick is None:
            return
        try:
            self._tick()
        except Exception:
            log.exception("%s: periodic work failed", self.name)

    def _serve(self, client: mqtt.Client) -> bool:
        """Run the network loop until the connection ends; True if it was accepted."""
        was_connected = False
        handshake_deadline = time.monotonic() + max(10.0, float(self.settings.keepalive_s))
        next_tick = 0.0
        while not self._stop.is_set():
            try:
                rc = client.loop(timeout=0.05)
            except (ssl.SSLError, OSError) as exc:
                self._fail(f"{type(exc).__name__}: {exc}")
                break
            if rc != mqtt.MQTT_ERR_SUCCESS:
                if (
                    not was_connected
                    and not self._connected.is_set()
                    and self.stats.last_error_unix < (time.time() - 1.0)
                ):
                    self._fail(f"connection closed before CONNACK: {mqtt.error_string(rc)}")
                break
            if not self._connected.is_set() and time.monotonic() > handshake_deadline:
                self._fail("no CONNACK from the broker in time")
                break
            was_connected = was_connected or self._connected.is_set()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + 0.1
                self._run_tick()
        if self._stop.is_set():
            # DISCONNECT goes out behind whatever is still queued; paho closes the socket
            # once it is written (a clean DISCONNECT: the broker drops the Will)
            try:
                client.disconnect()
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                        break
            except (OSError, ValueError):
                pass
        self._connected.clear()
        return was_connected
