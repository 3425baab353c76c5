"""Fleet CLI, HTTP(S) package download with range requests, MQTT 3.1.1 fallback."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cloud_sync.agent import Agent
from cloud_sync.config import UplinkConfig
from cloud_sync.fleet import PackageHttpServer
from cloud_sync.ingest import IngestDB, format_status_table
from cloud_sync.mqtt import LinkSettings, MqttLink
from cloud_sync.topics import SignedRelease
from tests.cloud_sync.conftest import HEALTH_FAST, Broker, Rig, active, wait_until
from tests.cloud_sync.helpers import start_ingest, stop_process
from tests.conftest import free_tcp_port


def test_http_download_with_range_requests_resumes_after_cut_responses(rig: Rig) -> None:
    size = rig.pk.v["1.1.0"].stat().st_size
    http = PackageHttpServer(rig.releases, max_response_bytes=size // 3 + 1)
    http.start()
    try:
        a = rig.add_agent("dev-http", **HEALTH_FAST)
        rel0 = rig.release("1.1.0", chunk_size=1024)
        # same package, announced with a URL: every response is cut after a third
        from cloud_sync.fleet import make_release

        rel = make_release(
            rig.pk.v["1.1.0"],
            rig.pk.key,
            group="default",
            chunk_size=1024,
            url=http.url("http-rel"),
            release_id="http-rel",
        )
        rig.releases.add(rel, rig.pk.v["1.1.0"])
        assert rel0.manifest.sha256 == rel.manifest.sha256
        rig.rollout._assign(rel, "dev-http")
        phase, msg = rig.final("dev-http", "http-rel", 60)
        assert phase in ("watching", "done"), msg
        assert active(a) == "1.1.0"
        assert rig.chunks.served == 0  # nothing came over MQTT
        # resumed with ranges: well under re-downloading from zero each time
        assert size <= http.served_bytes < 2 * size
    finally:
        http.stop()


def _https_release(rig: Rig, http: PackageHttpServer, release_id: str) -> SignedRelease:
    from cloud_sync.fleet import make_release

    rel = make_release(
        rig.pk.v["1.1.0"],
        rig.pk.key,
        group="default",
        chunk_size=1024,
        url=http.url(release_id),
        release_id=release_id,
    )
    assert rel.manifest.url is not None
    assert rel.manifest.url.startswith("https://")
    rig.releases.add(rel, rig.pk.v["1.1.0"])
    return rel


def _https_server(
    rig: Rig, cert: Path, key: Path, client_ca: Path | None = None
) -> PackageHttpServer:
    """A started package server over TLS; with ``client_ca`` it requires client certificates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(client_ca))
    http = PackageHttpServer(rig.releases, tls=ctx)
    http.start()
    return http


def _roll_out(
    rig: Rig, http: PackageHttpServer, release_id: str, device: str, timeout_s: float
) -> tuple[str, str]:
    rel = _https_release(rig, http, release_id)
    rig.rollout._assign(rel, device)
    return rig.final(device, rel.manifest.release_id, timeout_s)


def test_https_download_with_mutual_tls(rig: Rig) -> None:
    """The package server checks the device's client certificate, the device the server's."""
    cert, key = rig.broker.pki.issue("pkg-server", server=True)
    http = _https_server(rig, cert, key, client_ca=rig.broker.pki.ca_file)
    try:
        a = rig.add_agent("dev-https", **HEALTH_FAST)
        phase, msg = _roll_out(rig, http, "https-rel", "dev-https", 60)
        assert phase in ("watching", "done"), msg
        assert active(a) == "1.1.0"
        assert rig.chunks.served == 0
        assert http.served_bytes >= rig.pk.v["1.1.0"].stat().st_size
    finally:
        http.stop()


def test_https_server_with_an_untrusted_certificate_fails_at_once(rig: Rig, tmp_path: Path) -> None:
    from tests.cloud_sync.conftest import Pki

    rogue = Pki(tmp_path / "rogue-pki")  # a CA the device does not trust
    cert, key = rogue.issue("pkg-server", server=True)
    http = _https_server(rig, cert, key)
    try:
        a = rig.add_agent("dev-rogue", **HEALTH_FAST)
        phase, msg = _roll_out(rig, http, "rogue-rel", "dev-rogue", 30)
        assert phase == "failed", msg
        assert "TLS certificate" in msg
        assert "ca_file" in msg
        assert active(a) == "1.0.0"
        assert http.served_bytes == 0
    finally:
        http.stop()


def test_auto_protocol_falls_back_to_mqtt_311() -> None:
    """A broker answering MQTT 5 CONNECTs with 'unacceptable protocol version'."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    levels: list[int] = []

    def serve() -> None:
        for _ in range(2):
            conn, _ = srv.accept()
            with conn:
                data = conn.recv(1024)
                # fixed header, remaining length (1 byte here), then "\0\4MQTT" + level
                levels.append(data[8])
                conn.sendall(b"\x20\x02\x00\x01")  # 3.1.1 CONNACK: refused, protocol version
                conn.recv(1024)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    link = MqttLink(
        LinkSettings(
            host="127.0.0.1",
            port=port,
            client_id="fb",
            protocol="auto",
            reconnect_min_s=0.1,
            reconnect_max_s=0.2,
        ),
        lambda _m: None,
    )
    link.start()
    try:
        wait_until(lambda: len(levels) >= 2, 30, "two attempts")
    finally:
        link.stop()
        srv.close()
    assert levels[:2] == [5, 4]  # MQTT 5 first, then 3.1.1
    assert link.protocol == "3.1.1"
    assert "protocol" in link.stats.last_error.lower()


def test_agent_over_mqtt_311(broker: Broker, tmp_path: Path) -> None:
    from tests.cloud_sync.helpers import add_verdicts, make_store, uplink_config

    store = make_store(tmp_path / "store")
    ingest = start_ingest(broker, tmp_path / "ingest.sqlite")
    cfg: UplinkConfig = uplink_config(broker, tmp_path, "dev-3", protocol="3.1.1")
    agent = Agent(cfg, "dev-3", source=store)
    agent.start()
    try:
        assert agent.link.wait_connected(10)
        assert agent.link.stats.protocol == "MQTT 3.1.1"
        add_verdicts(store, 25)
        wait_until(lambda: ingest.db.verdict_count("dev-3") == 25, 15, "25 records")
    finally:
        agent.stop()
        ingest.stop()
        store.stop()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )


@pytest.mark.slow
def test_fleet_cli_keygen_publish_and_status(rig: Rig) -> None:
    keys = rig.tmp / "keys"
    out = _cli("fleet", "keygen", "--out", str(keys))
    assert out.returncode == 0, out.stderr
    assert "fingerprint" in out.stdout
    again = _cli("fleet", "keygen", "--out", str(keys))
    assert again.returncode == 1
    assert "refusing" in again.stderr
    ingest = start_ingest(rig.broker, rig.tmp / "ingest.sqlite")
    a = rig.add_agent("dev-cli", **HEALTH_FAST)
    try:
        cert, key = rig.broker.pki.issue("fleet")
        broker = [
            "--port",
            str(rig.broker.port),
            "--ca",
            str(rig.broker.pki.ca_file),
            "--cert",
            str(cert),
            "--cert-key",
            str(key),
        ]
        pub = _cli(
            "fleet",
            "publish",
            str(rig.pk.v["1.1.0"]),
            "--key",
            str(rig.tmp.parent / "never.key"),
            "--group",
            "default",
            *broker,
        )
        assert pub.returncode == 1
        assert "cannot read private key" in pub.stderr
        key_file = next(rig.pk.pub.parent.glob("*.key"))
        pub = _cli(
            "fleet",
            "publish",
            str(rig.pk.v["1.1.0"]),
            "--key",
            str(key_file),
            "--group",
            "default",
            "--canary-share",
            "0.5",
            "--stage-timeout",
            "60",
            "--chunk-size",
            "4096",
            "--state-dir",
            str(rig.tmp / "cli-fleet"),
            *broker,
        )
        assert pub.returncode == 0, pub.stderr[-3000:]
        result = json.loads(pub.stdout)
        assert result["status"] == "completed"
        assert result["stages"][0]["done"] == 1
        assert active(a) == "1.1.0"
        wait_until(
            lambda: any(
                r.device == "dev-cli" and "done" in r.last_update for r in ingest.db.devices()
            ),
            15,
            "status in ingest",
        )
        st = _cli(
            "fleet",
            "status",
            "--db",
            str(rig.tmp / "ingest.sqlite"),
            "--release",
            result["release_id"],
            "--state-dir",
            str(rig.tmp / "cli-fleet"),
        )
        assert st.returncode == 0, st.stderr
        line = next(ln for ln in st.stdout.splitlines() if ln.startswith("dev-cli"))
        assert "yes" in line
        assert "1.1.0" in line
        assert "done" in line
        assert "completed" in st.stdout
    finally:
        ingest.stop()
    table = format_status_table(IngestDB(str(rig.tmp / "ingest.sqlite")).devices())
    assert table.splitlines()[0].split()[:2] == ["DEVICE", "ONLINE"]


@pytest.mark.slow
def test_agent_cli_rejects_bad_configs(tmp_path: Path) -> None:
    missing = _cli("agent", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert "nope.yaml" in missing.stderr
    off = tmp_path / "off.yaml"
    off.write_text("uplink:\n  enabled: false\n")
    res = _cli("agent", "--config", str(off))
    assert res.returncode == 2
    assert "uplink.enabled is false" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("uplink:\n  enabled: true\n  password: hunter2\n")
    res = _cli("agent", "--config", str(bad))
    assert res.returncode == 2
    assert "uplink.password" in res.stderr
    nokey = tmp_path / "nokey.yaml"
    nokey.write_text(
        f"store: {{path: {tmp_path / 's'}}}\nuplink:\n  enabled: true\n"
        f"  updates: {{trusted_keys: [{tmp_path / 'missing.pub'}]}}\n"
    )
    res = _cli("agent", "--config", str(nokey))
    assert res.returncode == 2
    assert "missing.pub" in res.stderr


@pytest.mark.slow
def test_fleet_serve_ingests_and_serves_packages_over_http(rig: Rig) -> None:
    import urllib.request

    from tests.cloud_sync.helpers import add_verdicts

    db_path = rig.tmp / "serve.sqlite"
    cert, key = rig.broker.pki.issue("fleet")
    http_port = free_tcp_port()
    rel = rig.release("1.1.0")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge.cli",
            "fleet",
            "serve",
            "--db",
            str(db_path),
            "--workers",
            "2",
            "--state-dir",
            str(rig.tmp / "fleet"),
            "--http-port",
            str(http_port),
            "--port",
            str(rig.broker.port),
            "--ca",
            str(rig.broker.pki.ca_file),
            "--cert",
            str(cert),
            "--cert-key",
            str(key),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        a = rig.add_agent("dev-serve")
        add_verdicts(rig.stores["dev-serve"], 40)
        db = IngestDB(str(db_path))
        wait_until(lambda: db.verdict_count("dev-serve") == 40, 60, "40 records via fleet serve")
        wait_until(lambda: a.outbox.depth() == 0, 30, "acks via fleet serve")
        url = f"http://127.0.0.1:{http_port}/releases/{rel.manifest.release_id}/package.tar"
        req = urllib.request.Request(url, headers={"Range": "bytes=10-19"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 206
            assert resp.read() == rig.pk.v["1.1.0"].read_bytes()[10:20]
    finally:
        stop_process(proc, 15)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
