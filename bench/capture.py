"""Capture benchmark: synthetic rendering, free-run hand-off and trigger latency.

Measures, on this machine:

* ``synth_render_ms_p50`` / ``_p99``: :func:`render_part` at ``--size`` px;
* ``free_run_fps``: frames per second the capture loop hands on from an image
  folder replayed as fast as allowed (``rate_fps`` 1000), consumer keeping up;
* ``trigger_p50_ms`` / ``trigger_p99_ms`` / ``trigger_max_ms``: from
  ``trigger()`` to the Frame, synthetic line in triggered mode (one part read
  ahead), one trigger every ``--trigger-period-ms``;
* ``trigger_failures``: triggers that ended in a CaptureError (must be 0).

Prints one JSON document.

    .venv/bin/python bench/capture.py --size 256 --frames 200 --triggers 100
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from edge.capture.config import CameraConfig
from edge.capture.loop import CaptureError, CaptureLoop
from edge.capture.synth import part_rng, render_part
from edge.events import EventBus


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(values), q)), 3) if values else float("nan")


def bench_render(size_px: int, n: int) -> list[float]:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        render_part(part_rng(0, "bench", i), None if i % 3 else "scratch", size_px)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def bench_free_run(size_px: int, n_frames: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i in range(20):
            image, _ = render_part(part_rng(1, "bench", i), None, size_px)
            cv2.imwrite(str(folder / f"{i:03d}.png"), image)
        cfg = CameraConfig.model_validate(
            {"source": {"type": "folder", "path": str(folder), "rate_fps": 1000}}
        )
        loop = CaptureLoop(cfg, EventBus())
        loop.start()
        try:
            first = loop.latest(10.0)
            assert first is not None, "no frame from the folder"
            t0 = time.perf_counter()
            got = 0
            while got < n_frames:
                if loop.latest(5.0) is not None:
                    got += 1
            return got / (time.perf_counter() - t0)
        finally:
            loop.stop()


def bench_triggers(size_px: int, n: int, period_ms: float) -> tuple[list[float], int]:
    cfg = CameraConfig.model_validate(
        {"mode": "triggered", "source": {"type": "synthetic", "size_px": size_px}}
    )
    loop = CaptureLoop(cfg, EventBus())
    loop.start()
    latencies: list[float] = []
    failures = 0
    try:
        loop.trigger(0, timeout_s=10.0)  # warm-up
        for i in range(1, n + 1):
            time.sleep(period_ms / 1000)
            t0 = time.perf_counter()
            try:
                loop.trigger(i, timeout_s=5.0)
                latencies.append((time.perf_counter() - t0) * 1000)
            except CaptureError:
                failures += 1
    finally:
        loop.stop()
    return latencies, failures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="image side (px)")
    ap.add_argument("--renders", type=int, default=30, help="synthetic renders to time")
    ap.add_argument("--frames", type=int, default=200, help="free-run frames to count")
    ap.add_argument("--triggers", type=int, default=50, help="triggers to time")
    ap.add_argument(
        "--trigger-period-ms",
        type=float,
        default=400.0,
        help="pause between triggers (the line's part spacing)",
    )
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    render = bench_render(args.size, args.renders)
    fps = bench_free_run(args.size, args.frames)
    lat, failures = bench_triggers(args.size, args.triggers, args.trigger_period_ms)
    result = {
        "size_px": args.size,
        "synth_render_ms_p50": _pct(render, 50),
        "synth_render_ms_p99": _pct(render, 99),
        "free_run_fps": round(fps, 1),
        "trigger_p50_ms": _pct(lat, 50),
        "trigger_p99_ms": _pct(lat, 99),
        "trigger_max_ms": round(max(lat), 3) if lat else float("nan"),
        "trigger_failures": failures,
    }
    from bench.report import emit_json

    emit_json(result, args.out)


if __name__ == "__main__":
    main()
