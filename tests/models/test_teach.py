"""Teaching end to end on a small synthetic line, and every bad input teach handles."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from edge.capture.synth import write_dataset
from models.images import ImageSetError, load_good_images
from models.package import load_package
from models.teach import TeachError, TeachSettings, teach

SMALL = TeachSettings(
    input_size=128,
    bank_size=300,
    calibration_images=8,
    n_reference=3,
    threads=2,
)


def _texture(rng: np.random.Generator, hw: tuple[int, int], color: bool) -> np.ndarray:
    noise = rng.normal(128, 40, size=(*hw, 3) if color else hw).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 2.0), 0, 255).astype(np.uint8)


def _flat_folder(
    root: Path, n: int, *, color: bool = False, hw: tuple[int, int] = (40, 48)
) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(root / f"img_{i:03d}.png"), _texture(rng, hw, color))
    return root


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic line with bad files mixed into train/good."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, good=44, defective=10, seed=3, size_px=128)
    good = root / "train" / "good"
    (good / "zero.png").write_bytes(b"")
    (good / "garbage.png").write_bytes(b"this is not a png")
    first = sorted(good.glob("*.png"))[0]
    img = cv2.imread(str(first))
    cv2.imwrite(str(good / "odd_size.png"), cv2.resize(img, (150, 97)))
    cv2.imwrite(str(good / "gray.png"), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    return root


@pytest.fixture(scope="module")
def package(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "model"
    return teach(synth, out, name="synth-test", version="1.0.0", settings=SMALL, progress=False)


@pytest.mark.slow
def test_package_loads_and_counts_bad_files(package: Path) -> None:
    with load_package(package) as pkg:
        m = pkg.manifest
        assert set(m.graphs) == {"fp32", "int8", "fp16"}
        assert m.default_graph in {"int8", "fp32"}
        assert "default_graph_rule" in m.metrics
        assert m.input.color == "rgb"
        assert m.input.channels == 3
        assert m.threshold.image == 1.0
        assert m.threshold.raw_scale > 0
        assert m.threshold.rule == "quantile"
        # the image-level Gaussian branch is on by default, its gain fitted on held-out goods
        assert m.method["global_stages"] == [3, 4, 5, 6]
        assert m.method["global_fit"]["gain"] > 0
        # ... and refitted on the INT8 graph's own pooled features for the INT8 graph
        assert m.metrics["int8_quantization"]["gaussian"] == "refit"
        assert m.metrics["int8_global_fit"]["gain"] > 0
        assert m.method["projection_dim"] == 0
        assert m.method["feature_dim"] == m.method["patch_dim"]
        images = m.method["images"]
        assert images["skipped"] == {"empty file": 1, "not a decodable image": 1}
        assert images["converted"]["gray to rgb"] == 1
        assert images["used"] == images["found"] - 2
        assert m.metrics["parity"]["fp32_vs_torch_max_abs"] < 1e-3


@pytest.mark.slow
def test_reference_scores_reproduce_with_onnxruntime(package: Path) -> None:
    with load_package(package) as pkg:
        m = pkg.manifest
        assert len(m.reference) == 3
        for graph in m.graphs:
            sess = ort.InferenceSession(
                str(pkg.graph_path(graph)), providers=["CPUExecutionProvider"]
            )
            for ref in m.reference:
                img = cv2.imread(str(package / ref.file), cv2.IMREAD_UNCHANGED)
                score, amap = sess.run(["score", "anomaly_map"], {"image": pkg.preprocess(img)})
                assert score.shape == (1,)
                assert amap.shape == (1, 128, 128)
                assert abs(float(score[0]) - ref.scores[graph]) <= m.reference_tolerance[graph]


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MVTec layout: smooth colour textures; defects carry a dark blot of random size/place."""
    root = tmp_path_factory.mktemp("blobs")
    rng = np.random.default_rng(5)
    for split, n_good, n_bad in (("train", 30, 0), ("test", 10, 10)):
        (root / split / "good").mkdir(parents=True)
        for i in range(n_good):
            cv2.imwrite(str(root / split / "good" / f"{i:03d}.png"), _texture(rng, (96, 96), True))
        if n_bad:
            (root / split / "blot").mkdir()
        for i in range(n_bad):
            img = _texture(rng, (96, 96), True)
            c = (int(rng.integers(20, 76)), int(rng.integers(20, 76)))
            cv2.circle(img, c, int(rng.integers(5, 10)), (20, 20, 20), -1)
            cv2.imwrite(str(root / split / "blot" / f"{i:03d}.png"), img)
    return root


def _scores(pkg_dir: Path, data: Path, graph: str) -> tuple[np.ndarray, np.ndarray]:
    with load_package(pkg_dir) as pkg:
        sess = ort.InferenceSession(str(pkg.graph_path(graph)), providers=["CPUExecutionProvider"])
        labels, scores = [], []
        for folder in sorted((data / "test").iterdir()):
            for f in sorted(folder.glob("*.png")):
                img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
                scores.append(float(sess.run(["score"], {"image": pkg.preprocess(img)})[0][0]))
                labels.append(folder.name != "good")
    return np.array(labels), np.array(scores)


@pytest.mark.slow
def test_defective_parts_score_above_good_ones(blobs: Path, tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    out = teach(
        blobs, tmp_path / "pkg", name="blobs", version="0.1.0", settings=SMALL, progress=False
    )
    for graph in ("fp32", "int8"):
        labels, scores = _scores(out, blobs, graph)
        auroc = roc_auc_score(labels, scores)
        print(f"blobs {graph} image AUROC {auroc:.3f}")
        assert auroc > 0.9, graph
        assert np.mean(scores[labels] > 1.0) > 0.5, graph  # most defects flagged at 1.0


@pytest.mark.slow
def test_projected_features_teach_and_still_detect(blobs: Path, tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    settings = replace(SMALL, projection_dim=32, fp16=False)
    out = teach(
        blobs, tmp_path / "pkg", name="p", version="0.1.0", settings=settings, progress=False
    )
    manifest = json.loads((out / "manifest.json").read_text())
    method = manifest["method"]
    assert method["projection_dim"] == 32
    assert method["feature_dim"] == 32  # the bank is stored projected
    assert method["patch_dim"] > 32
    assert manifest["metrics"]["parity"]["fp32_vs_torch_max_abs"] < 1e-3
    for graph in ("fp32", "int8"):
        labels, scores = _scores(out, blobs, graph)
        auroc = roc_auc_score(labels, scores)
        print(f"blobs, projection 32, {graph} image AUROC {auroc:.3f}")
        assert auroc > 0.9, graph


def test_bad_projection_dim_is_refused_before_fitting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="projection_dim must be >= 0"):
        TeachSettings(projection_dim=-1)
    data = _flat_folder(tmp_path / "flat", 12)
    with pytest.raises(TeachError, match="projection_dim 5000 exceeds"):
        teach(
            data,
            tmp_path / "pkg",
            settings=replace(SMALL, projection_dim=5000),
            progress=False,
        )


@pytest.mark.slow
def test_gray_folder_teaches_a_one_channel_graph(tmp_path: Path) -> None:
    data = _flat_folder(tmp_path / "flat", 14, hw=(61, 47))
    out = teach(
        data,
        tmp_path / "pkg",
        name="gray",
        version="0.1.0",
        settings=TeachSettings(input_size=64, bank_size=50, int8=False, fp16=False, n_reference=2),
        progress=False,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["color"] == "gray"
    assert manifest["input"]["channels"] == 1
    assert manifest["method"]["images"]["converted"] == {"resized from mixed sizes": 14} or (
        manifest["method"]["images"]["converted"] == {}
    )
    sess = ort.InferenceSession(str(out / "model_fp32.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [1, 64, 64]


# --------------------------------------------------------------------------- bad input


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSetError, match="no image files"):
        teach(tmp_path / "empty", tmp_path / "out", settings=SMALL, progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ImageSetError, match="not a folder"):
        load_good_images(tmp_path / "nope")


def test_too_few_usable_images_is_a_clear_error(tmp_path: Path) -> None:
    data = _flat_folder(tmp_path / "few", 6)
    (data / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ImageSetError, match=r"only 6 usable .* need at least 10.*1 skipped"):
        load_good_images(data, min_images=10)


def test_bad_files_are_skipped_and_counted(tmp_path: Path) -> None:
    data = _flat_folder(tmp_path / "mixed", 10)
    (data / "zero.png").write_bytes(b"")
    (data / "text.png").write_text("hello")
    (data / "notes.txt").write_text("ignored: not an image suffix")
    cv2.imwrite(str(data / "tiny.png"), np.zeros((8, 8), np.uint8))
    s = load_good_images(data, min_images=10)
    assert s.report.used == 10
    assert s.report.found == 13
    assert s.report.skipped == {
        "empty file": ["zero.png"],
        "not a decodable image": ["text.png"],
        "smaller than 16 px": ["tiny.png"],
    }
    assert "3 skipped" not in s.report.summary()  # reasons are listed one by one
    assert "empty file: zero.png" in s.report.summary()


def test_gray_mixed_with_colour_becomes_rgb(tmp_path: Path) -> None:
    data = _flat_folder(tmp_path / "gc", 10, color=True)
    _flat_folder(tmp_path / "g", 3)
    for i, f in enumerate(sorted((tmp_path / "g").iterdir())):
        f.rename(data / f"gray_{i}.png")
    s = load_good_images(data)
    assert s.color == "rgb"
    assert s.report.converted["gray to rgb"] == 3


def test_sixteen_bit_and_alpha_images_are_converted(tmp_path: Path) -> None:
    data = _flat_folder(tmp_path / "d", 10, color=True)
    cv2.imwrite(str(data / "deep.png"), (np.ones((32, 32), np.uint16) * 40000))
    cv2.imwrite(str(data / "alpha.png"), np.full((32, 32, 4), 200, np.uint8))
    s = load_good_images(data)
    assert s.report.used == 12
    deep = s.images[[p.name for p in s.paths].index("deep.png")]
    assert deep.dtype == np.uint8
    assert int(deep[0, 0]) == round(40000 / 257)


def test_odd_sizes_are_resized_and_counted(tmp_path: Path) -> None:
    data = _flat_folder(tmp_path / "odd", 10, hw=(40, 48))
    _flat_folder(tmp_path / "odd2", 2, hw=(77, 19))
    for i, f in enumerate(sorted((tmp_path / "odd2").iterdir())):
        f.rename(data / f"odd_{i}.png")
    s = load_good_images(data)
    assert s.report.converted["resized from mixed sizes"] == 12


def test_mvtec_layout_uses_train_good(tmp_path: Path) -> None:
    _flat_folder(tmp_path / "ds" / "train" / "good", 11)
    _flat_folder(tmp_path / "ds" / "test" / "good", 3)
    assert load_good_images(tmp_path / "ds").report.found == 11


def test_non_empty_output_and_bad_version_fail_before_teaching(tmp_path: Path) -> None:
    data = _flat_folder(tmp_path / "ok", 12)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(TeachError, match="not empty"):
        teach(data, out, settings=SMALL, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    with pytest.raises(ValueError, match="semantic version"):
        teach(data, tmp_path / "o2", version="v1", settings=SMALL, progress=False)
