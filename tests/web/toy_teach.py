"""A stand-in for `lineinspect teach` in the panel's teach tests: a real toy package, real scoring.

    python toy_teach.py --dataset DIR --out PKG --result RESULT.json

Writes models.toy_package's brightness package (real ONNX graphs, hashes)
instead of teaching, then runs the panel's own scoring pass
(edge.web.teachjob.score_dataset) on the dataset's test images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge.web.teachjob import score_dataset
from models.toy_package import build_toy_package


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args()
    if (args.dataset / "FAIL").exists():
        print("teaching failed on purpose", file=sys.stderr)
        return 3
    build_toy_package(args.out, name=args.dataset.name, version="2.0.0", raw_scale=0.76)
    args.result.write_text(json.dumps(score_dataset(args.out, args.dataset)), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
