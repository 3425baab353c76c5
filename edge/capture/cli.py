"""Sub-commands of the capture package: ``synth`` and ``capture`` (see edge.cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``lineinspect synth`` and ``lineinspect capture``."""
    p = sub.add_parser(
        "synth",
        help="write a synthetic-line dataset (MVTec AD layout)",
        description="Write a reproducible dataset of synthetic machined parts in the MVTec AD "
        "layout: train/good, test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--good", type=int, required=True, help="number of good parts")
    p.add_argument("--defective", type=int, required=True, help="number of defective parts")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument(
        "--train-fraction",
        type=float,
        default=0.8,
        help="share of good parts that go to train/good (default 0.8)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a dataset already in --out (its train/test/ground_truth)",
    )
    p.add_argument("--defects", default=None, help="comma-separated defect types (default: all)")
    p.set_defaults(func=_cmd_synth)
    _register_capture(sub)


def _cmd_synth(args: argparse.Namespace) -> int:
    import sys

    from edge.capture.synth import DEFECT_TYPES, write_dataset

    defects = tuple(args.defects.split(",")) if args.defects else DEFECT_TYPES
    try:
        summary = write_dataset(
            args.out,
            good=args.good,
            defective=args.defective,
            seed=args.seed,
            size_px=args.size,
            train_fraction=args.train_fraction,
            defects=defects,
            overwrite=args.force,
        )
    except FileExistsError as exc:
        print(f"lineinspect synth: {exc} (--force replaces it)", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"lineinspect synth: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def _register_capture(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "capture",
        help="run the capture loop and report frame rate and drops",
        description="Run the capture loop on the configured source (default: the synthetic "
        "line) and print frame rate, drops, corrupt frames and reconnects once a second. "
        "Exit code 0 when frames arrived, 1 when none did, 2 for a bad configuration.",
    )
    p.add_argument("--config", type=Path, help="configuration file (default: built-in defaults)")
    p.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="how long to run (default 10; 0 runs until Ctrl-C)",
    )
    p.add_argument(
        "--mode",
        choices=("free_run", "triggered"),
        help="override camera.mode from the configuration",
    )
    p.add_argument(
        "--trigger-hz",
        type=float,
        default=2.0,
        help="triggered mode: triggers per second to send (default 2)",
    )
    p.add_argument(
        "--consumer-ms",
        type=float,
        default=0.0,
        help="free-run: pretend each frame takes this long to inspect (shows drops)",
    )
    p.add_argument(
        "--snapshot", type=Path, help="write the last frame to this image file (.png or .jpg)"
    )
    p.add_argument("--json", action="store_true", help="print the final counters as JSON")
    p.set_defaults(func=_cmd_capture)


def _cmd_capture(args: argparse.Namespace) -> int:
    import sys
    import time

    import cv2

    from edge.capture.loop import CaptureError, CaptureLoop, CaptureStats
    from edge.config import ConfigError, LineInspectConfig, load_config
    from edge.events import EventBus
    from edge.types import Frame

    try:
        config = load_config(args.config) if args.config else LineInspectConfig()
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 2
    camera = config.camera
    if args.mode:
        camera = camera.model_copy(update={"mode": args.mode})
    loop = CaptureLoop(camera, EventBus())
    print(f"capture: {camera.id} ({camera.mode}) from {loop.source.describe()}", flush=True)
    last: Frame | None = None
    taken = failed = 0
    trigger_id = 0
    start = time.monotonic()
    next_report = start + 1.0
    period = 1.0 / args.trigger_hz if args.trigger_hz > 0 else 0.5
    loop.start()
    try:
        while args.seconds <= 0 or time.monotonic() - start < args.seconds:
            if camera.mode == "free_run":
                frame = loop.latest(0.2)
                if frame is not None:
                    last, taken = frame, taken + 1
                    if args.consumer_ms > 0:
                        time.sleep(args.consumer_ms / 1000.0)
            else:
                t0 = time.monotonic()
                trigger_id += 1
                try:
                    last = loop.trigger(trigger_id)
                    taken += 1
                except CaptureError as exc:
                    failed += 1
                    print(f"  trigger {trigger_id}: {exc.reason}: {exc}", flush=True)
                time.sleep(max(0.0, period - (time.monotonic() - t0)))
            if time.monotonic() >= next_report:
                next_report += 1.0
                print("  " + _status_line(loop.stats(), time.monotonic() - start), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        loop.stop()
    stats: CaptureStats = loop.stats()
    elapsed = time.monotonic() - start
    summary = {
        **_stats_dict(stats),
        "elapsed_s": round(elapsed, 3),
        "taken": taken,
        "trigger_failures_seen": failed,
        "mean_fps": round(stats.frames / elapsed, 3) if elapsed > 0 else 0.0,
    }
    if args.snapshot and last is not None and not cv2.imwrite(str(args.snapshot), last.image):
        print(f"capture: cannot write {args.snapshot}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"capture: {stats.frames} frames in {elapsed:.1f} s ({summary['mean_fps']} fps), "
            f"{stats.drops} dropped, {stats.corrupt} corrupt, {stats.reconnects} reconnects, "
            f"{stats.trigger_failures} failed triggers"
        )
    return 0 if stats.frames > 0 else 1


def _stats_dict(stats: Any) -> dict[str, Any]:
    from dataclasses import asdict

    out = asdict(stats)
    out["fps"] = round(out["fps"], 3)
    if out["last_frame_age_s"] is not None:
        out["last_frame_age_s"] = round(out["last_frame_age_s"], 3)
    return out


def _status_line(stats: Any, t_s: float) -> str:
    return (
        f"t={t_s:5.1f}s state={stats.state} frames={stats.frames} fps={stats.fps:.1f} "
        f"drops={stats.drops} corrupt={stats.corrupt} reconnects={stats.reconnects}"
        + (f" last_error={stats.last_error!r}" if stats.last_error else "")
    )
