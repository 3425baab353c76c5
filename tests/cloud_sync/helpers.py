"""Builders shared by the cloud_sync tests: stores, configs, ingest, packages."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

from cloud_sync.config import OutboxConfig, TelemetryConfig, TlsConfig, UpdatesConfig, UplinkConfig
from cloud_sync.ingest import IngestDB, IngestWorker
from cloud_sync.mqtt import LinkSettings
from edge.runtime_config import StoreConfig
from edge.store import ResultStore
from edge.types import Verdict, VerdictCode


def make_store(folder: Path) -> ResultStore:
    store = ResultStore(StoreConfig(path=folder))
    store.start()
    return store


def add_verdicts(
    store: ResultStore,
    n: int,
    code: VerdictCode = VerdictCode.OK,
    latency_ms: float = 5.0,
    model_version: str = "",
) -> list[int]:
    ids = []
    for _ in range(n):
        iid = store.next_inspection_id()
        store.commit(
            Verdict(
                inspection_id=iid,
                frame_sequence=iid,
                source_id="cam0",
                trigger_id=iid,
                code=code,
                score=0.5 if code is not VerdictCode.ERROR else float("nan"),
                threshold=1.0,
                model_name="toy",
                model_version=model_version,
                timings_ms={"total": latency_ms},
                error="boom" if code is VerdictCode.ERROR else "",
            )
        )
        ids.append(iid)
    return ids


def uplink_config(broker: Any, tmp: Path, device: str, **over: Any) -> UplinkConfig:
    cert, key = broker.pki.issue(device)
    outbox = over.pop("outbox", {})
    updates = over.pop("updates", {})
    data: dict[str, Any] = {
        "enabled": True,
        "host": "127.0.0.1",
        "port": broker.port,
        "tls": TlsConfig(enabled=True, ca_file=broker.pki.ca_file, cert_file=cert, key_file=key),
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
        "keepalive_s": 5,
        "outbox": OutboxConfig(path=tmp / f"{device}-outbox.sqlite", ack_timeout_s=3.0, **outbox),
        "telemetry": TelemetryConfig(interval_s=over.pop("telemetry_s", 1.0)),
        "updates": UpdatesConfig(slots_dir=tmp / f"{device}-slots", **updates),
    }
    data.update(over)
    return UplinkConfig(**data)


def fleet_settings(broker: Any, client_id: str) -> LinkSettings:
    cert, key = broker.pki.issue("fleet")
    return LinkSettings(
        host="127.0.0.1",
        port=broker.port,
        client_id=client_id,
        protocol="5",
        tls=True,
        ca_file=broker.pki.ca_file,
        cert_file=cert,
        key_file=key,
        reconnect_min_s=0.2,
        reconnect_max_s=1.0,
        keepalive_s=5,
    )


def start_ingest(broker: Any, db_path: Path, client_id: str = "ingest-1") -> IngestWorker:
    w = IngestWorker(fleet_settings(broker, client_id), IngestDB(str(db_path)))
    w.start()
    assert w.link.wait_connected(10), w.link.stats.last_error
    assert w.link.wait_subscribed(10)
    return w


def build_package(folder: Path, version: str, key: Any, *, bad_reference: bool = False) -> Path:
    """A signed toy model package .tar (real ONNX graph and reference images)."""
    from models.package import pack_tar, refresh_package
    from models.toy_package import build_toy_package

    pkg_dir = folder / f"pkg-{version}{'-bad' if bad_reference else ''}"
    build_toy_package(pkg_dir, version=version, sign_key=key)
    if bad_reference:
        import json as _json

        manifest = _json.loads((pkg_dir / "manifest.json").read_text())
        refs = manifest["reference"]
        for r in refs:
            r["scores"] = {k: v + 0.5 for k, v in r["scores"].items()}
        refresh_package(pkg_dir, {"reference": refs}, sign_key=key)
    return pack_tar(pkg_dir, folder / f"{pkg_dir.name}.tar")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM a child still running, SIGKILL it if it has not exited after ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
