"""Fleet benchmark: many simulated agents against one Mosquitto started here.

Phase 1 (verdict logs): every agent (the real :class:`cloud_sync.agent.Agent`
with its SQLite outbox) queues ``--records`` verdict records; ingest workers
(shared subscription) store them with dedup by (device, sequence). Reports
throughput and whether anything was lost or duplicated after dedup.

Phase 2 (model rollout): a signed release of a ``--package-mb`` package is
rolled out in stages (``--canary-share`` first, then the rest) over MQTT
chunks; each agent verifies every chunk and the whole sha256, stages the
package in its slot and activates it. Reports the rollout time. The payload
is random bytes, so ONNX validation is not part of this number.

Prints one JSON object. Example (the issue's target):

    .venv/bin/python bench/fleet.py --agents 200 --records 100 --package-mb 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(f"[fleet bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(root: Path, port: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    conf = root / "mosquitto.conf"
    user = os.environ.get("USER") or "root"
    conf.write_text(f"""
user {user}
allow_anonymous true
persistence false
max_packet_size 4194304
max_queued_messages 100000
max_inflight_messages 100
listener {port} 127.0.0.1
log_dest file {root / "mosquitto.log"}
log_type error
""")
    proc = subprocess.Popen(
        [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("mosquitto did not start")


def agent_proc(
    index: int,
    devices: list[str],
    root: str,
    port: int,
    pub_key: str,
    records: int,
    rate_hz: float,
    go: Any,
    stop: Any,
    out: Any,
) -> None:
    """One worker process running several real agents."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    from cloud_sync.agent import Agent
    from cloud_sync.config import OutboxConfig, TelemetryConfig, UpdatesConfig, UplinkConfig
    from cloud_sync.outbox import NewRecord
    from models.signing import load_public_key

    keys = [load_public_key(Path(pub_key))]
    agents: list[Agent] = []
    for d in devices:
        cfg = UplinkConfig(
            enabled=True,
            host="127.0.0.1",
            port=port,
            keepalive_s=60,
            reconnect_min_s=0.5,
            reconnect_max_s=5.0,
            outbox=OutboxConfig(
                path=Path(root) / d / "outbox.sqlite", batch_size=100, ack_timeout_s=30.0
            ),
            telemetry=TelemetryConfig(interval_s=10.0),
            updates=UpdatesConfig(
                slots_dir=Path(root) / d / "slots",
                trusted_keys=[],
                chunk_window=4,
                chunk_timeout_s=30.0,
                health={"window_s": 0.0},
            ),
        )
        a = Agent(cfg, d, trusted_keys=keys)
        a.start()
        agents.append(a)
    connected = sum(1 for a in agents if a.link.wait_connected(30))
    out.put(("ready", index, connected))
    go.wait()
    sent = 0
    per_tick = max(1, int(len(agents) * rate_hz / 10))
    n_total = records * len(agents)
    t0 = time.time()
    i = 0
    while sent < n_total:
        for _ in range(per_tick):
            if sent >= n_total:
                break
            a = agents[i % len(agents)]
            i += 1
            code = "NG" if sent % 10 == 0 else "OK"
            a.enqueue(
                [
                    NewRecord(
                        code,
                        {
                            "inspection_id": sent,
                            "code": code,
                            "score": 0.4,
                            "threshold": 1.0,
                            "decided_unix": time.time(),
                            "timings_ms": {"total": 12.5},
                            "model_version": "1.0.0",
                        },
                    )
                ]
            )
            sent += 1
        time.sleep(0.1)
    out.put(("sent", index, sent, time.time() - t0))
    stop.wait()
    for a in agents:
        a.stop()
    out.put(("stopped", index, 0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--records", type=int, default=100, help="verdict records per agent")
    ap.add_argument(
        "--rate", type=float, default=5.0, help="records per second per agent while producing"
    )
    ap.add_argument("--package-mb", type=float, default=20.0)
    ap.add_argument("--chunk-kb", type=int, default=256)
    ap.add_argument("--canary-share", type=float, default=0.1)
    ap.add_argument("--processes", type=int, default=4, help="agent worker processes")
    ap.add_argument("--ingest-workers", type=int, default=2)
    ap.add_argument("--skip-rollout", action="store_true")
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="scratch folder (default: a temporary one, removed after)",
    )
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.ERROR)
    from cloud_sync.fleet import ChunkServer, ReleaseStore, RolloutController, make_release
    from cloud_sync.ingest import IngestDB, IngestWorker
    from cloud_sync.mqtt import LinkSettings
    from cloud_sync.topics import RolloutSettings
    from models.signing import load_private_key, write_keypair

    root = args.workdir or Path(tempfile.mkdtemp(prefix="lineinspect-fleet-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    broker = start_broker(root, port)
    result: dict[str, Any] = {"agents": args.agents, "processes": args.processes}
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    go, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    parts: list[Any] = []
    try:
        kp = write_keypair(root / "keys")
        key = load_private_key(kp.private_key)

        def settings(cid: str) -> LinkSettings:
            return LinkSettings(
                host="127.0.0.1",
                port=port,
                client_id=cid,
                protocol="5",
                keepalive_s=60,
                max_inflight=1000,
            )

        db = IngestDB(str(root / "ingest.sqlite"))
        workers = [IngestWorker(settings(f"ingest-{i}"), db) for i in range(args.ingest_workers)]
        store = ReleaseStore(root / "fleet")
        chunks = ChunkServer(settings("chunks"), store)
        ctl = RolloutController(settings("rollout"), store)
        parts = [*workers, chunks, ctl]
        for p in parts:
            p.start()
        devices = [f"bench-{i:04d}" for i in range(args.agents)]
        groups = [devices[i :: args.processes] for i in range(args.processes)]
        agent_root = root / "agents"
        for i, g in enumerate(groups):
            p = ctx.Process(
                target=agent_proc,
                args=(
                    i,
                    g,
                    str(agent_root),
                    port,
                    str(kp.public_key),
                    args.records,
                    args.rate,
                    go,
                    stop,
                    out,
                ),
            )
            p.start()
            procs.append(p)
        connected = 0
        for _ in procs:
            msg = out.get(timeout=300)
            connected += msg[2]
        result["agents_connected"] = connected
        log(f"{connected} agents connected; sending verdict logs")

        # -- phase 1: verdict logs ------------------------------------------------
        t0 = time.monotonic()
        go.set()
        sent = 0
        for _ in procs:
            msg = out.get(timeout=args.timeout_s)
            sent += msg[2]
        deadline = time.monotonic() + args.timeout_s
        ingested = db.verdict_count()
        while ingested < sent and time.monotonic() < deadline:
            time.sleep(0.5)
            ingested = db.verdict_count()
        elapsed = time.monotonic() - t0
        distinct = db.query("SELECT COUNT(*) FROM (SELECT DISTINCT device, seq FROM verdicts) t")
        rows = db.verdict_count()
        result.update(
            {
                "records_sent": sent,
                "records_ingested": ingested,
                "lost": sent - int(distinct[0][0]),
                "duplicates_after_dedup": rows - int(distinct[0][0]),
                "duplicates_received_before_dedup": sum(w.counters.duplicates for w in workers),
                "logs_elapsed_s": round(elapsed, 3),
                "throughput_records_s": round(ingested / elapsed, 1) if elapsed else None,
            }
        )

        log(f"logs: {json.dumps({k: result[k] for k in ('records_sent', 'records_ingested')})}")
        # -- phase 2: staged rollout of a package -------------------------------------
        if not args.skip_rollout:
            pkg = root / "package.bin"
            with open(pkg, "wb") as f:
                left = int(args.package_mb * 1_000_000)
                while left > 0:
                    n = min(left, 1 << 20)
                    f.write(os.urandom(n))
                    left -= n
            release = make_release(
                pkg,
                key,
                group="default",
                chunk_size=args.chunk_kb * 1024,
                version="2.0.0",
                package_name="bench",
                rollout=RolloutSettings(
                    canary_share=args.canary_share,
                    failure_threshold=0.2,
                    stage_timeout_s=args.timeout_s,
                ),
            )
            store.add(release, pkg)
            log(f"rolling out {args.package_mb} MB to {args.agents} agents")
            t1 = time.monotonic()
            res = ctl.rollout(release, devices=devices)
            rollout_s = time.monotonic() - t1
            failed = sum(int(str(s["failed"])) for s in res.stages)
            not_reached = args.agents - sum(int(str(s["devices"])) for s in res.stages)
            result.update(
                {
                    "package_mb": args.package_mb,
                    "rollout_status": res.status,
                    "rollout_stages": res.stages,
                    "rollout_s": round(rollout_s, 3),
                    "rollout_failed": failed + not_reached,
                    "rollout_mb_s": round(args.package_mb * args.agents / rollout_s, 1),
                    "chunks_served": chunks.served,
                }
            )
    finally:
        stop.set()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
        for p in parts:
            p.stop()
        broker.terminate()
        broker.wait(10)
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
