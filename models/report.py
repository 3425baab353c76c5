"""The PNG evaluation report: ROC curves, score histograms, worst-scored examples.

Drawn with matplotlib's Agg backend (no display needed). Layout:

- top row: image ROC curve of every graph; histogram of image scores of good
  vs defective parts for the report graph with the manifest threshold; the
  escape rate per defect class and the false-reject rate at the threshold.
- lower rows: the worst-scored examples of the report graph (good parts with
  the highest scores = false-reject risks, defective parts with the lowest =
  escape risks), each image with its anomaly map overlaid and the defect
  mask outlined.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from models.evaluate import Evaluation

WORST_PER_KIND = 6


def _report_graph(ev: Evaluation) -> str:
    default = ev.package.manifest.default_graph
    return default if default in ev.runs else next(iter(ev.runs))


def _overlay(
    image_bgr: npt.NDArray[np.uint8],
    amap: npt.NDArray[np.float32],
    mask: npt.NDArray[np.bool_] | None,
    vmax: float,
) -> npt.NDArray[np.uint8]:
    """RGB image with the anomaly map (0..vmax) blended as a heat map and the mask outlined."""
    h, w = amap.shape
    img = cv2.resize(image_bgr, (w, h), interpolation=cv2.INTER_AREA)
    level = np.clip(amap / max(vmax, 1e-6), 0.0, 1.0)
    heat = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blend = cv2.addWeighted(img, 0.55, heat, 0.45, 0.0)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        cv2.drawContours(blend, contours, -1, (255, 255, 255), 1)
    return np.asarray(cv2.cvtColor(blend, cv2.COLOR_BGR2RGB), dtype=np.uint8)


def write_report(ev: Evaluation, png_path: Path, *, worst_per_kind: int = WORST_PER_KIND) -> Path:
    """Write the report PNG for an :class:`~models.evaluate.Evaluation`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    graph = _report_graph(ev)
    run = ev.runs[graph]
    labels = np.asarray([s.defective for s in ev.samples], dtype=np.bool_)
    scores = run.scores
    order = np.argsort(scores)
    good_idx = [int(i) for i in order[::-1] if not labels[i]][:worst_per_kind]
    bad_idx = [int(i) for i in order if labels[i]][:worst_per_kind]
    n_cols = max(3, worst_per_kind)
    n_rows = 1 + int(bool(good_idx)) + int(bool(bad_idx))
    fig = plt.figure(figsize=(3.0 * n_cols, 3.4 * n_rows), dpi=90)
    grid = fig.add_gridspec(n_rows, n_cols * 2)
    m = ev.package.manifest
    fig.suptitle(
        f"{m.model_id} on {Path(ev.result['data']['path']).name}: "
        f"{len(ev.samples)} images, threshold {ev.threshold:g} (report graph {graph})",
        fontsize=11,
    )

    ax = fig.add_subplot(grid[0, 0 : (2 * n_cols) // 3])
    if labels.any() and not labels.all():
        for v, r in ev.runs.items():
            fpr, tpr, _ = roc_curve(labels, r.scores)
            auc = r.metrics.get("image_auroc")
            ax.plot(fpr, tpr, label=f"{v} AUROC {auc:.4f}" if auc is not None else v)
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "ROC needs good and defective images", ha="center", va="center")
    ax.set_xlabel("false-positive rate (good parts rejected)")
    ax.set_ylabel("true-positive rate (defects caught)")
    ax.set_title("image ROC", fontsize=10)

    ax = fig.add_subplot(grid[0, (2 * n_cols) // 3 : (4 * n_cols) // 3])
    finite = scores[np.isfinite(scores)]
    bins: Any = (
        np.linspace(float(finite.min()), float(finite.max()) + 1e-9, 40) if finite.size else 10
    )
    ax.hist(scores[~labels], bins=bins, alpha=0.6, color="tab:green", label="good")
    ax.hist(scores[labels], bins=bins, alpha=0.6, color="tab:red", label="defective")
    ax.axvline(ev.threshold, color="k", ls="--", lw=1, label=f"threshold {ev.threshold:g}")
    ax.set_xlabel(f"image score ({graph})")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.set_title("score distribution", fontsize=10)

    ax = fig.add_subplot(grid[0, (4 * n_cols) // 3 :])
    per_class = run.metrics.get("per_class", {})
    names = list(per_class)
    rates = [
        per_class[n].get("false_reject_rate" if n == "good" else "escape_rate") or 0.0
        for n in names
    ]
    colors = ["tab:green" if n == "good" else "tab:red" for n in names]
    ax.barh(names, rates, color=colors)
    ax.set_xlim(0, 1)
    ax.set_xlabel("rate at threshold (good: false reject, defects: escape)")
    ax.set_title("per class", fontsize=10)

    maps = [run.maps[i] for i in good_idx + bad_idx]
    vmax = max(
        [ev.pixel_threshold * 2.0] + [float(np.percentile(mp, 99.9)) for mp in maps if mp.size]
    )
    tile = 192
    row = 1
    for title, idxs in (
        ("good parts, highest scores", good_idx),
        ("defects, lowest scores", bad_idx),
    ):
        if not idxs:
            continue
        strip = np.full((tile, tile * n_cols + 8 * (n_cols - 1), 3), 255, np.uint8)
        ax = fig.add_subplot(grid[row, :])
        for k, i in enumerate(idxs):
            sample = ev.samples[i]
            image = cv2.imread(str(sample.path), cv2.IMREAD_COLOR)
            x0 = k * (tile + 8)
            if image is not None:
                over = _overlay(np.asarray(image, dtype=np.uint8), run.maps[i], run.masks[i], vmax)
                strip[:, x0 : x0 + tile] = cv2.resize(
                    over, (tile, tile), interpolation=cv2.INTER_AREA
                )
            verdict = "NG" if scores[i] >= ev.threshold else "OK"
            ax.text(
                x0 + tile / 2,
                -6,
                f"{sample.label} {scores[i]:.3f} {verdict}\n{sample.path.name}",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.imshow(strip)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(title, fontsize=9)
        for side in ax.spines.values():
            side.set_visible(False)
        row += 1
    fig.subplots_adjust(left=0.05, right=0.98, top=0.9, bottom=0.04, hspace=0.45, wspace=0.6)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
