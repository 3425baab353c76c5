"""Pipeline benchmark: bare backend vs frame-to-verdict, free-run throughput, INT8, memory.

Prints one JSON object. Keys:

- ``backend_p50_ms`` / ``backend_p99_ms`` / ``backend_mean_ms``: the bare
  ONNX Runtime backend (the package's default graph, batch 1) on
  preprocessed frames, nothing else, timed interleaved with the pipeline
  parts (one bare call, one part, ...) so both see the same machine load;
- ``pipeline_p50_ms`` / ``pipeline_p99_ms``: frame-to-verdict latency of
  the running appliance in triggered mode (frame grabbed -> verdict
  committed to SQLite and reported), one part at a time;
  ``triggered_stage_ms`` gives p50/p99 of each ``Verdict.timings_ms`` stage there;
- ``throughput_fps``: verdicts per second of the appliance in free-run with a
  camera faster than the pipeline (``camera_fps``; ``free_run_drops`` > 0 in
  every window shows it); ``throughput_vs_backend`` = ``throughput_fps`` x the
  bare backend's mean latency measured in blocks interleaved with the free-run
  windows (``backend_mean_ms_free_run``): ``--rounds`` times, the camera
  pauses, the bare backend runs call after call (1 ms apart, untimed, as the
  pipeline's backend thread) for about a window's time, then
  the camera resumes and, after a settling pause, verdicts are counted for a
  window (``--seconds`` in all). Both sides run in the same process with the
  same ORT settings (``--threads``, ``--spinning``), so a shared machine's load
  hits both alike; ``throughput_vs_backend_median``/``_p10``/``_p90`` are the
  spread of the per-round ratios; ``free_run_stage_ms_mean`` is where a part's
  time goes (``Verdict.timings_ms``, means over the free-run parts);
- ``int8_vs_fp32_speedup``: mean latency of the fp32 graph / the int8 graph
  (same backend settings, calls interleaved);
- ``ort_vs_torch_speedup``: the same model in PyTorch eager (fp32, batch 1,
  same thread count) / ONNX Runtime int8; null when the package's method
  cannot be rebuilt in PyTorch here;
- ``rss_mb``: peak resident memory (``VmHWM``) of the process running the
  appliance (which never imports torch; ``torch_loaded`` says so). An upper
  bound: the bench's own bare sessions live in it too;
- ``load_avg``: the machine's 1-minute load average at the start and the end
  (2 cores shared with other work make every number noisier).

The appliance runs in a child process so that its memory is its own; torch
is only imported by this parent afterwards. Usage::

    python bench/pipeline.py                       # demo model (taught once, cached)
    python bench/pipeline.py --package PKG --seconds 20 --threads 2 --spinning never
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _frames(n: int, size_px: int, seed: int = 3) -> list[np.ndarray[Any, Any]]:
    from edge.capture.synth import part_rng, render_part

    out = []
    for i in range(n):
        defect = "scratch" if i % 5 == 4 else None
        img, _ = render_part(part_rng(seed, "bench", i), defect, size_px)
        out.append(img)
    return out


# --------------------------------------------------------------------------- child


class _Bare:
    """One bare backend session on preprocessed frames, timed call by call."""

    def __init__(
        self, pkg: Any, graph: str, threads: int, frames: list[Any], spinning: str = "run"
    ) -> None:
        from edge.backends import create_backend
        from edge.backends.config import OnnxRuntimeBackendConfig
        from edge.pipeline import graph_source

        self.backend = create_backend(
            OnnxRuntimeBackendConfig(
                graph=graph,
                intra_op_threads=threads,
                spinning=spinning,
            )
        )
        self.backend.load(graph_source(pkg, graph))
        self.xs = [pkg.preprocess(f) for f in frames]
        self.i = 0
        self.lat: list[float] = []
        for x in self.xs[:5]:
            self.backend.run(x)

    def once(self) -> None:
        x = self.xs[self.i % len(self.xs)]
        self.i += 1
        t = time.perf_counter()
        self.backend.run(x)
        self.lat.append((time.perf_counter() - t) * 1000.0)

    def run_for(self, seconds: float) -> list[float]:
        """Calls for about ``seconds`` (at least 3); their latencies.

        A 1 ms pause (untimed) between calls, as the pipeline's backend thread
        waits for its next part between calls: on a busy machine the Linux
        scheduler favours a thread that has just slept, and a bare loop that
        never sleeps would be slower than the same calls in the pipeline.
        """
        n0 = len(self.lat)
        end = time.perf_counter() + seconds
        while len(self.lat) - n0 < 3 or time.perf_counter() < end:
            time.sleep(0.001)
            self.once()
        return self.lat[n0:]


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss where /proc is missing).

    ``ru_maxrss`` is not used on Linux: it survives exec, so a child spawned
    by a parent that had loaded torch would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load_avg() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return None


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in the child: bare backend, then the appliance (triggered, then free-run)."""
    from edge.app import Appliance
    from edge.capture.sources import FrameSource, Grab
    from edge.config import LineInspectConfig
    from models.package import load_package

    # The machine may be shared: every comparison interleaves its two sides call by call,
    # so both see the same load.
    with load_package(args.package) as pkg:
        size = max(pkg.input_spec.width, pkg.input_spec.height)
        frames = _frames(16, size_px=max(size, 64))
        graph = pkg.manifest.default_graph
        bare = _Bare(pkg, graph, args.threads, frames, args.spinning)
        fp32 = (
            _Bare(pkg, "fp32", args.threads, frames, args.spinning)
            if "fp32" in pkg.graph_variants and graph != "fp32"
            else None
        )
        if fp32 is not None:
            quant = _Bare(pkg, graph, args.threads, frames, args.spinning)
            for _ in range(max(30, args.runs // 3)):
                fp32.once()
                quant.once()
            speedup: float | None = float(np.mean(fp32.lat)) / float(np.mean(quant.lat))
            fp32_mean: float | None = float(np.mean(fp32.lat))
            fp32.backend.close()
            quant.backend.close()
        else:
            speedup = fp32_mean = None

    class Replay(FrameSource):
        """The bench's camera: replays the frames at ``interval_s``; ``running`` pauses it."""

        live = False

        def __init__(self, interval_s: float) -> None:
            self._i = 0
            self._interval_s = interval_s
            self.running = threading.Event()
            self.running.set()

        @property
        def interval_s(self) -> float:
            return self._interval_s

        def open(self) -> None:
            pass

        def read(self) -> Grab:
            while not self.running.wait(0.5):
                pass
            self._i += 1
            return Grab(frames[self._i % len(frames)])

        def close(self) -> None:
            self.running.set()

        def describe(self) -> str:
            return "bench replay"

    work = Path(tempfile.mkdtemp(prefix="lineinspect-bench-"))
    load_start = _load_avg()
    base: dict[str, Any] = {
        "model": {"package": str(args.package), "verify_reference": True},
        "backend": {
            "primary": {
                "type": "onnxruntime",
                "intra_op_threads": args.threads,
                "spinning": args.spinning,
            },
            "deadline_ms": 5000,
        },
        "store": {
            "path": str(work / "results"),
            "ok_sample_every": 0,
            "save_ng_images": bool(args.images),
        },
        "panel": {"enabled": False},
        "uplink": {"updates": {"slots_dir": str(work / "slots")}},
    }
    # the free-run appliance runs with its panel, as on a station (memory counts it)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        panel_port = int(sock.getsockname()[1])
    # -- frame-to-verdict, one part at a time (triggered) ---------------------------------
    cfg = LineInspectConfig.model_validate({**base, "camera": {"mode": "triggered"}})
    app = Appliance(cfg, source=Replay(0.0))
    app.start()
    time.sleep(0.3)
    for i in range(5):
        app.trigger(i)
    totals, walls = [], []
    for i in range(args.runs):
        bare.once()
        t = time.perf_counter()
        v = app.trigger(1000 + i)
        walls.append((time.perf_counter() - t) * 1000.0)
        totals.append(v.timings_ms["total"])
    trig_rows = [r for r in app.store.verdicts_after(0, 10**7) if (r.trigger_id or 0) >= 1000]
    triggered_stages = {
        k: {
            "p50": _pct([r.timings_ms[k] for r in trig_rows], 50),
            "p99": _pct([r.timings_ms[k] for r in trig_rows], 99),
        }
        for k in ("preprocess", "infer", "decide", "pipeline", "total")
        if trig_rows and all(k in r.timings_ms for r in trig_rows)
    }
    app.stop()
    # -- free-run throughput with a camera faster than the pipeline ------------------------
    # blocks interleaved round by round: [camera paused: bare backend back to back]
    # [camera on: settle, count verdicts for a window], so both see the same load
    before = len(bare.lat)
    warm_mean_s = float(np.mean(bare.run_for(1.0))) / 1000.0
    camera = Replay(max(warm_mean_s / args.camera_factor, 0.001))
    cfg = LineInspectConfig.model_validate(
        {
            **base,
            "camera": {"mode": "free_run"},
            "panel": {"enabled": True, "port": panel_port},
            "store": {**base["store"], "path": str(work / "results2")},
        }
    )
    app = Appliance(cfg, source=camera)
    app.start()
    assert app.capture is not None
    time.sleep(1.0)
    rounds = max(1, args.rounds)
    window_s = args.seconds / rounds
    settle_s = 0.25
    bare_free: list[float] = []
    counted = 0
    counted_s = 0.0
    ratios: list[float] = []
    window_drops: list[int] = []
    grabbed0 = app.capture.stats().grabbed
    camera_s = 0.0
    for _ in range(rounds):
        camera.running.clear()
        time.sleep(settle_s)  # the part in flight ends; ORT threads go idle
        block = bare.run_for(window_s)
        bare_free.extend(block)
        camera.running.set()
        on = time.perf_counter()
        time.sleep(settle_s)
        s0, d0, t0 = app.pipeline.stats(), app.capture.stats().drops, time.perf_counter()
        time.sleep(window_s)
        s1, d1, t1 = app.pipeline.stats(), app.capture.stats().drops, time.perf_counter()
        camera.running.clear()
        camera_s += t1 - on
        n = (s1.ok + s1.ng + s1.error) - (s0.ok + s0.ng + s0.error)
        counted += n
        counted_s += t1 - t0
        ratios.append(n / (t1 - t0) * float(np.mean(block)) / 1000.0)
        window_drops.append(d1 - d0)
    camera_fps = (app.capture.stats().grabbed - grabbed0) / camera_s
    camera.running.set()
    st = app.pipeline.stats()
    rows = [r for r in app.store.verdicts_after(0, 10**7) if r.code.name != "ERROR"]
    stages = {
        k: float(np.mean([r.timings_ms[k] for r in rows if k in r.timings_ms]))
        for k in ("preprocess", "infer", "decide", "pipeline", "total")
        if any(k in r.timings_ms for r in rows)
    }
    errors = st.error
    app.stop()
    mean_ms = float(np.mean(bare_free))
    bare.backend.close()
    lat = bare.lat[:before]
    fps = counted / counted_s
    rss_mb = _peak_rss_mb()
    return {
        "package": str(args.package),
        "graph": graph,
        "threads": args.threads,
        "backend_p50_ms": _pct(lat, 50),
        "backend_p99_ms": _pct(lat, 99),
        "backend_mean_ms": float(np.mean(lat)),
        "backend_mean_ms_free_run": mean_ms,
        "pipeline_p50_ms": _pct(totals, 50),
        "pipeline_p99_ms": _pct(totals, 99),
        "trigger_to_verdict_p99_ms": _pct(walls, 99),
        "triggered_stage_ms": triggered_stages,
        "pipeline_vs_backend_p99": _pct(totals, 99) / _pct(lat, 99),
        "throughput_fps": fps,
        "throughput_vs_backend": fps * mean_ms / 1000.0,
        "throughput_vs_backend_median": _pct(ratios, 50),
        "throughput_vs_backend_p10": _pct(ratios, 10),
        "throughput_vs_backend_p90": _pct(ratios, 90),
        "camera_fps": camera_fps,
        "free_run_drops": sum(window_drops),
        "free_run_windows_with_drops": f"{sum(d > 0 for d in window_drops)}/{rounds}",
        "free_run_ms_per_part": 1000.0 / fps,
        "free_run_stage_ms_mean": stages,
        "free_run_errors": errors,
        "free_run_infer_ms_p50": st.infer_ms_p50,
        "free_run_total_ms_p50": st.total_ms_p50,
        "free_run_total_ms_p99": st.total_ms_p99,
        "fp32_mean_ms": fp32_mean,
        "int8_vs_fp32_speedup": speedup,
        "rss_mb": rss_mb,
        "torch_loaded": "torch" in sys.modules,
        "runs": args.runs,
        "rounds": rounds,
        "spinning": args.spinning,
        "load_avg": [load_start, _load_avg()],
    }


# --------------------------------------------------------------------------- parent


def torch_model_for(pkg: Any) -> Any:
    """The package's scoring graph rebuilt as a PyTorch eager module (None: unknown method).

    PatchCore packages: the architecture from ``manifest.method`` and the input
    spec, the ImageNet trunk from its weights package, the memory bank from the
    fp32 ONNX graph's initializer (``bank_t``, [D, M]). A projection and the
    image-level Gaussian are rebuilt as placeholders of the same shapes (same
    compute; the scores differ, the timing is what this is for).
    """
    import dataclasses

    import onnx
    import torch
    from onnx import numpy_helper

    method = dict(pkg.manifest.method)
    if method.get("kind") != "patchcore":
        return None
    from models.patchcore import PatchCoreConfig, PatchCoreGraph, PatchFeatures
    from models.quantize import BANK_NAME

    spec = pkg.input_spec
    fields = {f.name for f in dataclasses.fields(PatchCoreConfig)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in method.items() if k in fields}
    kwargs["input_hw"] = (spec.height, spec.width)
    kwargs["in_channels"] = spec.channels
    features = PatchFeatures(PatchCoreConfig(**kwargs))
    graph = onnx.load(str(pkg.graph_path("fp32")))
    bank_t = next(
        (numpy_helper.to_array(i) for i in graph.graph.initializer if i.name == BANK_NAME), None
    )
    # [d, M]: d = the projected size with a projection (rebuilt as a random placeholder of
    # the same shape: same compute, and the timing is what this is for)
    dim = features.cfg.projection_dim or features.dim
    if bank_t is None or bank_t.ndim != 2 or bank_t.shape[0] != dim:
        return None
    bank = torch.from_numpy(np.ascontiguousarray(bank_t.T))
    return PatchCoreGraph(features, bank, raw_scale=pkg.manifest.threshold.raw_scale)


def torch_speedup(package: Path, threads: int, runs: int, ort_mean_ms: float) -> float | None:
    """PyTorch eager mean latency / ORT mean latency, when torch can rebuild the model."""
    try:
        import torch
    except ImportError:
        return None
    from edge.backends.onnxruntime import auto_intra_op_threads
    from models.package import load_package

    # the same count as the ONNX Runtime side (0 = the backend's auto rule)
    torch.set_num_threads(threads if threads > 0 else auto_intra_op_threads())
    with load_package(package) as pkg:
        try:
            model = torch_model_for(pkg)
        except Exception as exc:
            print(f"cannot rebuild the model in PyTorch: {exc}", file=sys.stderr)
            return None
        if model is None:
            return None
        frames = _frames(8, size_px=max(pkg.input_spec.width, 64))
        xs = [torch.from_numpy(pkg.preprocess(f)) for f in frames]
    model.eval()
    with torch.inference_mode():
        for x in xs[:3]:
            model(x)
        lat = []
        for i in range(runs):
            t = time.perf_counter()
            model(xs[i % len(xs)])
            lat.append((time.perf_counter() - t) * 1000.0)
    return float(np.mean(lat)) / ort_mean_ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--package", type=Path, help="model package (default: the demo model)")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = auto)")
    p.add_argument("--runs", type=int, default=300, help="timed inferences per measurement")
    p.add_argument("--seconds", type=float, default=15.0, help="free-run measurement time")
    p.add_argument(
        "--rounds",
        type=int,
        default=15,
        help="free-run windows, each after a bare backend block of the same length",
    )
    p.add_argument(
        "--camera-factor",
        type=float,
        default=3.0,
        help="free-run camera rate as a multiple of 1 / the bare backend's mean",
    )
    p.add_argument(
        "--spinning",
        choices=["run", "always", "never"],
        default="run",
        help="ORT intra-op thread spinning (backend config 'spinning'), both sides",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=Path("~/.cache/lineinspect").expanduser(),
        help="demo model cache",
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument(
        "--images",
        action="store_true",
        help="also store NG images (the background writer shares the CPU)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.package is None:
        from edge.demo import DemoOptions, ensure_demo_model

        args.package = ensure_demo_model(
            DemoOptions(cache_dir=args.cache), progress=lambda m: print(m, file=sys.stderr)
        )
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--package",
        str(args.package),
        "--threads",
        str(args.threads),
        "--runs",
        str(args.runs),
        "--seconds",
        str(args.seconds),
        "--rounds",
        str(args.rounds),
        "--camera-factor",
        str(args.camera_factor),
        "--spinning",
        args.spinning,
        *(["--images"] if args.images else []),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return out.returncode
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["ort_vs_torch_speedup"] = (
        None
        if args.no_torch
        else torch_speedup(
            args.package, args.threads, max(30, args.runs // 5), result["backend_mean_ms"]
        )
    )
    result["targets"] = {
        "pipeline_p99_within_1.15x_backend_p99": result["pipeline_vs_backend_p99"] <= 1.15,
        "throughput_at_least_90pct": result["throughput_vs_backend"] >= 0.9,
        "int8_at_least_1.5x_fp32": (result["int8_vs_fp32_speedup"] or 0) >= 1.5,
        "rss_under_600_mb": result["rss_mb"] < 600 and not result["torch_loaded"],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
