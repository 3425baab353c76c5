"""Signed model updates end to end: real Mosquitto, real packages, real ONNX Runtime."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_sync.fleet import RolloutResult
from cloud_sync.slots import SlotStore, slot_name_for
from cloud_sync.topics import ReleaseManifest, RolloutSettings
from cloud_sync.updates import sign_release
from edge.types import VerdictCode
from models.package import load_package
from models.signing import load_public_key
from tests.cloud_sync.conftest import HEALTH_FAST, Rig, active, sha256, wait_until
from tests.cloud_sync.helpers import (
    add_verdicts,
    stop_process,
    uplink_config,
)


@pytest.mark.slow
def test_staged_rollout_happy_path_with_canary(rig: Rig) -> None:
    for d in ("dev-1", "dev-2", "dev-3"):
        rig.add_agent(d, **HEALTH_FAST)
    rel = rig.release("1.1.0", rollout=RolloutSettings(canary_share=0.3, stage_timeout_s=60))
    res = rig.rollout.rollout(rel, discover_s=1.0)
    assert res.status == "completed", res.to_json()
    assert [s["stage"] for s in res.stages] == ["canary", "rest"]
    assert [s["devices"] for s in res.stages] == [1, 2]
    assert all(s["done"] == s["devices"] for s in res.stages)
    for a in rig.agents.values():
        assert active(a) == "1.1.0"
        ptr = a.updates.slots.read()  # type: ignore[union-attr]
        assert ptr.previous is not None
        assert ptr.version_of(ptr.previous) == "1.0.0"
        assert ptr.watch is None
    assert sorted(d for d, _ in rig.activated) == ["dev-1", "dev-2", "dev-3"]
    ledger = rig.releases.ledger(rel.manifest.release_id)
    assert [row[2] for row in ledger] == ["done"] * 3
    # the same retained release at the next connect changes nothing
    a = rig.agents["dev-1"]
    a.link.stop()
    a.link.start()
    assert a.link.wait_connected(10)
    assert active(a) == "1.1.0"


def test_bad_signature_is_refused(rig: Rig) -> None:
    a = rig.add_agent("dev-s")
    other = Ed25519PrivateKey.generate()
    rel = rig.release("1.1.0", key=other)
    rig.rollout._assign(rel, "dev-s")
    phase, msg = rig.final("dev-s", rel.manifest.release_id)
    assert phase == "refused"
    assert "signature does not verify" in msg
    assert active(a) == "1.0.0"
    assert rig.chunks.served == 0  # nothing was downloaded


def test_older_version_refused_unless_signed_rollback(rig: Rig) -> None:
    a = rig.add_agent("dev-o", **HEALTH_FAST)
    rel = rig.release("0.9.0")
    rig.rollout._assign(rel, "dev-o")
    phase, msg = rig.final("dev-o", rel.manifest.release_id)
    assert phase == "refused"
    assert "not newer" in msg
    rb = rig.release("0.9.0", rollback=True)
    rig.rollout._assign(rb, "dev-o")
    phase, msg = rig.final("dev-o", rb.manifest.release_id)
    assert phase in ("watching", "done"), msg
    assert active(a) == "0.9.0"


def test_wrong_sha256_is_refused_before_staging(rig: Rig) -> None:
    a = rig.add_agent("dev-h")
    good = rig.release("1.1.0")
    m = good.manifest.model_copy(update={"sha256": "0" * 64, "release_id": "wrong-sha"})
    bad = sign_release(ReleaseManifest.model_validate(m.model_dump()), rig.pk.key)
    rig.releases.add(bad, rig.pk.v["1.1.0"])
    rig.rollout._assign(bad, "dev-h")
    phase, msg = rig.final("dev-h", "wrong-sha")
    assert phase == "failed"
    assert "sha256" in msg
    ptr = a.updates.slots.read()  # type: ignore[union-attr]
    assert ptr.staged is None
    assert active(a) == "1.0.0"
    assert not list(a.updates.slots.incoming.glob("*.part"))  # type: ignore[union-attr]


def test_tampered_chunk_is_rejected_and_fetched_again(rig: Rig) -> None:
    tampered: list[int] = []

    def corrupt(_dev: str, _rid: str, idx: int, data: bytes) -> bytes:
        if idx == 2 and not tampered:
            tampered.append(idx)
            return bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    rig.chunks.chunk_filter = corrupt
    a = rig.add_agent("dev-t", **HEALTH_FAST)
    rel = rig.release("1.1.0")
    rig.rollout._assign(rel, "dev-t")
    phase, msg = rig.final("dev-t", rel.manifest.release_id)
    assert phase in ("watching", "done"), msg
    assert tampered == [2]
    assert a.updates.counters["rejected_chunks"] == 1  # type: ignore[union-attr]
    assert active(a) == "1.1.0"


def test_package_failing_validation_keeps_the_old_model(rig: Rig) -> None:
    a = rig.add_agent("dev-v")
    rel = rig.release("1.2.0-bad")
    rig.rollout._assign(rel, "dev-v")
    phase, msg = rig.final("dev-v", rel.manifest.release_id)
    assert phase == "failed"
    assert "validation failed" in msg
    assert "manifest expects" in msg
    assert active(a) == "1.0.0"
    assert a.updates.slots.read().staged is None  # type: ignore[union-attr]
    assert rig.activated == []


def test_canary_failure_pauses_the_rollout(rig: Rig) -> None:
    for d in ("dev-p1", "dev-p2", "dev-p3"):
        rig.add_agent(d)
    rel = rig.release(
        "1.2.0-bad",
        rollout=RolloutSettings(canary_share=0.3, failure_threshold=0.0, stage_timeout_s=60),
    )
    res = rig.rollout.rollout(rel, discover_s=1.0)
    assert res.status == "paused"
    assert len(res.stages) == 1
    assert res.stages[0]["failed"] == 1
    assert rig.releases.status(rel.manifest.release_id) == "paused"
    # the rest were never offered the release
    assert [r[0] for r in rig.releases.ledger(rel.manifest.release_id)] == ["dev-p1"]
    assert all(active(a) == "1.0.0" for a in rig.agents.values())


@pytest.mark.slow
def test_health_degradation_rolls_back(rig: Rig) -> None:
    a = rig.add_agent("dev-r", health={"window_s": 60.0, "min_verdicts": 10})
    store = rig.stores["dev-r"]
    add_verdicts(store, 30, latency_ms=5.0, model_version="1.0.0")
    wait_until(lambda: a.outbox.feed_cursor() == 30, 30, "baseline verdicts")
    rel = rig.release("1.1.0")
    rig.rollout._assign(rel, "dev-r")
    phase, msg = rig.final("dev-r", rel.manifest.release_id)
    assert phase == "watching", msg
    assert active(a) == "1.1.0"
    add_verdicts(store, 12, VerdictCode.ERROR, model_version="1.1.0")
    wait_until(lambda: rig.status("dev-r") == "rolled_back", 20, "rollback")
    assert "ERROR share" in rig.rollout.status["dev-r"].message
    assert active(a) == "1.0.0"
    ptr = a.updates.slots.read()  # type: ignore[union-attr]
    assert ptr.version_of(ptr.rejected) == "1.1.0"
    assert [v.name for _, v in rig.activated] == ["1.1.0", "1.0.0"]  # swapped back


@pytest.mark.slow
def test_broker_killed_mid_transfer_resumes_by_chunk_index(rig: Rig) -> None:
    killed: list[int] = []
    served_after: list[int] = []

    def kill_broker(_dev: str, _rid: str, idx: int, data: bytes) -> bytes:
        if idx == 4 and not killed:
            killed.append(idx)
            threading.Thread(target=rig.broker.kill).start()
        elif killed:
            served_after.append(idx)
        return data

    rig.chunks.chunk_filter = kill_broker
    a = rig.add_agent("dev-b", **HEALTH_FAST)
    rel = rig.release("1.1.0", chunk_size=1024)
    n = rel.manifest.chunk_count
    assert n >= 10
    rig.rollout._assign(rel, "dev-b")
    wait_until(lambda: bool(killed), 20, "the kill")
    wait_until(lambda: not a.link.connected, 30, "disconnect")
    assert a.updates is not None
    held = {i for i, h in enumerate(a.updates._have) if h}
    assert 0 < len(held) < n
    served_after.clear()
    rig.broker.start()
    phase, msg = rig.final("dev-b", rel.manifest.release_id, 40)
    assert phase in ("watching", "done"), msg
    assert active(a) == "1.1.0"
    # resumed by chunk index: nothing held before the outage was fetched again
    assert served_after
    assert not held & set(served_after)


@pytest.mark.slow
def test_rollout_started_while_the_broker_is_down_still_reaches_every_device(rig: Rig) -> None:
    """An assignment the link could not take is sent again once it reconnects."""
    for d in ("dev-x", "dev-y"):
        rig.add_agent(d, **HEALTH_FAST)
    rel = rig.release("1.1.0", rollout=RolloutSettings(canary_share=0.5, stage_timeout_s=60))
    rig.broker.kill()
    wait_until(lambda: not rig.rollout.link.connected, 20, "the controller's disconnect")
    out: list[RolloutResult] = []
    t = threading.Thread(
        target=lambda: out.append(rig.rollout.rollout(rel, devices=["dev-x", "dev-y"]))
    )
    t.start()
    time.sleep(1.0)  # the canary assignment finds no connection
    rig.broker.start()
    t.join(90)
    assert out, "rollout did not return"
    res = out[0]
    assert res.status == "completed", res.to_json()
    assert [s["done"] for s in res.stages] == [1, 1]
    for a in rig.agents.values():
        assert active(a) == "1.1.0"


def _agent_yaml(rig: Rig, device: str) -> Path:
    cfg = uplink_config(
        rig.broker,
        rig.tmp,
        device,
        updates={
            "trusted_keys": [rig.pk.pub],
            "chunk_timeout_s": 2.0,
            "health": {"window_s": 1.0, "min_verdicts": 10},
        },
    )
    SlotStore(cfg.updates.slots_dir).install(
        rig.pk.v["1.0.0"],
        slot_name_for("toy-brightness", "1.0.0", sha256(rig.pk.v["1.0.0"])),
        "1.0.0",
    )
    data = {
        "station": {"device_id": device},
        "store": {"path": str(rig.tmp / "store")},
        "uplink": json.loads(cfg.model_dump_json()),
    }
    path = rig.tmp / f"{device}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "point",
    ["update.before_stage", "update.after_validate", "update.before_swap", "update.after_pointer"],
)
def test_agent_killed_during_update_leaves_a_consistent_slot(rig: Rig, point: str) -> None:
    device = "dev-" + point.split(".")[1].replace("_", "")
    config = _agent_yaml(rig, device)
    slots_dir = rig.tmp / f"{device}-slots"
    rel = rig.release("1.1.0")
    env = {**os.environ, "LINEINSPECT_FAILPOINTS": point}
    cmd = [sys.executable, "-m", "edge.cli", "agent", "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        rig.rollout._assign(rel, device)
        rc = proc.wait(60)
        assert rc == -signal.SIGKILL, proc.stderr.read().decode()[-2000:] if proc.stderr else rc
        # consistent: the pointer names complete, verifiable packages only
        ptr = SlotStore(slots_dir).read()
        assert ptr.active is not None
        keys = [load_public_key(rig.pk.pub)]
        for slot in (ptr.active, ptr.staged, ptr.previous):
            if slot is not None:
                with load_package(slots_dir / "packages" / slot / "package.tar", keys) as p:
                    assert p.manifest.version == ptr.version_of(slot)
        expected = "1.1.0" if point == "update.after_pointer" else "1.0.0"
        assert ptr.version_of(ptr.active) == expected
        # restarted, the agent finishes the update where it stopped
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _phase, _msg = rig.final(device, rel.manifest.release_id, 60)
        wait_until(lambda: rig.status(device) == "done", 30, "done")
        assert SlotStore(slots_dir).read().version_of(SlotStore(slots_dir).read().active) == (
            "1.1.0"
        )
    finally:
        stop_process(proc)


def test_activation_callback_failure_keeps_old_model(rig: Rig) -> None:
    a = rig.add_agent("dev-x", activate_fails=True)
    rel = rig.release("1.1.0")
    rig.rollout._assign(rel, "dev-x")
    phase, msg = rig.final("dev-x", rel.manifest.release_id)
    assert phase == "failed"
    assert "swap refused" in msg
    assert active(a) == "1.0.0"


def test_cancel_stops_a_download_and_keeps_the_old_model(rig: Rig) -> None:
    rig.chunks.stop()  # nobody serves chunks: the download cannot finish
    a = rig.add_agent("dev-c")
    rel = rig.release("1.1.0")
    rig.rollout._assign(rel, "dev-c")
    wait_until(lambda: rig.status("dev-c") == "downloading", 15, "downloading")
    assert list(a.updates.slots.incoming.glob("*.part"))  # type: ignore[union-attr]
    assert rig.rollout.cancel(rel.manifest.release_id, ["dev-c"]) == 1
    phase, msg = rig.final("dev-c", rel.manifest.release_id)
    assert phase == "cancelled"
    assert "cancelled by the fleet" in msg
    assert rig.releases.status(rel.manifest.release_id) == "cancelled"
    assert active(a) == "1.0.0"
    assert not list(a.updates.slots.incoming.glob("*.part"))  # type: ignore[union-attr]
    # the retained cancel is harmless at the next connect
    a.link.stop()
    a.link.start()
    assert a.link.wait_connected(10)
    assert active(a) == "1.0.0"


@pytest.mark.slow
def test_agent_killed_mid_download_resumes_by_chunk_index(rig: Rig) -> None:
    device = "dev-resume"
    config = _agent_yaml(rig, device)
    slots_dir = rig.tmp / f"{device}-slots"
    rel = rig.release("1.1.0", chunk_size=1024)
    n = rel.manifest.chunk_count
    env = {**os.environ, "LINEINSPECT_FAILPOINTS": "update.after_chunks_6"}
    cmd = [sys.executable, "-m", "edge.cli", "agent", "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        rig.rollout._assign(rel, device)
        assert proc.wait(60) == -signal.SIGKILL
        have = (slots_dir / "incoming" / f"{rel.manifest.release_id}.have").read_bytes()
        assert sum(have) == 6
        served_before = rig.chunks.served
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        phase, msg = rig.final(device, rel.manifest.release_id, 60)
        assert phase in ("watching", "done"), msg
        # at most the missing chunks were fetched after the restart (chunks in flight at the
        # kill may still arrive from the broker's persistent session instead)
        assert rig.chunks.served - served_before <= n - 6
        ptr = SlotStore(slots_dir).read()
        assert ptr.version_of(ptr.active) == "1.1.0"
    finally:
        stop_process(proc)
