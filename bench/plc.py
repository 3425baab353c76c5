"""PLC handshake benchmark: trigger -> RESULT_VALID latency against the backend's own time.

The line simulator (``lineinspect plc-sim``, its own process: a PLC does not
share our GIL) plays the PLC, polling every 2 ms (one read of status+result
and at most one write per scan), at three part rates, ``--parts`` parts each
(default 10,000), against a station serving Modbus TCP on a loopback port.

Backends (``--backend``):

* ``pipeline`` (default): the real appliance (:class:`edge.app.Appliance`) in
  triggered mode with the PLC in server mode, running the model package named
  by ``--package`` (default: the demo model, taught once and cached like
  ``bench/pipeline.py`` does) on ONNX Runtime CPU, a replay camera of
  pre-rendered synthetic parts, verdicts committed to SQLite. Each trigger
  grabs one frame and inspects it on the station's own code path.
* ``ort``: stress mode. PlcService with a stand-in inspector running a tiny
  convolutional ORT graph built in memory (~5 ms): part rates far beyond what
  a real model reaches, to find where the Modbus handshake itself saturates.
* ``sleep``: stress mode with a simulated inference time of ``--backend-ms``.

**Capacity** (default ``--capacity-from station``) is what the station
sustains: the simulator triggers 1 500 parts at 1.5x the backend's
one-at-a-time rate, holding each trigger until READY, and the parts/s it got
is the capacity (at most the backend rate). The backend's own time under the
line's full load is in it: on 2 cores the handshake, the simulator and the
reporting of the previous part slow the backend from ~10.6 to ~12.2 ms, which
made "80 % of the backend rate" an overload. With ``--capacity-from backend``
capacity is the model's: ``1000 / mean backend latency`` (ms), the pipeline's
own ``infer`` timing of ``--capacity-parts`` parts triggered one at a time
while the simulator polls every ``--poll-ms`` without triggering. Either way
the line rates are 50 %, 80 % and 95 % of it (``--fractions``). It is *not*
the handshake's capacity: a Modbus handshake that needs 2 PLC scans per part
would allow 250 parts/s at a 2 ms scan, far above any model here, so
measuring a tiny graph's 200 parts/s says something about Python and Modbus,
not about a station (``--backend ort`` keeps that stress test available).

``backend_p99_ms`` per rate is the p99 of the backend time of the parts of
that run (same machine load as the latencies it is compared with).

Prints one JSON document: the backend, its capacity, and per rate
``parts_per_s``, ``p50_ms``, ``p95_ms``, ``p99_ms``, ``max_ms``, ``lost``,
``mismatched``, ``duplicated``, ``error_results``, ``backend_p99_ms``, the
simulator's own scan period (``sim_scan_p50_ms`` / ``p99`` / ``max``) and the
target checks (``p99_ms <= backend_p99_ms + 15``; nothing lost, duplicated or
mismatched at 80 % of capacity).

    .venv/bin/python bench/plc.py --out var/bench-plc.json
    .venv/bin/python bench/plc.py --package PKG --threads 1
    .venv/bin/python bench/plc.py --backend ort --parts 10000   # handshake stress
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge.events import EventBus  # noqa: E402
from edge.types import Verdict, VerdictCode  # noqa: E402
from plc.config import PlcConfig  # noqa: E402
from plc.service import PlcService  # noqa: E402
from plc.sim import SimReport, SimSettings, percentile, run_line  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ort_backend(size: int) -> tuple[Callable[[], None], str]:
    """A small conv net (4 convs, ~0.5 GFLOP at 224) as an ORT session; returns run()."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    chans = [3, 32, 64, 128, 128]
    strides = [2, 2, 2, 1]
    prev = "x"
    for i, stride in enumerate(strides):
        w = rng.standard_normal((chans[i + 1], chans[i], 3, 3)).astype(np.float32) * 0.1
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(
            helper.make_node(
                "Conv", [prev, f"w{i}"], [f"c{i}"], strides=[stride] * 2, pads=[1, 1, 1, 1]
            )
        )
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["y"]))
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128, 1, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 3, size, size)).astype(np.float32)

    def run() -> None:
        sess.run(None, {"x": x})

    return run, f"onnxruntime {ort.__version__} CPU, 4-conv net {size}x{size}, 1 thread"


def sleep_backend(ms: float) -> tuple[Callable[[], None], str]:
    def run() -> None:
        time.sleep(ms / 1000)

    return run, f"simulated inference {ms} ms (time.sleep)"


class BenchInspector:
    """Pipeline stand-in: one backend run per trigger, then on_verdict."""

    def __init__(self, run: Callable[[], None]) -> None:
        self.run_backend = run
        self.service: PlcService | None = None
        self.backend_ms: list[float] = []
        self._q: queue.SimpleQueue[tuple[int, float] | None] = queue.SimpleQueue()
        self._n = 0

    def on_trigger(self, part_id: int) -> None:
        self._q.put((part_id, time.monotonic()))

    def loop(self) -> None:
        assert self.service is not None
        svc = self.service
        while True:
            svc.heartbeat_ok()
            try:
                item = self._q.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is None:
                return
            part_id, captured = item
            t0 = time.perf_counter()
            self.run_backend()
            self.backend_ms.append((time.perf_counter() - t0) * 1000)
            self._n += 1
            svc.on_verdict(
                Verdict(
                    inspection_id=self._n,
                    frame_sequence=self._n,
                    source_id="bench",
                    trigger_id=part_id,
                    code=VerdictCode.OK,
                    score=0.1,
                    threshold=0.5,
                    model_version="1.0.0",
                    capture_time=captured,
                )
            )

    def stop(self) -> None:
        self._q.put(None)


def run_sim_process(settings: SimSettings) -> SimReport:
    """The simulator in its own process (a PLC does not share our GIL)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sim.json"
        cmd = [
            sys.executable,
            "-m",
            "edge.cli",
            "plc-sim",
            "--port",
            str(settings.port),
            "--ppm",
            repr(settings.ppm),
            "--parts",
            str(settings.parts),
            "--poll-ms",
            repr(settings.poll_interval_ms),
            "--late-ms",
            repr(settings.late_ms),
            "--timeout-s",
            "30",
            "--json",
            str(out),
        ]
        if settings.respect_ready:
            cmd.append("--respect-ready")
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode not in (0, 3):
            raise RuntimeError(f"plc-sim failed ({proc.returncode}): {proc.stderr}")
        data = json.loads(out.read_text(encoding="utf-8"))
    known = set(SimReport.__dataclass_fields__)
    return SimReport(**{k: v for k, v in data.items() if k in known})


def measure_capacity(run: Callable[[], None], n: int = 200) -> tuple[float, float]:
    """(parts/s one worker sustains, backend p99 ms) from n back-to-back runs."""
    for _ in range(10):
        run()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1000)
    mean = sum(times) / len(times)
    return 1000.0 / mean, percentile(times, 99)


@dataclass
class Station:
    """What a rate run needs from the station under test."""

    port: int
    backend_ms: list[float]
    """The backend time of every part inspected during the run (ms)."""
    status: Callable[[], dict[str, Any]]
    """PlcService.status() of the station."""
    pipeline_ms: list[float] = field(default_factory=list)
    """Frame -> verdict committed, per part (pipeline backend only)."""


def plc_settings(port: int, deadline_ms: int) -> dict[str, Any]:
    """The ``plc:`` section used by every station of this benchmark."""
    return {
        "enabled": True,
        "host": "127.0.0.1",
        "port": port,
        "verdict_deadline_ms": deadline_ms,
        "max_parts_in_flight": 16,
        "result_buffer_depth": 16,
        "trigger_events": False,
    }


@contextlib.contextmanager
def stress_station(run: Callable[[], None], deadline_ms: int) -> Iterator[Station]:
    """PlcService + a stand-in inspector (one ``run()`` per trigger): handshake stress."""
    port = free_port()
    cfg = PlcConfig.model_validate(plc_settings(port, deadline_ms))
    insp = BenchInspector(run)
    svc = PlcService(cfg, EventBus(), insp.on_trigger)
    insp.service = svc
    svc.start()
    worker = threading.Thread(target=insp.loop, name="bench-inspector", daemon=True)
    worker.start()
    try:
        yield Station(port, insp.backend_ms, svc.status)
    finally:
        insp.stop()
        worker.join(5)
        svc.stop()


# ----------------------------------------------------------------- real pipeline


class VerdictTimes:
    """A verdict sink keeping the pipeline's own timings of every verdict (ms)."""

    def __init__(self) -> None:
        self.infer_ms: list[float] = []
        self.pipeline_ms: list[float] = []

    def on_verdict(self, verdict: Verdict) -> None:
        t = verdict.timings_ms
        if "infer" in t:
            self.infer_ms.append(float(t["infer"]))
        if "pipeline" in t:
            self.pipeline_ms.append(float(t["pipeline"]))


def synthetic_frames(package: Path, n: int = 16) -> list[Any]:
    """Pre-rendered synthetic parts (every 5th with a scratch) at the model's input size."""
    from edge.capture.synth import part_rng, render_part
    from models.package import load_package

    with load_package(package) as pkg:
        size = max(pkg.input_spec.width, pkg.input_spec.height, 64)
    out = []
    for i in range(n):
        img, _ = render_part(part_rng(3, "bench-plc", i), "scratch" if i % 5 == 4 else None, size)
        out.append(img)
    return out


def replay_source(frames: list[Any]) -> Any:
    """A camera that hands out the pre-rendered frames in turn (no rendering on the hot path)."""
    from edge.capture.sources import FrameSource, Grab

    class Replay(FrameSource):
        live = False

        def __init__(self) -> None:
            self._i = 0

        @property
        def interval_s(self) -> float:
            return 0.0

        def open(self) -> None:
            pass

        def read(self) -> Grab:
            self._i += 1
            return Grab(frames[self._i % len(frames)])

        def close(self) -> None:
            pass

        def describe(self) -> str:
            return "bench replay"

    return Replay()


@contextlib.contextmanager
def pipeline_station(
    package: Path, threads: int, frames: list[Any], deadline_ms: int, *, plc: bool = True
) -> Iterator[tuple[Any, VerdictTimes, Station]]:
    """The real appliance in triggered mode (PLC server on a free port unless ``plc=False``)."""
    from edge.app import Appliance
    from edge.config import LineInspectConfig

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="lineinspect-bench-plc-") as tmp:
        work = Path(tmp)
        cfg = LineInspectConfig.model_validate(
            {
                "camera": {"id": "bench0", "mode": "triggered"},
                "model": {"package": str(package), "verify_reference": True},
                "backend": {
                    "primary": {"type": "onnxruntime", "intra_op_threads": threads},
                    "deadline_ms": 5000,
                },
                "store": {
                    "path": str(work / "results"),
                    "ok_sample_every": 0,
                    "save_ng_images": False,
                },
                "plc": plc_settings(port, deadline_ms) if plc else {"enabled": False},
                "panel": {"enabled": False},
                "uplink": {"updates": {"slots_dir": str(work / "slots")}},
            }
        )
        times = VerdictTimes()
        app = Appliance(cfg, source=replay_source(frames), sinks=[times])
        app.start()
        try:
            station = Station(
                port,
                times.infer_ms,
                app.plc.status if plc else dict,
                times.pipeline_ms,
            )
            yield app, times, station
        finally:
            app.stop()


@contextlib.contextmanager
def polling_sim(port: int, poll_ms: float) -> Iterator[None]:
    """The simulator polling ``port`` every ``poll_ms`` but (almost) never triggering.

    It triggers its first part at once and the second a minute later, and is
    stopped before that: the station sees a PLC's scan load with no parts.
    """
    cmd = [sys.executable, "-m", "edge.cli", "plc-sim", "--port", str(port)]
    cmd += ["--ppm", "1", "--parts", "2", "--poll-ms", repr(poll_ms), "--timeout-s", "30"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
    )
    try:
        time.sleep(2.0)  # connected and scanning
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _DropLateVerdicts(logging.Filter):
    """Counts and drops ``plc.late_verdict`` warnings: the capacity step triggers parts
    directly (not through the PLC), so the PLC service rightly knows none of them."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "plc.late_verdict" in record.getMessage():
            self.dropped += 1
            return False
        return True


def measure_pipeline_capacity(
    package: Path, threads: int, frames: list[Any], n: int, poll_ms: float = 2.0
) -> dict[str, Any]:
    """The model's capacity on this station: 1000 / mean backend ms over n parts
    triggered one at a time while the simulator polls the station (as during the
    rates: on a 2-core machine the PLC's scans slow the backend by a third)."""
    quiet = _DropLateVerdicts()
    events_log = logging.getLogger("edge.events")
    events_log.addFilter(quiet)
    with (
        contextlib.ExitStack() as undo,
        pipeline_station(package, threads, frames, 1000) as (app, times, station),
        polling_sim(station.port, poll_ms),
    ):
        undo.callback(events_log.removeFilter, quiet)
        for i in range(10):
            app.trigger(i)
        times.infer_ms.clear()
        times.pipeline_ms.clear()
        for i in range(n):
            app.trigger(1000 + i)
        label = app.backend_label()
    mean = sum(times.infer_ms) / len(times.infer_ms)
    return {
        "capacity_parts_per_s": 1000.0 / mean,
        "backend_mean_ms": mean,
        "backend_p50_ms": percentile(times.infer_ms, 50),
        "backend_p99_ms": percentile(times.infer_ms, 99),
        "pipeline_mean_ms": sum(times.pipeline_ms) / len(times.pipeline_ms),
        "pipeline_p99_ms": percentile(times.pipeline_ms, 99),
        "label": label,
        "late_verdict_warnings_dropped": quiet.dropped,
    }


def measure_station_throughput(
    package: Path,
    threads: int,
    frames: list[Any],
    backend_rate: float,
    poll_ms: float,
    deadline_ms: int,
    parts: int = 1500,
) -> dict[str, Any]:
    """Parts/s the appliance sustains: the simulator triggers at 1.5x ``backend_rate``
    but holds each trigger until READY (a line that waits for the station)."""
    with pipeline_station(package, threads, frames, deadline_ms) as (_app, times, station):
        settings = SimSettings(
            port=station.port,
            ppm=backend_rate * 1.5 * 60,
            parts=parts,
            poll_interval_ms=poll_ms,
            late_ms=deadline_ms,
            result_timeout_s=max(5.0, deadline_ms / 1000 * 3),
            connect_timeout_s=30.0,
            respect_ready=True,
        )
        report = run_sim_process(settings)
        backend_ms = list(times.infer_ms)
    return {
        "parts": report.parts,
        "parts_per_s": round(report.parts_per_s, 3),
        "backend_mean_ms": round(sum(backend_ms) / max(len(backend_ms), 1), 3),
        "error_results": report.error_results,
    }


# --------------------------------------------------------------------- one rate


def bench_rate(
    station_cm: contextlib.AbstractContextManager[Station],
    parts_per_s: float,
    parts: int,
    poll_ms: float,
    deadline_ms: int,
    separate_process: bool,
) -> dict[str, Any]:
    with station_cm as station:
        settings = SimSettings(
            port=station.port,
            ppm=parts_per_s * 60,
            parts=parts,
            poll_interval_ms=poll_ms,
            late_ms=deadline_ms,
            result_timeout_s=max(5.0, deadline_ms / 1000 * 3),
            connect_timeout_s=30.0,
        )
        station.backend_ms.clear()
        station.pipeline_ms.clear()
        report = run_sim_process(settings) if separate_process else run_line(settings)
        status = station.status()
        backend_ms = list(station.backend_ms)
        pipeline_ms = list(station.pipeline_ms)
    backend_p99 = percentile(backend_ms, 99)
    out = {
        "target_parts_per_s": round(parts_per_s, 2),
        "parts": report.parts,
        "parts_per_s": report.parts_per_s,
        "p50_ms": report.p50_ms,
        "p95_ms": report.p95_ms,
        "p99_ms": report.p99_ms,
        "max_ms": report.max_ms,
        "mean_ms": report.mean_ms,
        "lost": report.lost,
        "mismatched": report.mismatched,
        "duplicated": report.duplicated,
        "error_results": report.error_results,
        "missed": report.missed,
        "deadline_errors": report.deadline_errors,
        "late": report.late,
        "overruns": report.appliance_overruns,
        "late_verdicts": status["counters"]["late_verdicts"],
        "appliance_p99_ms": report.appliance_p99_ms,
        "handshake_p50_ms": report.handshake_p50_ms,
        "handshake_p99_ms": report.handshake_p99_ms,
        "backend_p50_ms": round(percentile(backend_ms, 50), 3),
        "backend_mean_ms": round(sum(backend_ms) / max(len(backend_ms), 1), 3),
        "backend_p99_ms": round(backend_p99, 3),
        "p99_within_backend_plus_15ms": report.p99_ms <= backend_p99 + 15,
    }
    if pipeline_ms:
        out["pipeline_p50_ms"] = round(percentile(pipeline_ms, 50), 3)
        out["pipeline_p99_ms"] = round(percentile(pipeline_ms, 99), 3)
    for key in ("scan_mean_ms", "scan_p50_ms", "scan_p99_ms", "scan_max_ms", "scans"):
        value = getattr(report, key, None)
        if value is not None:
            out[f"sim_{key}"] = value
    return out


def machine_load() -> list[float]:
    """The 1/5/15-minute load averages (the machine may be shared)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, default=10_000, help="parts per rate (10000)")
    ap.add_argument(
        "--fractions",
        default="0.5,0.8,0.95",
        help="part rates as fractions of measured capacity (0.5,0.8,0.95)",
    )
    ap.add_argument(
        "--backend",
        choices=("pipeline", "ort", "sleep"),
        default="pipeline",
        help="pipeline: the real appliance and model (default); ort / sleep: handshake stress",
    )
    ap.add_argument(
        "--package",
        type=Path,
        help="pipeline backend: model package (default: the demo model, taught once, cached)",
    )
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path("~/.cache/lineinspect").expanduser(),
        help="demo model cache",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="pipeline backend: ORT intra-op threads (1: the other core serves Modbus "
        "and runs the simulator)",
    )
    ap.add_argument(
        "--capacity-parts",
        type=int,
        default=200,
        help="pipeline backend: parts timed one at a time for the capacity (200)",
    )
    ap.add_argument(
        "--capacity",
        type=float,
        help="use this capacity (parts/s) instead of measuring it: the same part rates "
        "for A/B runs of two code versions under the same machine load",
    )
    ap.add_argument(
        "--backend-ms",
        type=float,
        default=10.0,
        help="sleep backend: simulated inference time (10)",
    )
    ap.add_argument("--input-size", type=int, default=224, help="ort backend: input HxW")
    ap.add_argument(
        "--capacity-from",
        choices=("station", "backend"),
        default="station",
        help="station (default): the rates are fractions of the appliance's sustained "
        "throughput under the simulator (parts triggered as fast as READY allows); backend: "
        "of 1000 / the backend's mean time with parts one at a time",
    )
    ap.add_argument("--poll-ms", type=float, default=2.0, help="simulator scan time (2)")
    ap.add_argument("--deadline-ms", type=int, default=1000, help="plc.verdict_deadline_ms (1000)")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="run the simulator in this process (default: its own process)",
    )
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("plc.audit").setLevel(logging.WARNING)
    load_before = machine_load()
    fractions = [float(f) for f in args.fractions.split(",")]
    separate = not args.in_process
    doc: dict[str, Any] = {
        "benchmark": "plc trigger -> RESULT_VALID latency (server mode, loopback)",
        "backend_kind": args.backend,
    }
    make_station: Callable[[], contextlib.AbstractContextManager[Station]]
    if args.backend == "pipeline":
        package = args.package
        if package is None:
            from edge.demo import DemoOptions, ensure_demo_model

            package = ensure_demo_model(
                DemoOptions(cache_dir=args.cache), progress=lambda m: print(m, file=sys.stderr)
            )
        frames = synthetic_frames(package)
        doc["backend"] = f"onnxruntime ({args.threads} intra-op thread(s)), package {package}"
        if args.capacity:
            capacity = args.capacity
            doc["capacity_definition"] = "given with --capacity (not measured)"
        else:
            cap = measure_pipeline_capacity(
                package, args.threads, frames, args.capacity_parts, args.poll_ms
            )
            capacity = float(cap["capacity_parts_per_s"])
            doc.update(
                {
                    "backend": f"{cap.pop('label')} ({args.threads} intra-op thread(s)), "
                    f"package {package}",
                    "capacity_definition": "1000 / mean backend (infer) ms of the real "
                    f"pipeline, {args.capacity_parts} parts one at a time, while the "
                    f"simulator polls every {args.poll_ms:g} ms",
                    "capacity_measurement": {k: round(float(v), 3) for k, v in cap.items()},
                }
            )
            if args.capacity_from == "station":
                sustained = measure_station_throughput(
                    package, args.threads, frames, capacity, args.poll_ms, args.deadline_ms
                )
                doc["station_throughput"] = sustained
                capacity = min(capacity, float(sustained["parts_per_s"]))
                doc["capacity_definition"] = (
                    "the station's sustained throughput: parts/s of the real appliance "
                    "under the simulator triggering as fast as READY allows (at most the "
                    "backend's one-at-a-time rate)"
                )
        doc["capacity_parts_per_s"] = round(capacity, 2)

        def make_pipeline() -> contextlib.AbstractContextManager[Station]:
            @contextlib.contextmanager
            def cm() -> Iterator[Station]:
                with pipeline_station(package, args.threads, frames, args.deadline_ms) as (
                    _app,
                    _times,
                    station,
                ):
                    yield station

            return cm()

        make_station = make_pipeline
    else:
        run, desc = (
            ort_backend(args.input_size)
            if args.backend == "ort"
            else sleep_backend(args.backend_ms)
        )
        capacity, cap_p99 = measure_capacity(run)
        capacity = args.capacity or capacity
        doc.update(
            {
                "backend": desc + " (stress mode: PlcService + stand-in inspector)",
                "capacity_parts_per_s": round(capacity, 2),
                "capacity_definition": "1000 / mean ms of 200 back-to-back backend runs",
                "backend_p99_ms_standalone": round(cap_p99, 3),
            }
        )

        def make_stress() -> contextlib.AbstractContextManager[Station]:
            return stress_station(run, args.deadline_ms)

        make_station = make_stress
    results = []
    for frac in fractions:
        res = bench_rate(
            make_station(), capacity * frac, args.parts, args.poll_ms, args.deadline_ms, separate
        )
        res["fraction_of_capacity"] = frac
        res["load_average_after"] = machine_load()
        results.append(res)
        print(json.dumps(res), file=sys.stderr, flush=True)
    at80 = [r for r in results if abs(r["fraction_of_capacity"] - 0.8) < 1e-9]
    doc.update(
        {
            "poll_ms": args.poll_ms,
            "simulator": "in-process"
            if args.in_process
            else "separate process (lineinspect plc-sim)",
            "parts_per_rate": args.parts,
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "rates": results,
            "targets": {
                "p99_within_backend_plus_15ms_at_80pct": bool(at80)
                and all(r["p99_within_backend_plus_15ms"] for r in at80),
                "p99_within_backend_plus_15ms_all_rates": all(
                    r["p99_within_backend_plus_15ms"] for r in results
                ),
                "zero_lost_duplicated_mismatched_at_80pct": bool(at80)
                and all(r["lost"] == r["duplicated"] == r["mismatched"] == 0 for r in at80),
                "zero_error_results_at_80pct": bool(at80)
                and all(r["error_results"] == 0 for r in at80),
            },
        }
    )
    from bench.report import emit_json

    emit_json(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
