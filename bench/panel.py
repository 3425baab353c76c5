"""Panel benchmark: does watching the line slow the line?

Runs the appliance (edge.app.Appliance) on the synthetic line in free-run mode
with a real model package and its web panel, then:

1. ``--seconds`` with nobody watching: the pipeline's frame-to-verdict latency
   (``timings_ms.total`` of the stored verdicts, p50/p99) and throughput;
2. the same with ``--clients`` browsers' worth of Live-page traffic (each
   polls ``/api/live`` every ``--poll-ms``, fetches the live JPEG when a new
   part appears and the last-parts list), measuring the panel's own latency.

Prints one JSON document with at least ``pipeline_p50_ms_idle``,
``pipeline_p99_ms_idle``, ``pipeline_p50_ms_watched``, ``pipeline_p99_ms_watched``,
``throughput_fps_idle``, ``throughput_fps_watched``, ``live_api_p50_ms``,
``live_api_p99_ms``, ``live_jpeg_p50_ms``, ``live_jpeg_p99_ms``,
``jpeg_encodes_per_part``.

    .venv/bin/python bench/panel.py --seconds 15 --clients 4
    .venv/bin/python bench/panel.py --package PKG   # a taught package instead of the toy
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

# Run as a script, bench/ would come first on sys.path and bench/plc.py would hide
# the plc package: put the repository root there instead.
ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)

from edge.app import Appliance  # noqa: E402
from edge.config import LineInspectConfig  # noqa: E402
from edge.web.auth import PanelDb  # noqa: E402


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values), q)), 3) if values else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pipeline_window(
    app: Appliance, since_unix: float, until_unix: float
) -> tuple[list[float], int]:
    rows, total = app.store.query(since_unix=since_unix, until_unix=until_unix, limit=1_000_000)
    return [r.timings_ms["total"] for r in rows if "total" in r.timings_ms], total


def _client(
    base: str,
    token: str,
    poll_s: float,
    stop: threading.Event,
    api_ms: list[float],
    jpeg_ms: list[float],
) -> None:
    last = None
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10.0
    ) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = c.get("/api/live")
            api_ms.append((time.perf_counter() - t0) * 1000)
            part = r.json().get("part")
            if part and part["inspection_id"] != last:
                last = part["inspection_id"]
                t0 = time.perf_counter()
                c.get(r.json()["live_image_url"])
                jpeg_ms.append((time.perf_counter() - t0) * 1000)
                c.get("/api/parts", params={"limit": 12})
            stop.wait(poll_s)


def _clients(base: str, token: str, n: int, poll_s: float, seconds: float, results: Any) -> None:
    stop = threading.Event()
    api_ms: list[float] = []
    jpeg_ms: list[float] = []
    threads = [
        threading.Thread(
            target=_client, args=(base, token, poll_s, stop, api_ms, jpeg_ms), daemon=True
        )
        for _ in range(n)
    ]
    for t in threads:
        t.start()
    results.put("started")
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(10)
    results.put((api_ms, jpeg_ms))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--poll-ms", type=float, default=500.0)
    ap.add_argument("--parts-per-minute", type=float, default=600.0)
    ap.add_argument("--size", type=int, default=256, help="synthetic image side (px)")
    ap.add_argument("--package", type=Path, help="model package (default: the toy package)")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-panel-") as tmp_s:
        tmp = Path(tmp_s)
        pkg = args.package
        if pkg is None:
            from models.toy_package import build_toy_package

            pkg = build_toy_package(tmp / "pkg", raw_scale=0.76)
        port = _free_port()
        cfg = LineInspectConfig.model_validate(
            {
                "camera": {
                    "mode": "free_run",
                    "source": {
                        "type": "synthetic",
                        "parts_per_minute": args.parts_per_minute,
                        "size_px": args.size,
                    },
                },
                "model": {"package": str(pkg)},
                "store": {"path": str(tmp / "results")},
                "panel": {"port": port},
                "uplink": {"updates": {"slots_dir": str(tmp / "slots")}},
            }
        )
        db = PanelDb(tmp / "panel" / "panel.sqlite", time_cost=1, memory_kib=8192)
        db.create_first_admin("bench", "bench-password")
        token, _ = db.create_token("bench", "bench")
        app = Appliance(cfg, panel_data_dir=tmp / "panel")
        app.start()
        try:
            time.sleep(2.0)  # warm-up
            t_idle = time.time()
            time.sleep(args.seconds)
            t_idle_end = time.time()
            idle, n_idle = _pipeline_window(app, t_idle, t_idle_end)
            # The watchers run in another process, as browsers would: their own
            # Python work must not be billed to the appliance's interpreter.
            ctx = multiprocessing.get_context("spawn")
            results: Any = ctx.Queue()
            proc = ctx.Process(
                target=_clients,
                args=(
                    f"http://127.0.0.1:{port}",
                    token,
                    args.clients,
                    args.poll_ms / 1000,
                    args.seconds,
                    results,
                ),
            )
            proc.start()
            assert results.get(timeout=60) == "started"
            encodes_before = _encodes(app)
            t_watch = time.time()
            api_ms, jpeg_ms = results.get(timeout=args.seconds + 60)
            t_end = time.time()
            proc.join(10)
            watched, n_watched = _pipeline_window(app, t_watch, t_end)
            parts_watched = max(1, n_watched)
            encodes = _encodes(app) - encodes_before
        finally:
            app.stop()
    out: dict[str, Any] = {
        "clients": args.clients,
        "poll_ms": args.poll_ms,
        "seconds": args.seconds,
        "pipeline_p50_ms_idle": _pct(idle, 50),
        "pipeline_p99_ms_idle": _pct(idle, 99),
        "pipeline_p50_ms_watched": _pct(watched, 50),
        "pipeline_p99_ms_watched": _pct(watched, 99),
        "throughput_fps_idle": round(n_idle / (t_idle_end - t_idle), 2),
        "throughput_fps_watched": round(n_watched / (t_end - t_watch), 2),
        "live_api_requests": len(api_ms),
        "live_api_p50_ms": _pct(api_ms, 50),
        "live_api_p99_ms": _pct(api_ms, 99),
        "live_jpeg_p50_ms": _pct(jpeg_ms, 50),
        "live_jpeg_p99_ms": _pct(jpeg_ms, 99),
        "jpeg_encodes_per_part": round(encodes / parts_watched, 3),
    }
    from bench.report import emit_json

    emit_json(out, args.json, indent=1)


def _encodes(app: Appliance) -> int:
    panel = getattr(app, "panel", None)
    server = getattr(panel, "_server", None)
    fastapi_app = getattr(getattr(server, "config", None), "app", None)
    state = getattr(getattr(fastapi_app, "state", None), "panel", None)
    return int(state.live_cache.encoded) if state is not None else 0


if __name__ == "__main__":
    main()
