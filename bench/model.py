"""Benchmark the model method: teach on an MVTec-layout folder, evaluate FP32/INT8, print JSON.

    .venv/bin/python bench/model.py --data ../shared/datasets/mtd --json var/bench-model.json

Teaches with the shipped defaults (or the overrides given), times teaching, then evaluates
every graph with ``models.evaluate.evaluate`` (image/pixel AUROC, F1, rates at the
threshold, latency p50 at batch 1 on ``--threads`` threads) and prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from models.patchcore import GLOBAL_POOLS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="MVTec-layout dataset folder")
    p.add_argument("--json", type=Path, help="also write the JSON here")
    p.add_argument("--out", type=Path, help="keep the package here (default: a temp folder)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for teach and eval")
    p.add_argument("--graphs", default="fp32,int8", help="graphs to evaluate")
    p.add_argument("--backbone")
    p.add_argument("--input-size", type=int)
    p.add_argument("--stages", help="comma-separated stage numbers, e.g. 3,4")
    p.add_argument("--neighbourhood", type=int)
    p.add_argument("--bank-size", type=int)
    p.add_argument(
        "--coreset-candidates", type=int, help="patches the greedy coreset chooses the bank from"
    )
    p.add_argument("--top-k", type=int)
    p.add_argument("--blur-sigma", type=float)
    p.add_argument(
        "--global-stages", help="stages pooled for the image-level Gaussian, e.g. 3,4,5,6; 'none'"
    )
    p.add_argument("--global-weight", type=float, help="weight of the Gaussian term")
    p.add_argument(
        "--projection-dim", type=int, help="project patch features to this many dims (0 = off)"
    )
    p.add_argument(
        "--global-pool",
        choices=GLOBAL_POOLS,
        help="pooling of the image-level branch",
    )
    p.add_argument(
        "--standardize-input",
        action=argparse.BooleanOptionalAction,
        help="per-image standardisation inside the graph (default: the shipped setting)",
    )
    p.add_argument(
        "--brightness-margin",
        type=float,
        help="brightness check: flag beyond this x the highest held-out good (0 = off)",
    )
    p.add_argument(
        "--flip-views",
        choices=("auto", "none", "h", "v", "hv"),
        help="mirrored views scored with each image (maps averaged, bank from every view)",
    )
    p.add_argument("--seed", type=int, help="hold-out split, coreset and calibration seed")
    p.add_argument("--no-fp16", action="store_true", help="skip the FP16 export")
    p.add_argument("--no-int8", action="store_true", help="skip the INT8 graph (FP32 only)")
    return p.parse_args(argv)


def _stages(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    if text.strip().lower() in {"", "none"}:
        return ()
    return tuple(int(x) for x in text.split(","))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    args = _parse(argv)
    from models.evaluate import evaluate
    from models.teach import TeachSettings, teach

    s = TeachSettings(threads=args.threads)
    over: dict[str, Any] = {
        "backbone": args.backbone,
        "input_size": args.input_size,
        "stages": tuple(int(x) for x in args.stages.split(",")) if args.stages else None,
        "neighbourhood": args.neighbourhood,
        "bank_size": args.bank_size,
        "coreset_candidates": args.coreset_candidates,
        "top_k": args.top_k,
        "blur_sigma_cells": args.blur_sigma,
        "global_stages": _stages(args.global_stages),
        "global_weight": args.global_weight,
        "projection_dim": args.projection_dim,
        "global_pool": args.global_pool,
        "standardize_input": args.standardize_input,
        "brightness_margin": args.brightness_margin,
        "flip_views": args.flip_views,
        "seed": args.seed,
    }
    s = replace(s, **{k: v for k, v in over.items() if v is not None})
    if args.no_fp16:
        s = replace(s, fp16=False)
    if args.no_int8:
        s = replace(s, int8=False)

    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        out = args.out or Path(tmp) / "pkg"
        t0 = time.monotonic()
        teach(args.data, out, name="bench", version="0.0.0", settings=s, progress=True)
        teach_s = time.monotonic() - t0
        graphs = tuple(g for g in args.graphs.split(",") if g and (g != "int8" or s.int8))
        result = evaluate(out, args.data, graphs, threads=args.threads, progress=True)
        manifest = json.loads((out / "manifest.json").read_text())

    summary: dict[str, Any] = {
        "data": str(args.data),
        "settings": {k: v for k, v in asdict(s).items() if k != "extra"},
        "teach_s": round(teach_s, 1),
        "threshold": manifest["threshold"],
        "flip_choice": manifest["method"].get("flip_choice"),
        "teach_metrics": manifest["metrics"],
        "graphs": {
            g: {
                k: r.get(k)
                for k in (
                    "image_auroc",
                    "pixel_auroc",
                    "f1",
                    "false_reject_rate",
                    "escape_rate",
                    "latency_ms_p50",
                )
            }
            | {
                "per_class_image_auroc": {
                    c: v.get("image_auroc") for c, v in r.get("per_class", {}).items()
                }
            }
            for g, r in result["graphs"].items()
        },
    }
    fp32 = summary["graphs"].get("fp32", {}).get("image_auroc")
    int8 = summary["graphs"].get("int8", {}).get("image_auroc")
    if fp32 is not None and int8 is not None:
        summary["int8_image_auroc_loss"] = round(fp32 - int8, 5)
    from bench.report import emit_json

    emit_json(summary, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
