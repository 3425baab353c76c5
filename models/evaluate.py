"""Evaluate a model package on a labelled MVTec-layout folder with ONNX Runtime.

``evaluate(package, data)`` scores every test image with each graph of the
package (the package's own preprocessing, real ``onnxruntime`` sessions) and
returns a JSON-ready dict::

    {"package": {...}, "data": {...}, "runtime": {...},
     "graphs": {"fp32": {image_auroc, pixel_auroc, pixel_aupro, f1, f1_best,
                         false_reject_rate, escape_rate, latency_ms_p50, per_class, ...},
                "int8": {...}},
     "comparison": {"int8": {"image_auroc_delta": ..., "score_abs_diff_max": ...}}}

Definitions (documented in docs/model-package.md):

- A part is NG when ``score >= threshold.image`` (the manifest threshold; as edge.decide).
- ``false_reject_rate``: good parts called NG / good parts.
  ``escape_rate``: defective parts called OK / defective parts.
  ``f1``: F1 of the defective class at the manifest threshold; ``f1_best`` the
  best F1 over all thresholds (an upper bound, not a promise).
- ``pixel_auroc`` over every pixel of every test image at the anomaly map's
  resolution (capped at ``max_map_side``), masks resized with nearest
  neighbour; computed exactly up to ties within 1/65536 of the score range.
- ``pixel_aupro``: area under the per-region-overlap curve up to 30 % pixel
  false-positive rate, divided by 0.3 (Bergmann et al., MVTec AD).
- ``latency_ms_p50``: median wall time of ``session.run`` at batch 1 (after 3
  warm-up runs), preprocessing excluded (``preprocess_ms_p50`` reports it).

Nothing here imports torch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from models.package import ModelPackage, PackageError, PackageErrorCode, load_package

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm"})
GOOD = "good"
PRO_MAX_FPR = 0.3
_HIST_BINS = 1 << 16
_WARMUP_RUNS = 3


class DatasetError(ValueError):
    """The evaluation folder is missing, empty or not in the MVTec layout."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One test image: its class (``good`` or a defect name) and its mask, if any."""

    path: Path
    label: str
    mask_path: Path | None

    @property
    def defective(self) -> bool:
        return self.label != GOOD


@dataclass(frozen=True, slots=True)
class Dataset:
    """The test split of an MVTec-layout folder."""

    root: Path
    samples: tuple[Sample, ...]

    @property
    def classes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.samples:
            out[s.label] = out.get(s.label, 0) + 1
        return out


def discover(data_dir: Path) -> Dataset:
    """Find the test images of an MVTec-layout folder.

    ``data_dir`` is either the category folder (holding ``test/`` and
    ``ground_truth/``) or the ``test/`` folder itself. ``test/good`` holds
    good images, every other ``test/<defect>/`` defective ones, with masks at
    ``ground_truth/<defect>/<stem>_mask.png`` (or ``<stem>.png``); a missing
    mask only removes that image from the pixel metrics.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir} is not a folder")
    test_dir = data_dir / "test" if (data_dir / "test").is_dir() else data_dir
    gt_dir = test_dir.parent / "ground_truth"
    samples: list[Sample] = []
    for class_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        label = class_dir.name
        for img in sorted(class_dir.iterdir()):
            if img.name.startswith(".") or img.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            mask: Path | None = None
            if label != GOOD:
                for cand in (
                    gt_dir / label / f"{img.stem}_mask.png",
                    gt_dir / label / f"{img.stem}.png",
                ):
                    if cand.is_file():
                        mask = cand
                        break
            samples.append(Sample(img, label, mask))
    if not samples:
        raise DatasetError(
            f"no test images in {test_dir}: expected test/good/ and test/<defect>/ folders"
        )
    return Dataset(data_dir, tuple(samples))


# --------------------------------------------------------------------------- metric helpers


def _auroc(labels: npt.NDArray[np.bool_], scores: npt.NDArray[np.floating[Any]]) -> float | None:
    from sklearn.metrics import roc_auc_score

    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, scores))


def _hist_auroc(pos: npt.NDArray[np.int64], neg: npt.NDArray[np.int64]) -> float | None:
    """AUROC from score histograms on shared bins (ties within a bin count half)."""
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return None
    neg_below = np.cumsum(neg) - neg
    wins = (pos.astype(np.float64) * (neg_below + 0.5 * neg)).sum()
    return float(wins / (float(n_pos) * float(n_neg)))


def _rate(flags: npt.NDArray[np.bool_]) -> float | None:
    return float(flags.mean()) if flags.size else None


def _f1(tp: int, fp: int, fn: int) -> float | None:
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else None


def _best_f1(labels: npt.NDArray[np.bool_], scores: npt.NDArray[np.float64]) -> float | None:
    from sklearn.metrics import precision_recall_curve

    if not labels.any():
        return None
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(f1.max())


def _round(x: float | None, ndigits: int = 6) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), ndigits)


# --------------------------------------------------------------------------- running


@dataclass
class GraphRun:
    """Raw outputs of one graph over the dataset (kept for the report)."""

    variant: str
    scores: npt.NDArray[np.float64]
    latency_ms: list[float]
    preprocess_ms: list[float]
    maps: list[npt.NDArray[np.float32]]
    masks: list[npt.NDArray[np.bool_] | None]
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Evaluation:
    """Everything one evaluation produced: the JSON-ready ``result`` and the raw runs."""

    result: dict[str, Any]
    samples: tuple[Sample, ...]
    runs: dict[str, GraphRun]
    threshold: float
    pixel_threshold: float
    package: ModelPackage


def _session(path: Path, providers: Sequence[str], threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))


def _read_mask(path: Path, shape_hw: tuple[int, int]) -> npt.NDArray[np.bool_] | None:
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        return None
    if m.shape != shape_hw:
        m = cv2.resize(m, (shape_hw[1], shape_hw[0]), interpolation=cv2.INTER_NEAREST)
    return np.asarray(m > 127)


def _shrink(amap: npt.NDArray[np.float32], max_side: int) -> npt.NDArray[np.float32]:
    h, w = amap.shape
    if max(h, w) <= max_side:
        return np.ascontiguousarray(amap, dtype=np.float32)
    f = max_side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(cv2.resize(amap, size, interpolation=cv2.INTER_AREA), dtype=np.float32)


def _run_graph(
    pkg: ModelPackage,
    variant: str,
    *,
    images: Sequence[npt.NDArray[np.uint8]],
    samples: Sequence[Sample],
    providers: Sequence[str],
    threads: int,
    max_map_side: int,
    progress: bool,
) -> GraphRun:
    from tqdm import tqdm

    session = _session(pkg.graph_path(variant), providers, threads)
    if images:
        warm = pkg.preprocess(images[0])
        for _ in range(_WARMUP_RUNS):
            session.run(None, {"image": warm})
    scores: list[float] = []
    lat: list[float] = []
    pre: list[float] = []
    maps: list[npt.NDArray[np.float32]] = []
    masks: list[npt.NDArray[np.bool_] | None] = []
    bar = tqdm(
        list(zip(images, samples, strict=True)),
        desc=f"eval {variant}",
        unit="img",
        disable=not progress,
    )
    for img, sample in bar:
        t0 = time.perf_counter()
        x = pkg.preprocess(img)
        t1 = time.perf_counter()
        score, amap = session.run(["score", "anomaly_map"], {"image": x})
        t2 = time.perf_counter()
        pre.append((t1 - t0) * 1000.0)
        lat.append((t2 - t1) * 1000.0)
        scores.append(float(np.asarray(score).reshape(-1)[0]))
        small = _shrink(np.asarray(amap, dtype=np.float32)[0], max_map_side)
        maps.append(small)
        if sample.defective:
            masks.append(
                _read_mask(sample.mask_path, small.shape) if sample.mask_path is not None else None
            )
        else:
            masks.append(np.zeros(small.shape, dtype=np.bool_))
    return GraphRun(variant, np.asarray(scores, dtype=np.float64), lat, pre, maps, masks)


# --------------------------------------------------------------------------- metrics


def _pixel_metrics(
    run: GraphRun, samples: Sequence[Sample]
) -> tuple[float | None, float | None, dict[str, float | None]]:
    """Pixel AUROC, AUPRO (global) and pixel AUROC per defect class."""
    usable = [i for i, m in enumerate(run.masks) if m is not None]
    if not any(samples[i].defective for i in usable):
        return None, None, {}
    lo = min(float(run.maps[i].min()) for i in usable)
    hi = max(float(run.maps[i].max()) for i in usable)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None, None, {}
    if hi <= lo:
        hi = lo + 1e-6
    edges = np.linspace(lo, hi, _HIST_BINS + 1)
    per_unit = _HIST_BINS / (hi - lo)
    pos_hist: dict[str, npt.NDArray[np.int64]] = {}
    neg_hist: dict[str, npt.NDArray[np.int64]] = {}
    regions: list[npt.NDArray[np.float32]] = []
    zero = np.zeros(_HIST_BINS, dtype=np.int64)
    for i in usable:
        amap, mask = run.maps[i], run.masks[i]
        assert mask is not None
        label = samples[i].label
        # bin index of every pixel (same bins as np.histogram over [lo, hi])
        bins = np.minimum(
            ((amap.astype(np.float64) - lo) * per_unit).astype(np.int64), _HIST_BINS - 1
        )
        neg_hist[label] = neg_hist.get(label, zero) + np.bincount(bins[~mask], minlength=_HIST_BINS)
        pos_vals = amap[mask]
        if pos_vals.size:
            pos_hist[label] = pos_hist.get(label, zero) + np.bincount(
                bins[mask], minlength=_HIST_BINS
            )
            n_comp, comp = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
            for c in range(1, n_comp):
                regions.append(np.sort(amap[comp == c]))
    all_pos = sum(pos_hist.values(), zero)
    all_neg = sum(neg_hist.values(), zero)
    pixel_auroc = _hist_auroc(all_pos, all_neg)
    per_class: dict[str, float | None] = {}
    good_neg = neg_hist.get(GOOD, zero)
    for label, ph in pos_hist.items():
        per_class[label] = _hist_auroc(ph, good_neg + neg_hist.get(label, zero))
    aupro = _aupro(all_neg, edges, regions)
    return pixel_auroc, aupro, per_class


def _aupro(
    neg: npt.NDArray[np.int64],
    edges: npt.NDArray[np.float64],
    regions: list[npt.NDArray[np.float32]],
) -> float | None:
    """Normalised area under PRO(FPR) for FPR in [0, 0.3], thresholds at bin edges."""
    n_neg = int(neg.sum())
    if n_neg == 0 or not regions:
        return None
    # fpr[j] = fraction of negative pixels >= edges[j], for j = 0..bins (decreasing in j)
    above = np.concatenate([np.cumsum(neg[::-1])[::-1], [0]])
    fpr_all = above / n_neg
    # thresholds from high (fpr 0) to low, keep those with fpr <= 0.3, thinned to ~1000
    idx = np.nonzero(fpr_all <= PRO_MAX_FPR)[0][::-1]
    if idx.size > 1000:
        idx = idx[np.linspace(0, idx.size - 1, 1000).astype(int)]
    thresholds = edges[idx]
    fpr = fpr_all[idx]
    pro = np.zeros(idx.size, dtype=np.float64)
    for r in regions:
        pro += (r.size - np.searchsorted(r, thresholds, side="left")) / r.size
    pro /= len(regions)
    # extend to exactly FPR = 0.3 by interpolating towards the next lower threshold
    nxt = int(idx.min()) - 1 if idx.size else len(edges) - 1
    if fpr[-1] < PRO_MAX_FPR and nxt >= 0:
        t_next = edges[nxt]
        pro_next = float(
            np.mean([(r.size - np.searchsorted(r, t_next, side="left")) / r.size for r in regions])
        )
        f_next = float(fpr_all[nxt])
        frac = (PRO_MAX_FPR - fpr[-1]) / max(f_next - fpr[-1], 1e-12)
        fpr = np.append(fpr, PRO_MAX_FPR)
        pro = np.append(pro, pro[-1] + frac * (pro_next - pro[-1]))
    if fpr[0] > 0:
        fpr = np.insert(fpr, 0, 0.0)
        pro = np.insert(pro, 0, 0.0)
    area = float(np.sum((fpr[1:] - fpr[:-1]) * (pro[1:] + pro[:-1]) / 2.0))
    return area / PRO_MAX_FPR


def _graph_metrics(run: GraphRun, samples: Sequence[Sample], threshold: float) -> dict[str, Any]:
    labels = np.asarray([s.defective for s in samples], dtype=np.bool_)
    scores = run.scores
    pred_ng = scores >= threshold
    good, bad = ~labels, labels
    tp = int((pred_ng & bad).sum())
    fp = int((pred_ng & good).sum())
    fn = int((~pred_ng & bad).sum())
    pixel_auroc, aupro, pixel_per_class = _pixel_metrics(run, samples)
    per_class: dict[str, dict[str, Any]] = {}
    for label in sorted({s.label for s in samples}):
        sel = np.asarray([s.label == label for s in samples], dtype=np.bool_)
        cls_scores = scores[sel]
        entry: dict[str, Any] = {
            "n": int(sel.sum()),
            "score_mean": _round(float(cls_scores.mean())),
            "score_max": _round(float(cls_scores.max())),
            "score_min": _round(float(cls_scores.min())),
        }
        if label == GOOD:
            entry["false_reject_rate"] = _round(_rate(pred_ng[sel]))
        else:
            both = sel | good
            entry["image_auroc"] = _round(_auroc(labels[both], scores[both]))
            entry["pixel_auroc"] = _round(pixel_per_class.get(label))
            entry["escape_rate"] = _round(_rate(~pred_ng[sel]))
            entry["detection_rate"] = _round(_rate(pred_ng[sel]))
        per_class[label] = entry
    lat = np.asarray(run.latency_ms)
    pre = np.asarray(run.preprocess_ms)
    n_masks = sum(
        1 for s, m in zip(samples, run.masks, strict=True) if s.defective and m is not None
    )
    return {
        "image_auroc": _round(_auroc(labels, scores)),
        "pixel_auroc": _round(pixel_auroc),
        "pixel_aupro": _round(aupro),
        "f1": _round(_f1(tp, fp, fn)),
        "f1_best": _round(_best_f1(labels, scores)),
        "threshold": threshold,
        "false_reject_rate": _round(_rate(pred_ng[good])),
        "escape_rate": _round(_rate(~pred_ng[bad])),
        "confusion": {
            "true_ng": tp,
            "false_ng": fp,
            "escaped": fn,
            "true_ok": int((~pred_ng & good).sum()),
        },
        "latency_ms_p50": _round(float(np.median(lat)), 3) if lat.size else None,
        "latency_ms_p90": _round(float(np.percentile(lat, 90)), 3) if lat.size else None,
        "preprocess_ms_p50": _round(float(np.median(pre)), 3) if pre.size else None,
        "n_good": int(good.sum()),
        "n_defective": int(bad.sum()),
        "n_pixel_masks": n_masks,
        "per_class": per_class,
    }


def run_evaluation(
    package_path: Path | ModelPackage,
    data_dir: Path,
    graphs: Sequence[str] | None = ("fp32", "int8"),
    providers: Sequence[str] = ("CPUExecutionProvider",),
    *,
    threads: int = 2,
    trusted_keys: Sequence[Ed25519PublicKey] | None = None,
    max_map_side: int = 256,
    progress: bool = False,
) -> Evaluation:
    """Score ``data_dir`` with each graph; the raw runs plus the JSON-ready result.

    ``graphs`` lists variants to run; those the package lacks are skipped
    with a warning (``None`` runs every graph of the package). Unreadable
    images are skipped and listed under ``data.skipped``.
    """
    import onnxruntime as ort

    pkg = (
        package_path
        if isinstance(package_path, ModelPackage)
        else load_package(Path(package_path), trusted_keys)
    )
    dataset = discover(data_dir)
    wanted = list(pkg.graph_variants) if graphs is None else list(graphs)
    variants = [g for g in wanted if g in pkg.graph_variants]
    for g in wanted:
        if g not in pkg.graph_variants:
            log.warning("package %s has no %s graph; skipped", pkg.model_id, g)
    if not variants:
        raise PackageError(
            PackageErrorCode.UNKNOWN_GRAPH,
            f"none of {wanted} is in {pkg.model_id} (has {', '.join(pkg.graph_variants)})",
        )
    images: list[npt.NDArray[np.uint8]] = []
    samples: list[Sample] = []
    skipped: list[str] = []
    for s in dataset.samples:
        img = cv2.imread(str(s.path), cv2.IMREAD_COLOR)
        if img is None or img.size == 0:
            skipped.append(str(s.path))
            log.warning("cannot decode %s; skipped", s.path)
            continue
        images.append(np.asarray(img, dtype=np.uint8))
        samples.append(s)
    if not samples:
        raise DatasetError(f"none of the {len(dataset.samples)} test images in {data_dir} decodes")
    threshold = float(pkg.manifest.threshold.image)
    runs: dict[str, GraphRun] = {}
    for v in variants:
        run = _run_graph(
            pkg,
            v,
            images=images,
            samples=samples,
            providers=providers,
            threads=threads,
            max_map_side=max_map_side,
            progress=progress,
        )
        run.metrics = _graph_metrics(run, samples, threshold)
        runs[v] = run
    comparison: dict[str, Any] = {}
    if "fp32" in runs:
        ref = runs["fp32"]
        for v, run in runs.items():
            if v == "fp32":
                continue
            diff = np.abs(run.scores - ref.scores)
            a, b = run.metrics["image_auroc"], ref.metrics["image_auroc"]
            comparison[v] = {
                "image_auroc_delta": _round(a - b) if a is not None and b is not None else None,
                "score_abs_diff_max": _round(float(diff.max())),
                "score_abs_diff_p50": _round(float(np.median(diff))),
                "verdicts_changed": int(
                    ((run.scores >= threshold) != (ref.scores >= threshold)).sum()
                ),
            }
    classes: dict[str, int] = {}
    for s in samples:
        classes[s.label] = classes.get(s.label, 0) + 1
    m = pkg.manifest
    result: dict[str, Any] = {
        "package": {
            "name": m.name,
            "version": m.version,
            "model_id": m.model_id,
            "default_graph": m.default_graph,
            "threshold": m.threshold.model_dump(mode="json"),
            "signed_by": pkg.signed_by,
        },
        "data": {
            "path": str(Path(data_dir).resolve()),
            "n_images": len(samples),
            "classes": classes,
            "skipped": skipped,
        },
        "runtime": {
            "onnxruntime": ort.__version__,
            "providers": list(providers),
            "threads": threads,
            "batch": 1,
            "max_map_side": max_map_side,
        },
        "graphs": {v: run.metrics for v, run in runs.items()},
        "comparison": comparison,
    }
    return Evaluation(
        result=result,
        samples=tuple(samples),
        runs=runs,
        threshold=threshold,
        pixel_threshold=float(m.threshold.pixel),
        package=pkg,
    )


def evaluate(
    package_path: Path | ModelPackage,
    data_dir: Path,
    graphs: Sequence[str] | None = ("fp32", "int8"),
    providers: Sequence[str] = ("CPUExecutionProvider",),
    *,
    threads: int = 2,
    trusted_keys: Sequence[Ed25519PublicKey] | None = None,
    report_png: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate a package on an MVTec-layout folder; returns the JSON-ready metrics dict.

    With ``report_png`` also writes the PNG report (see :mod:`models.report`).
    """
    ev = run_evaluation(
        package_path,
        data_dir,
        graphs,
        providers,
        threads=threads,
        trusted_keys=trusted_keys,
        progress=progress,
    )
    try:
        if report_png is not None:
            from models.report import write_report

            write_report(ev, report_png)
        return ev.result
    finally:
        if not isinstance(package_path, ModelPackage):
            ev.package.close()
