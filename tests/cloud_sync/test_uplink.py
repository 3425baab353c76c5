"""Agent <-> real Mosquitto (mutual TLS + the shipped ACL file) <-> ingest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from cloud_sync.agent import Agent
from cloud_sync.ingest import IngestDB
from cloud_sync.topics import Topics
from edge.types import VerdictCode
from tests.cloud_sync.conftest import Broker, wait_until
from tests.cloud_sync.helpers import (
    add_verdicts,
    make_store,
    start_ingest,
    stop_process,
    uplink_config,
)


def raw_client(
    broker: Broker, cn: str, messages: list[mqtt.MQTTMessage] | None = None
) -> mqtt.Client:
    cert, key = broker.pki.issue(cn)
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"raw-{cn}",
        protocol=mqtt.MQTTv5,
    )
    c.tls_set(ca_certs=str(broker.pki.ca_file), certfile=str(cert), keyfile=str(key))
    if messages is not None:
        c.on_message = lambda _c, _u, m: messages.append(m)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    wait_until(c.is_connected, 30, f"{cn} to connect")
    return c


@pytest.mark.slow
def test_broker_restart_mid_stream_every_verdict_exactly_once(
    broker: Broker, tmp_path: Path
) -> None:
    store = make_store(tmp_path / "store")
    ingest = start_ingest(broker, tmp_path / "ingest.sqlite")
    agent = Agent(uplink_config(broker, tmp_path, "dev-a"), "dev-a", source=store)
    agent.start()
    try:
        assert agent.link.wait_connected(10), agent.link.stats.last_error
        add_verdicts(store, 100)
        add_verdicts(store, 20, VerdictCode.NG)
        wait_until(lambda: ingest.db.verdict_count("dev-a") >= 60, what="first records")
        broker.stop()
        wait_until(lambda: not agent.link.connected, 30, "agent to notice")
        add_verdicts(store, 100)  # produced while the broker is down
        add_verdicts(store, 10, VerdictCode.ERROR)
        time.sleep(1.0)
        assert agent.link.stats.last_error  # the failed reconnects say why
        broker.start()
        add_verdicts(store, 70)
        wait_until(lambda: ingest.db.verdict_count("dev-a") == 300, 40, "all 300 records")
        wait_until(lambda: agent.outbox.depth() == 0, 20, "outbox to drain")
        assert ingest.db.seqs("dev-a") == list(range(1, 301))
        store_ids = [
            r[0]
            for r in ingest.db.query(
                "SELECT store_id FROM verdicts WHERE device='dev-a' ORDER BY seq"
            )
        ]
        assert store_ids == list(range(1, 301))
        codes = dict(ingest.db.query("SELECT code, COUNT(*) FROM verdicts GROUP BY code"))
        assert codes == {"OK": 270, "NG": 20, "ERROR": 10}
        # what was queued while the broker was down arrives marked historical
        hist = ingest.db.query(
            "SELECT COUNT(*) FROM verdicts WHERE historical=1 AND store_id BETWEEN 121 AND 230"
        )[0][0]
        assert hist == 110
        live = ingest.db.query(
            "SELECT COUNT(*) FROM verdicts WHERE historical=0 AND store_id <= 60"
        )[0][0]
        assert live >= 50
    finally:
        agent.stop()
        ingest.stop()
        store.stop()


def test_device_cannot_touch_another_devices_topics(broker: Broker, tmp_path: Path) -> None:
    ingest = start_ingest(broker, tmp_path / "ingest.sqlite")
    got: list[mqtt.MQTTMessage] = []
    c = raw_client(broker, "dev-a", got)
    sub_codes: list[int] = []
    pub_codes: list[int] = []
    c.on_subscribe = lambda _c, _u, _m, codes, _p: sub_codes.extend(int(x.value) for x in codes)
    c.on_publish = lambda _c, _u, _m, rc, _p: pub_codes.append(int(rc.value))
    try:
        b = Topics("lineinspect/v1", "dev-b")
        a = Topics("lineinspect/v1", "dev-a")
        c.subscribe([(b.logs_ack, 1), (b.release, 1), (a.release, 1)])
        wait_until(lambda: len(sub_codes) == 3, what="SUBACK")
        # Mosquitto grants the filter, but its ACL never delivers another device's messages
        fleet = raw_client(broker, "fleet")
        fleet.publish(b.release, b"for b", qos=1, retain=True)
        fleet.publish(b.logs_ack, b"for b", qos=1)
        fleet.publish(a.release, b"for a", qos=1, retain=True)
        wait_until(lambda: any(m.topic == a.release for m in got), what="own message")
        time.sleep(0.5)
        assert [m.topic for m in got] == [a.release]
        fleet.loop_stop()
        fleet.disconnect()
        batch = {
            "v": 1,
            "device": "dev-b",
            "first_seq": 1,
            "last_seq": 1,
            "sent_unix": 0,
            "records": [
                {
                    "seq": 1,
                    "inspection_id": 1,
                    "code": "OK",
                    "score": 0.1,
                    "threshold": 1,
                    "decided_unix": 0,
                }
            ],
        }
        c.publish(b.logs, json.dumps(batch), qos=1)
        c.publish(b.state, b'{"v":1,"device":"dev-b","online":true}', qos=1, retain=True)
        wait_until(lambda: len(pub_codes) == 2, what="PUBACK")
        assert pub_codes == [0x87, 0x87]
        time.sleep(0.5)
        assert ingest.db.verdict_count("dev-b") == 0
        assert all(r.device != "dev-b" for r in ingest.db.devices())
    finally:
        c.loop_stop()
        c.disconnect()
        ingest.stop()


def test_bad_password_is_reported_with_its_reason(broker: Broker, tmp_path: Path) -> None:
    from edge.config_base import SecretRef

    broker.add_password("dev-p", "right-password")
    broker.stop()
    broker.start()
    os.environ["LI_TEST_MQTT_PW"] = "wrong-password"
    cfg = uplink_config(broker, tmp_path, "dev-p")
    from cloud_sync.config import TlsConfig

    cfg = cfg.model_copy(
        update={
            "port": broker.pw_port,
            "password": SecretRef(env="LI_TEST_MQTT_PW"),
            "tls": TlsConfig(enabled=True, ca_file=broker.pki.ca_file),
        }
    )
    agent = Agent(cfg, "dev-p")
    agent.start()
    try:
        wait_until(lambda: "refused" in agent.link.stats.last_error, 30, "a refusal")
        err = agent.link.stats.last_error
        assert "Bad user name or password" in err or "Not authorized" in err, err
        assert not agent.link.connected
    finally:
        agent.stop()
    os.environ["LI_TEST_MQTT_PW"] = "right-password"
    agent = Agent(
        cfg.model_copy(
            update={"outbox": cfg.outbox.model_copy(update={"path": tmp_path / "o2.sqlite"})}
        ),
        "dev-p",
    )
    agent.start()
    try:
        assert agent.link.wait_connected(10), agent.link.stats.last_error
    finally:
        agent.stop()


def test_tls_with_an_unknown_ca_fails_with_a_tls_reason(broker: Broker, tmp_path: Path) -> None:
    from tests.cloud_sync.conftest import Pki

    other = Pki(tmp_path / "other-pki")
    cfg = uplink_config(broker, tmp_path, "dev-t")
    cfg = cfg.model_copy(update={"tls": cfg.tls.model_copy(update={"ca_file": other.ca_file})})
    agent = Agent(cfg, "dev-t")
    agent.start()
    try:
        wait_until(lambda: bool(agent.link.stats.last_error), 30, "an error")
        assert "TLS" in agent.link.stats.last_error or "SSL" in agent.link.stats.last_error
        assert "CERTIFICATE_VERIFY_FAILED" in agent.link.stats.last_error.upper().replace(" ", "_")
    finally:
        agent.stop()


def test_malformed_and_oversized_messages_are_rejected_and_counted(
    broker: Broker, tmp_path: Path
) -> None:
    store = make_store(tmp_path / "store")
    ingest = start_ingest(broker, tmp_path / "ingest.sqlite")
    cfg = uplink_config(broker, tmp_path, "dev-m", max_incoming_bytes=4096)
    agent = Agent(cfg, "dev-m", source=store)
    agent.start()
    fleet = raw_client(broker, "fleet")
    try:
        assert agent.link.wait_connected(10)
        t = agent.topics
        fleet.publish(t.logs_ack, b"not json", qos=1)
        fleet.publish(t.logs_ack, b'{"v":1,"first_seq":"x","last_seq":2}', qos=1)
        fleet.publish(t.release, b'{"v":1,"action":"explode","release_id":"x"}', qos=1)
        fleet.publish(t.chunk, b"LIC1" + b"\0" * 10, qos=1)
        fleet.publish(t.chunk, b"x" * 5000, qos=1)
        fleet.publish(t.release, b"{" * 5000, qos=1)
        wait_until(lambda: agent.rejected_messages == 6, 30, "six rejections")
        fleet.publish(t.release, b"", qos=1, retain=True)  # clears nothing, not an error
        # the agent still works
        add_verdicts(store, 5)
        wait_until(lambda: ingest.db.verdict_count("dev-m") == 5, 15, "records after junk")
        # ingest rejects junk too, and keeps going
        fleet.publish(t.logs, b"[]", qos=1)
        fleet.publish(t.telemetry, b"\xff\xfe", qos=1)
        wait_until(lambda: ingest.counters.rejected >= 2, 30, "ingest rejections")

        def latest() -> dict[str, Any]:
            rows = ingest.db.query("SELECT body FROM telemetry ORDER BY time_unix DESC LIMIT 1")
            return json.loads(rows[0][0]) if rows else {}

        wait_until(lambda: latest().get("counts_total", {}).get("ok") == 5, 30, "telemetry")
        tele = latest()
        assert tele["rejected_messages"] == 6
        assert tele["counts_total"]["ok"] == 5
        assert tele["outbox_depth"] >= 0
        assert tele["disk_free_mb"] > 0
    finally:
        fleet.loop_stop()
        fleet.disconnect()
        agent.stop()
        ingest.stop()
        store.stop()


def _agent_yaml(broker: Broker, tmp_path: Path, device: str) -> Path:
    cfg = uplink_config(
        broker, tmp_path, device, outbox={"batch_size": 20, "max_inflight_batches": 2}
    )
    data = {
        "station": {"device_id": device},
        "store": {"path": str(tmp_path / "store")},
        "uplink": json.loads(cfg.model_dump_json()),
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _spawn_agent(config: Path, env_extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The agent CLI in its own process; its log goes to ``agent.log`` beside the config.

    Not to a pipe: nobody reads it while the agent runs, and an agent blocked on a full
    pipe cannot stop cleanly (the broker then publishes its Will instead of its own
    "agent stopped").
    """
    env = {**os.environ, **(env_extra or {})}
    with (config.parent / "agent.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "agent", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


@pytest.mark.slow
def test_agent_sigkill_mid_backlog_loses_nothing(broker: Broker, tmp_path: Path) -> None:
    store = make_store(tmp_path / "store")
    add_verdicts(store, 1500)
    add_verdicts(store, 100, VerdictCode.NG)
    config = _agent_yaml(broker, tmp_path, "dev-k")
    states: list[mqtt.MQTTMessage] = []
    watcher = raw_client(broker, "fleet", states)
    watcher.subscribe(Topics("lineinspect/v1", "dev-k").state, qos=1)
    ingest = start_ingest(broker, tmp_path / "ingest.sqlite")
    proc = _spawn_agent(config)
    try:
        wait_until(lambda: ingest.db.verdict_count("dev-k") >= 100, 30, "some records")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        got = ingest.db.verdict_count("dev-k")
        assert got < 1600, "the backlog was already drained: the kill came too late"
        # the broker published the Will: retained offline state
        wait_until(
            lambda: any(not json.loads(m.payload)["online"] for m in states), 30, "offline Will"
        )
        add_verdicts(store, 50)  # the line kept running
        proc = _spawn_agent(config)
        wait_until(lambda: ingest.db.verdict_count("dev-k") == 1650, 60, "all 1650 records")
        assert ingest.db.seqs("dev-k") == list(range(1, 1651))
        ids = [r[0] for r in ingest.db.query("SELECT store_id FROM verdicts ORDER BY seq")]
        assert ids == list(range(1, 1651))
        wait_until(lambda: json.loads(states[-1].payload)["online"], 30, "online again")
        # a clean stop publishes offline itself (watched before the watcher goes away)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        wait_until(lambda: not json.loads(states[-1].payload)["online"], 30, "offline on stop")
        log = (config.parent / "agent.log").read_text(errors="replace")
        reasons = [json.loads(m.payload).get("reason") for m in states]
        assert json.loads(states[-1].payload)["reason"] == "agent stopped", (reasons, log[-4000:])
    finally:
        stop_process(proc)
        watcher.loop_stop()
        watcher.disconnect()
        ingest.stop()
        store.stop()


def test_ingest_workers_share_the_load_without_duplicates(broker: Broker, tmp_path: Path) -> None:
    store = make_store(tmp_path / "store")
    db_path = tmp_path / "ingest.sqlite"
    w1 = start_ingest(broker, db_path, "ingest-1")
    w2 = start_ingest(broker, db_path, "ingest-2")
    cfg = uplink_config(broker, tmp_path, "dev-s", outbox={"batch_size": 10})
    agent = Agent(cfg, "dev-s", source=store)
    agent.start()
    try:
        add_verdicts(store, 400)
        db = IngestDB(str(db_path))
        wait_until(lambda: db.verdict_count("dev-s") == 400, 30, "400 records")
        assert w1.counters.batches > 0
        assert w2.counters.batches > 0
        assert w1.counters.batches + w2.counters.batches >= 40
        assert db.seqs("dev-s") == list(range(1, 401))
    finally:
        agent.stop()
        w1.stop()
        w2.stop()
        store.stop()


def test_stop_survives_a_connection_lost_under_the_final_publish(
    broker: Broker, tmp_path: Path
) -> None:
    """Regression: the broker vanishing between the connected check and the final
    retained publish made paho raise from is_published(), and stop() raised with it."""
    from cloud_sync.mqtt import MqttLink
    from tests.cloud_sync.helpers import fleet_settings

    link = MqttLink(fleet_settings(broker, "stopper"), lambda *_: None, name="stopper")
    link.start()
    assert link.wait_connected(10), link.stats.last_error
    broker.kill()
    # hold the race window open: the link still believes it is connected
    wait_until(lambda: not link.connected, 10, "the link to notice the lost broker")
    link._connected.set()
    started = time.monotonic()
    link.stop(final=("fleet/test/state", b"offline"), timeout_s=2.0)
    assert time.monotonic() - started < 5.0
    assert link._thread is None


def test_wait_subscribed_reports_the_brokers_answer(broker: Broker) -> None:
    """wait_subscribed returns once the SUBACK is in; a message published after it reaches
    the subscription (Mosquitto 2.0 grants a subscription its ACL forbids and then delivers
    nothing on it, so refused_subscriptions stays empty here)."""
    from dataclasses import replace

    from cloud_sync.mqtt import MqttLink
    from tests.cloud_sync.helpers import fleet_settings

    mine = "lineinspect/v1/dev/dev-a/update/release"
    theirs = "lineinspect/v1/dev/dev-b/update/release"
    cert, key = broker.pki.issue("dev-a")
    got: list[bytes] = []
    settings = replace(
        fleet_settings(broker, "dev-a"),
        cert_file=cert,
        key_file=key,
        subscriptions=((mine, 1), (theirs, 1)),
    )
    link = MqttLink(settings, lambda m: got.append(bytes(m.payload)), name="dev-a")
    fleet = MqttLink(fleet_settings(broker, "fleet-pub"), lambda *_: None, name="fleet-pub")
    link.start()
    fleet.start()
    try:
        assert fleet.wait_subscribed(10)  # nothing to subscribe: at once when connected
        assert link.wait_subscribed(10), link.stats.last_error
        assert fleet.publish(mine, b"for dev-a", qos=1) is not None
        assert fleet.publish(theirs, b"for dev-b", qos=1) is not None
        wait_until(lambda: got == [b"for dev-a"], 10, "dev-a's own message")
        time.sleep(0.3)
        assert got == [b"for dev-a"]
    finally:
        link.stop()
        fleet.stop()
