"""The synthetic line: deterministic, MVTec layout, masks that match the defects."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.capture.synth import DEFECT_TYPES, part_rng, render_part, write_dataset
from edge.cli import main


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_and_layout(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    summary = write_dataset(a, good=5, defective=5, seed=7, size_px=64)
    write_dataset(b, good=5, defective=5, seed=7, size_px=64)
    write_dataset(c, good=5, defective=5, seed=8, size_px=64)
    da, db, dc = _tree_digest(a), _tree_digest(b), _tree_digest(c)
    assert da == db
    assert set(da) == set(dc)
    assert da["train/good/000.png"] != dc["train/good/000.png"]
    assert summary["train_good"] == 4
    assert summary["test_good"] == 1
    assert summary["test_defective"] == dict.fromkeys(DEFECT_TYPES, 1)
    for name in DEFECT_TYPES:
        img = cv2.imread(str(a / "test" / name / "000.png"), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(a / "ground_truth" / name / "000_mask.png"), cv2.IMREAD_UNCHANGED)
        assert img is not None
        assert mask is not None
        assert img.shape == (64, 64, 3)
        assert mask.shape == (64, 64)
        assert set(np.unique(mask)) <= {0, 255}
        assert mask.any(), name
    assert json.loads((a / "synth.json").read_text())["seed"] == 7


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_each_defect_has_a_small_nonempty_mask(defect: str) -> None:
    img, mask = render_part(part_rng(3, "x", 0), defect, 128)
    assert img.dtype == np.uint8
    assert img.shape == (128, 128, 3)
    assert mask.dtype == np.uint8
    assert 0 < int((mask > 0).sum()) < 128 * 128 // 8


def test_good_parts_vary_and_carry_no_mask() -> None:
    images = [render_part(part_rng(0, "good", i), None, 96) for i in range(4)]
    assert not any(mask.any() for _, mask in images)
    first = images[0][0].astype(int)
    diffs = [float(np.abs(first - im.astype(int)).mean()) for im, _ in images[1:]]
    assert min(diffs) > 2.0  # pose/lighting jitter: no two good parts are pixel-equal


def test_bad_arguments_are_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown defect"):
        render_part(rng, "rust", 64)
    with pytest.raises(ValueError, match="size_px"):
        render_part(rng, None, 8)


def test_synth_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    rc = main(
        [
            "synth",
            "--out",
            str(out),
            "--good",
            "3",
            "--defective",
            "2",
            "--seed",
            "1",
            "--size",
            "48",
            "--defects",
            "scratch,dent",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["test_defective"] == {"scratch": 1, "dent": 1}
    assert sorted(p.name for p in (out / "test").iterdir()) == ["dent", "good", "scratch"]
    assert (out / "ground_truth" / "dent" / "000_mask.png").is_file()
    # A second run into the same folder would mix datasets: refused unless --force.
    again = ["synth", "--out", str(out), "--good", "2", "--defective", "0", "--size", "48"]
    assert main(again) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert (out / "test" / "dent").is_dir()  # nothing was touched
    assert main([*again, "--force"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (out / "test").iterdir()) == ["good"]
    assert sorted(p.name for p in (out / "train" / "good").iterdir()) == ["000.png", "001.png"]
    rc = main(["synth", "--out", str(tmp_path / "x"), "--good", "0", "--defective", "1"])
    assert rc == 2
    assert "good must be at least 1" in capsys.readouterr().err
