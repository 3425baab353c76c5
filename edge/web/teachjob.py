"""The panel's teach job, run as a child process: teach, then score the dataset's test images.

    python -m edge.web.teachjob --dataset DIR --out PKG --result RESULT.json

Teaching is ``lineinspect teach --data DIR/train/good --out PKG``. Scoring
loads the package it wrote (hashes checked), runs its default graph in ONNX
Runtime on ``test/good`` and every ``test/<defect>`` folder (``train/good``
stands in for missing good test images, marked as such) and writes
``{"name", "version", "threshold", "good", "defective": {class: [scores]},
"good_source"}`` for the Teach page's score distributions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_SCORED_PER_CLASS = 200


def score_folder(session: Any, pkg: Any, folder: Path) -> list[float]:
    """Scores of the images in ``folder`` (unreadable files are skipped)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    out: list[float] = []
    for path in files[:MAX_SCORED_PER_CLASS]:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            continue
        (score, _amap) = session.run(["score", "anomaly_map"], {"image": pkg.preprocess(img)})
        out.append(float(np.asarray(score).reshape(-1)[0]))
    return out


def score_dataset(package: Path, dataset: Path) -> dict[str, Any]:
    import onnxruntime as ort

    from models.package import load_package

    pkg = load_package(package)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(pkg.graph_path()), opts, providers=["CPUExecutionProvider"])
    test = dataset / "test"
    good_dir = test / "good"
    good_source = "test/good"
    if not good_dir.is_dir() or not any(good_dir.iterdir()):
        good_dir = dataset / "train" / "good"
        good_source = "train/good"
    defective = {}
    if test.is_dir():
        for sub in sorted(p for p in test.iterdir() if p.is_dir() and p.name != "good"):
            defective[sub.name] = score_folder(session, pkg, sub)
    m = pkg.manifest
    return {
        "name": m.name,
        "version": m.version,
        "threshold": m.threshold.image,
        "good": score_folder(session, pkg, good_dir),
        "good_source": good_source,
        "defective": defective,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge.web.teachjob")
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    from edge.cli import main as cli_main

    version = f"1.{int(time.strftime('%Y%m%d'))}.{int(time.strftime('%H%M%S'))}"
    rc = cli_main(
        [
            "teach",
            "--data",
            str(args.dataset / "train" / "good"),
            "--out",
            str(args.out),
            "--name",
            args.dataset.name,
            "--version",
            version,
            "--force",
        ]
    )
    if rc != 0:
        return rc
    result = score_dataset(args.out, args.dataset)
    args.result.write_text(json.dumps(result), encoding="utf-8")
    print(
        f"scored {len(result['good'])} good and "
        f"{sum(len(v) for v in result['defective'].values())} defective images"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
