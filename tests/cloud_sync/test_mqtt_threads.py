"""MqttLink over TLS with publishers on other threads while it reads: one connection, no loss.

paho in manual-loop mode writes a publish() to the socket from the calling thread; with the
link's own thread reading the same TLS connection, OpenSSL's state breaks and the broker
sees the connection die ("Unspecified error" on our side). The link leaves every write to
its own thread; this test floods it both ways at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cloud_sync.mqtt import MqttLink
from tests.cloud_sync.conftest import Broker
from tests.cloud_sync.helpers import fleet_settings

IN_TOPIC = "lineinspect/v1/dev/stress/in"
OUT_TOPIC = "lineinspect/v1/dev/stress/out"
PUBLISHERS, PER_PUBLISHER, INBOUND = 4, 3000, 12000
PAD = b"x" * 2048


STALL_S = 45.0


def _wait_for_progress(
    progress: Callable[[], object], done: Callable[[], bool], state: Callable[[], str]
) -> None:
    last, moved = progress(), time.monotonic()
    while not done():
        time.sleep(0.05)
        now = progress()
        if now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            raise AssertionError(f"no progress for {STALL_S:.0f} s: {state()}")


def _state(
    got_in: list[bytes],
    got_out: list[bytes],
    threads: list[threading.Thread],
    link: MqttLink,
    flood: MqttLink,
    broker: Broker,
) -> str:
    def paho(x: MqttLink) -> str:
        c = x._client
        if c is None:
            return "no client"
        return (
            f"out_packets={len(c._out_packet)} inflight={c._inflight_messages} "
            f"out_messages={len(c._out_messages)} in_messages={len(c._in_messages)}"
        )

    log = broker.root / "mosquitto.log"
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no broker log)"
    return (
        f"inbound {len(got_in)}/{INBOUND}, outbound {len(got_out)}/{PUBLISHERS * PER_PUBLISHER}, "
        f"publishers alive {sum(t.is_alive() for t in threads)}; link {link.stats} [{paho(link)}]; "
        f"flood {flood.stats} [{paho(flood)}]; broker log:\n{tail}"
    )


@pytest.mark.slow
def test_publishes_from_other_threads_while_reading_keep_the_tls_connection(
    broker: Broker, tmp_path: Path
) -> None:
    got_in: list[bytes] = []
    got_out: list[bytes] = []
    lock = threading.Lock()

    def on_in(m: mqtt.MQTTMessage) -> None:
        with lock:
            got_in.append(bytes(m.payload))

    def on_out(m: mqtt.MQTTMessage) -> None:
        with lock:
            got_out.append(bytes(m.payload))

    link = MqttLink(
        replace(fleet_settings(broker, "stress-link"), subscriptions=((IN_TOPIC, 1),)),
        on_in,
        name="stress-link",
    )
    flood = MqttLink(
        replace(fleet_settings(broker, "stress-flood"), subscriptions=((OUT_TOPIC, 1),)),
        on_out,
        name="stress-flood",
    )
    link.start()
    flood.start()
    try:
        assert link.wait_connected(20)
        assert flood.wait_connected(20)
        # a message published before the broker has the link's subscription reaches nobody
        # (PUBACK "no matching subscribers"): both subscriptions first
        assert link.wait_subscribed(20)
        assert flood.wait_subscribed(20)
        assert link.stats.refused_subscriptions == flood.stats.refused_subscriptions == []

        def inbound() -> None:  # the link's thread reads these while others write
            for i in range(INBOUND):
                while flood.publish(IN_TOPIC, b"in-%d" % i + PAD, qos=1) is None:
                    threading.Event().wait(0.01)

        def outbound(k: int) -> None:
            for i in range(PER_PUBLISHER):
                while link.publish(OUT_TOPIC, b"out-%d-%d" % (k, i) + PAD, qos=1) is None:
                    threading.Event().wait(0.01)

        threads = [threading.Thread(target=inbound)] + [
            threading.Thread(target=outbound, args=(k,)) for k in range(PUBLISHERS)
        ]
        for t in threads:
            t.start()
        # a loaded machine is slow, not stuck: fail only when nothing moves for STALL_S
        _wait_for_progress(
            lambda: (len(got_in), len(got_out)),
            lambda: (
                len(got_in) >= INBOUND
                and len(got_out) >= PUBLISHERS * PER_PUBLISHER
                and not any(t.is_alive() for t in threads)
            ),
            lambda: _state(got_in, got_out, threads, link, flood, broker),
        )
        assert link.stats.disconnects == 0, link.stats.last_error
        assert flood.stats.disconnects == 0, flood.stats.last_error
        assert link.stats.connects == 1
        assert len(set(got_out)) == PUBLISHERS * PER_PUBLISHER
        assert len(set(got_in)) == INBOUND
    finally:
        link.stop()
        flood.stop()
