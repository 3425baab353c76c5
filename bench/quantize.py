"""Benchmark INT8 quantization variants of a taught FP32 graph: image AUROC and latency, JSON out.

    .venv/bin/python bench/quantize.py --package PKG --data ../shared/datasets/mtd \\
        --variant default --variant u8='{"activations": "u8"}' --json var/bench-quantize.json

``PKG`` is a package taught on ``--data`` (its ``model_fp32.onnx`` and manifest are used;
``lineinspect teach --set int8=false --set fp16=false`` is enough). For each variant
(``NAME`` = default settings, or ``NAME=JSON`` of :class:`models.quantize.Int8Settings`
fields) it does what teach does: quantize the FP32 graph calibrated on the same good images,
rebuild the memory bank (and, with ``"gaussian": "refit"``, the default, refit the image-level
Gaussian) from the INT8 graph's own features (``models.teach.fit_int8``), rechoose the
normalisation on the held-out goods (teach's split, reproduced from the manifest's settings),
then scores the test split and reports image AUROC (FP32 and INT8, overall and per class), the
largest held-out score difference to FP32 (teach's ``default_graph`` gate) and the quantized op
types. Latency: all graphs interleaved call by call at batch 1 (``--threads``, default 2),
so a shared machine's load hits them alike; p50 and the speedup of each against FP32.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", type=Path, required=True, help="package taught on --data")
    p.add_argument("--data", type=Path, required=True, help="MVTec-layout dataset folder")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME or NAME=JSON of Int8Settings fields (repeatable; default: default)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=200, help="timed calls per graph")
    p.add_argument("--keep", type=Path, help="keep the INT8 graphs in this folder")
    p.add_argument("--json", type=Path, help="also write the JSON here")
    return p.parse_args(argv)


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _scores(path: Path, x: npt.NDArray[np.float32], threads: int) -> npt.NDArray[np.float64]:
    sess = _session(path, threads)
    out = [sess.run(["score"], {"image": x[i : i + 8]})[0] for i in range(0, len(x), 8)]
    return np.concatenate(out).astype(np.float64)


def _auroc(labels: npt.NDArray[np.bool_], scores: npt.NDArray[np.float64]) -> float:
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(labels, scores)), 4)


def _per_class(
    classes: npt.NDArray[np.str_], labels: npt.NDArray[np.bool_], s: npt.NDArray[np.float64]
) -> dict[str, float]:
    good = ~labels
    return {
        str(c): _auroc(labels[good | (classes == c)], s[good | (classes == c)])
        for c in sorted(set(classes[labels].tolist()))
    }


def _read(path: Path) -> npt.NDArray[np.uint8]:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise SystemExit(f"cannot read {path}")
    return np.asarray(img, dtype=np.uint8)


def latency(paths: dict[str, Path], x: npt.NDArray[np.float32], threads: int, runs: int) -> Any:
    """Interleaved batch-1 latency (ms) of each graph: p50, p90, and speedup vs ``fp32``."""
    sessions = {k: _session(p, threads) for k, p in paths.items()}
    names = list(sessions)
    for s in sessions.values():
        for i in range(5):
            s.run(None, {"image": x[i % len(x) : i % len(x) + 1]})
    lat: dict[str, list[float]] = {k: [] for k in names}
    for r in range(runs):
        xi = x[r % len(x) : r % len(x) + 1]
        for k in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            sessions[k].run(None, {"image": xi})
            lat[k].append((time.perf_counter() - t) * 1000.0)
    base = np.asarray(lat[names[0]])
    return {
        k: {
            "p50_ms": round(float(np.median(v)), 2),
            "p90_ms": round(float(np.percentile(v, 90)), 2),
            "speedup_vs_fp32": round(float(np.median(base) / np.median(v)), 3),
            "speedup_vs_fp32_paired": round(float(np.median(base / np.asarray(v))), 3),
        }
        for k, v in lat.items()
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    args = _parse(argv)
    import torch

    from models.evaluate import discover
    from models.images import load_good_images
    from models.package import load_package, preprocess_batch, preprocess_image
    from models.quantize import (
        Int8Settings,
        quantize_int8,
        quantized_op_types,
        set_graph_scale,
    )
    from models.teach import TeachSettings, _split, fit_int8
    from models.threshold import ThresholdRule, choose_threshold

    torch.set_num_threads(args.threads)
    with load_package(args.package) as pkg:
        manifest = pkg.manifest
        fp32 = pkg.graph_path("fp32")
        spec = pkg.input_spec
        taught = dict(manifest.method.get("settings", {}))
        known = set(TeachSettings.__dataclass_fields__)
        kwargs: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in taught.items() if k in known
        }
        kwargs.setdefault("gaussian_goods", "fit")  # packages taught before the setting
        if kwargs.get("flip_views") == "auto":  # as teach decided it
            kwargs["flip_views"] = manifest.method.get("flip_views", "none")
        s = TeachSettings(**kwargs)
        images = load_good_images(args.data, min_images=s.min_images)
        fit_idx, hold_idx = _split(len(images.images), s)
        rng = np.random.default_rng(s.seed + 1)
        cal_idx = np.sort(
            rng.choice(fit_idx, min(s.calibration_images, len(fit_idx)), replace=False)
        )
        x_fit = preprocess_batch([images.images[i] for i in fit_idx], spec)
        x_hold = preprocess_batch([images.images[i] for i in hold_idx], spec)
        x_cal = preprocess_batch([images.images[i] for i in cal_idx], spec)
        samples = discover(args.data).samples
        x_test = np.stack([preprocess_image(_read(t.path), spec) for t in samples])
        labels = np.array([t.defective for t in samples])
        classes = np.array([t.label for t in samples])
        raw_scale = float(manifest.threshold.raw_scale)
        rule = ThresholdRule(s.target_false_reject_rate, margin=s.threshold_margin)

        fp_hold = _scores(fp32, x_hold, args.threads)
        fp_test = _scores(fp32, x_test, args.threads)
        result: dict[str, Any] = {
            "data": str(args.data),
            "package": str(args.package),
            "threads": args.threads,
            "fp32": {
                "image_auroc": _auroc(labels, fp_test),
                "per_class": _per_class(classes, labels, fp_test),
            },
            "variants": {},
        }
        with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
            folder = args.keep or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            paths = {"fp32": fp32}
            for spec_arg in args.variant or ["default"]:
                name, _, raw = spec_arg.partition("=")
                settings = Int8Settings(**(json.loads(raw) if raw else {}))
                out = folder / f"int8_{name}.onnx"
                t0 = time.monotonic()
                quantize_int8(fp32, out, x_cal, settings)
                global_fit = fit_int8(out, x_fit, x_hold, s, settings, threads=args.threads)
                set_graph_scale(out, 1.0 / raw_scale)
                thr = choose_threshold(_scores(out, x_hold, args.threads) * raw_scale, rule)
                set_graph_scale(out, 1.0 / thr.raw_scale)
                hold = _scores(out, x_hold, args.threads)
                test = _scores(out, x_test, args.threads)
                auroc = _auroc(labels, test)
                result["variants"][name] = {
                    "settings": settings.describe(),
                    "image_auroc": auroc,
                    "auroc_loss": round(result["fp32"]["image_auroc"] - auroc, 4),
                    "per_class": _per_class(classes, labels, test),
                    "holdout_max_abs_vs_fp32": round(float(np.max(np.abs(hold - fp_hold))), 4),
                    "global_fit": global_fit,
                    "quantized_ops": quantized_op_types(out),
                    "build_s": round(time.monotonic() - t0, 1),
                }
                print(json.dumps({name: result["variants"][name]}), file=sys.stderr)
                paths[name] = out
            lat = latency(paths, x_test[:: max(1, len(x_test) // 32)], args.threads, args.runs)
    result["fp32"]["latency"] = lat.pop("fp32")
    for name, v in lat.items():
        result["variants"][name]["latency"] = v
    from bench.report import emit_json

    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
