"""MqttLink over TLS with publishers on other threads while it reads: one connection, no loss.

paho in manual-loop mode writes a publish() to the socket from the calling thread; with the
link's own thread reading the same TLS connection, OpenSSL's state breaks and the broker
sees the connection die ("Unspecified error" on our side). The link leaves every write to
its own thread; this test floods it both ways at once.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cloud_sync.mqtt import MqttLink
from tests.cloud_sync.conftest import Broker, wait_until
from tests.cloud_sync.helpers import fleet_settings

IN_TOPIC = "lineinspect/v1/dev/stress/in"
OUT_TOPIC = "lineinspect/v1/dev/stress/out"
PUBLISHERS, PER_PUBLISHER, INBOUND = 4, 3000, 12000
PAD = b"x" * 2048


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
        wait_until(lambda: flood.stats.refused_subscriptions == [], 5)

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
        for t in threads:
            t.join(180)
        wait_until(lambda: len(got_in) >= INBOUND, 60, "inbound messages")
        wait_until(lambda: len(got_out) >= PUBLISHERS * PER_PUBLISHER, 60, "outbound messages")
        assert link.stats.disconnects == 0, link.stats.last_error
        assert flood.stats.disconnects == 0, flood.stats.last_error
        assert link.stats.connects == 1
        assert len(set(got_out)) == PUBLISHERS * PER_PUBLISHER
        assert len(set(got_in)) == INBOUND
    finally:
        link.stop()
        flood.stop()
