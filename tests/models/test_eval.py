"""Evaluation on a synthetic MVTec folder whose metrics are known exactly.

The toy package's score is the brightest pixel (grey level / 255 / 0.5). Good
parts are noise in 70..90 (score 90/127.5 = 0.706). Defect classes:

- ``bright`` spot at 200: score 1.569 > threshold 1.0 -> caught.
- ``faint`` spot at 110: score 0.863, above every good part but below the
  threshold -> escapes, yet ranks perfectly.
- ``dark`` flat 60 with a spot at 20: score 0.471, below every good part ->
  class AUROC 0, and its defect pixels are darker than every normal pixel.

All spots are discs of the same size, so pixel AUROC and AUPRO are 10/15.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from models.evaluate import DatasetError, discover, evaluate, run_evaluation
from models.package import PackageError, PackageErrorCode, load_package, pack_tar
from models.report import write_report
from models.toy_package import build_toy_package
from models.toy_package import write_toy_dataset as make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds") / "toy")


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_package(tmp_path_factory.mktemp("pkg") / "toy")


@pytest.fixture(scope="module")
def result(
    package: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    png = tmp_path_factory.mktemp("rep") / "report.png"
    res = evaluate(package, dataset, report_png=png)
    res["_png"] = str(png)
    return res


def test_json_shape(result: dict[str, Any]) -> None:
    assert set(result["graphs"]) == {"fp32", "int8"}
    for g in result["graphs"].values():
        for key in (
            "image_auroc",
            "pixel_auroc",
            "pixel_aupro",
            "f1",
            "false_reject_rate",
            "escape_rate",
            "latency_ms_p50",
            "per_class",
        ):
            assert key in g
        assert set(g["per_class"]) == {"good", "bright", "faint", "dark"}
    assert result["data"]["classes"] == {"good": 10, "bright": 5, "faint": 5, "dark": 5}
    assert result["package"]["model_id"] == "toy-brightness@1.0.0"
    assert result["runtime"]["providers"] == ["CPUExecutionProvider"]
    json.dumps({k: v for k, v in result.items() if k != "_png"}, allow_nan=False)


@pytest.mark.parametrize("graph", ["fp32", "int8"])
def test_known_metrics(result: dict[str, Any], graph: str) -> None:
    g = result["graphs"][graph]
    assert g["image_auroc"] == pytest.approx(10 / 15)
    assert g["pixel_auroc"] == pytest.approx(10 / 15, abs=1e-6)
    assert g["pixel_aupro"] == pytest.approx(10 / 15, abs=2e-3)
    assert g["false_reject_rate"] == 0.0
    assert g["escape_rate"] == pytest.approx(10 / 15)
    assert g["f1"] == pytest.approx(0.5)  # tp 5, fp 0, fn 10
    assert g["f1_best"] == pytest.approx(0.8)  # threshold between good and faint
    assert g["confusion"] == {"true_ng": 5, "false_ng": 0, "escaped": 10, "true_ok": 10}
    assert g["latency_ms_p50"] > 0
    assert g["n_pixel_masks"] == 15
    pc = g["per_class"]
    assert pc["good"]["false_reject_rate"] == 0.0
    assert pc["good"]["score_max"] == pytest.approx(90 / 127.5, abs=1e-5)
    assert pc["bright"]["n"] == 5
    assert (pc["bright"]["image_auroc"], pc["bright"]["escape_rate"]) == (1.0, 0.0)
    assert (pc["faint"]["image_auroc"], pc["faint"]["escape_rate"]) == (1.0, 1.0)
    assert (pc["dark"]["image_auroc"], pc["dark"]["escape_rate"]) == (0.0, 1.0)
    assert pc["bright"]["pixel_auroc"] == pytest.approx(1.0)
    assert pc["dark"]["pixel_auroc"] == pytest.approx(0.0)
    assert pc["faint"]["score_mean"] == pytest.approx(110 / 127.5, abs=1e-5)


def test_comparison(result: dict[str, Any]) -> None:
    cmp = result["comparison"]["int8"]
    assert cmp == {
        "image_auroc_delta": 0.0,
        "score_abs_diff_max": 0.0,
        "score_abs_diff_p50": 0.0,
        "verdicts_changed": 0,
    }


def test_report_png(result: dict[str, Any]) -> None:
    png = Path(result["_png"])
    assert png.stat().st_size > 20_000
    img = cv2.imread(str(png))
    assert img is not None
    assert img.shape[0] > 500
    assert img.shape[1] > 1000
    assert img.std() > 10  # not a blank canvas


def test_tar_package_signed_and_test_folder_directly(
    package: Path, dataset: Path, tmp_path: Path
) -> None:
    key = Ed25519PrivateKey.generate()
    tar_path = pack_tar(package, tmp_path / "toy.tar")
    from models.package import sign_package

    sign_package(tar_path, key)
    res = evaluate(tar_path, dataset / "test", graphs=["fp32"], trusted_keys=[key.public_key()])
    assert list(res["graphs"]) == ["fp32"]
    assert res["package"]["signed_by"] is not None
    assert res["graphs"]["fp32"]["image_auroc"] == pytest.approx(10 / 15)
    with pytest.raises(PackageError) as ei:
        evaluate(tar_path, dataset, trusted_keys=[Ed25519PrivateKey.generate().public_key()])
    assert ei.value.code is PackageErrorCode.SIGNATURE_INVALID


def test_missing_masks_and_unreadable_images(package: Path, tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", seed=1)
    for m in (root / "ground_truth" / "dark").iterdir():
        m.unlink()
    (root / "test" / "bright" / "broken.png").write_bytes(b"not a png")
    ev = run_evaluation(package, root, graphs=["fp32", "fp16"])
    try:
        g = ev.result["graphs"]["fp32"]
        assert list(ev.result["graphs"]) == ["fp32"]  # fp16 absent: skipped
        assert ev.result["data"]["skipped"] == [str(root / "test" / "bright" / "broken.png")]
        assert g["n_pixel_masks"] == 10
        assert g["pixel_auroc"] == pytest.approx(1.0)  # only bright and faint have masks
        assert g["per_class"]["dark"]["pixel_auroc"] is None
        assert g["image_auroc"] == pytest.approx(10 / 15)  # dark still counts per image
        png = write_report(ev, tmp_path / "r" / "report.png", worst_per_kind=3)
        assert png.stat().st_size > 10_000
    finally:
        ev.package.close()


def test_good_only_folder(package: Path, tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    for cls in ("bright", "faint", "dark"):
        for p in (root / "test" / cls).iterdir():
            p.unlink()
        (root / "test" / cls).rmdir()
    res = evaluate(package, root, graphs=["int8"], report_png=tmp_path / "r.png")
    g = res["graphs"]["int8"]
    assert g["image_auroc"] is None
    assert g["pixel_auroc"] is None
    assert g["escape_rate"] is None
    assert g["false_reject_rate"] == 0.0
    assert (tmp_path / "r.png").stat().st_size > 0


def test_bad_data_folders(package: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a folder"):
        discover(tmp_path / "missing")
    (tmp_path / "empty" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no test images"):
        discover(tmp_path / "empty")
    bad = tmp_path / "undecodable" / "test" / "good"
    bad.mkdir(parents=True)
    (bad / "a.png").write_bytes(b"xx")
    with pytest.raises(DatasetError, match="decodes"):
        evaluate(package, tmp_path / "undecodable")
    with pytest.raises(PackageError) as ei:
        evaluate(package, tmp_path / "undecodable", graphs=["fp16"])
    assert ei.value.code is PackageErrorCode.UNKNOWN_GRAPH


def test_mask_names_and_layout(dataset: Path) -> None:
    ds = discover(dataset)
    assert ds.classes == {"bright": 5, "dark": 5, "faint": 5, "good": 10}
    bad = [s for s in ds.samples if s.defective]
    assert all(s.mask_path is not None and s.mask_path.name.endswith("_mask.png") for s in bad)
    assert all(s.mask_path is None for s in ds.samples if not s.defective)


def test_package_object_is_reused(package: Path, dataset: Path) -> None:
    with load_package(package) as pkg:
        res = evaluate(pkg, dataset, graphs=["fp32"])
        assert res["graphs"]["fp32"]["image_auroc"] == pytest.approx(10 / 15)
        assert pkg.graph_path("fp32").is_file()  # still open after evaluate


def _reference_aupro(maps: list[np.ndarray[Any, Any]], masks: list[np.ndarray[Any, Any]]) -> float:
    """Brute-force AUPRO: thresholds on a fine grid, PRO averaged over connected regions."""
    neg = np.concatenate([m[~k] for m, k in zip(maps, masks, strict=True)])
    regions = []
    for m, k in zip(maps, masks, strict=True):
        n, comp = cv2.connectedComponents(k.astype(np.uint8), connectivity=8)
        regions += [m[comp == c] for c in range(1, n)]
    thresholds = np.quantile(neg, np.linspace(1.0, 0.6, 4001))
    fpr = np.array([(neg >= t).mean() for t in thresholds])
    pro = np.array([np.mean([(r >= t).mean() for r in regions]) for t in thresholds])
    keep = fpr <= 0.3
    f, p = np.append(fpr[keep], 0.3), np.append(pro[keep], np.interp(0.3, fpr, pro))
    return float(np.sum((f[1:] - f[:-1]) * (p[1:] + p[:-1]) / 2) / 0.3)


def test_pixel_metrics_match_exact_computation() -> None:
    """Histogram AUROC and AUPRO agree with sklearn / a brute-force PRO on noisy maps."""
    from sklearn.metrics import roc_auc_score

    from models.evaluate import GraphRun, Sample, _pixel_metrics

    rng = np.random.default_rng(3)
    maps, masks, samples = [], [], []
    for i in range(12):
        m = rng.normal(0.0, 1.0, (48, 48)).astype(np.float32)
        k = np.zeros((48, 48), np.uint8)
        defective = i >= 4
        if defective:
            for _ in range(2):
                c = (int(rng.integers(6, 42)), int(rng.integers(6, 42)))
                cv2.circle(k, c, int(rng.integers(2, 6)), 1, -1)
            m[k > 0] += rng.uniform(0.0, 2.5)
        maps.append(m)
        masks.append(k.astype(bool))
        samples.append(Sample(Path(f"{i}.png"), "dent" if defective else "good", None))
    run = GraphRun("fp32", np.zeros(12), [], [], maps, list(masks))
    auroc, aupro, per_class = _pixel_metrics(run, samples)
    labels = np.concatenate([k.ravel() for k in masks])
    values = np.concatenate([m.ravel() for m in maps])
    assert auroc == pytest.approx(roc_auc_score(labels, values), abs=1e-4)
    assert per_class["dent"] == pytest.approx(auroc, abs=1e-9)
    assert aupro == pytest.approx(_reference_aupro(maps, masks), abs=5e-3)
    assert aupro is not None
    assert 0.2 < aupro < 0.95  # a non-trivial case
