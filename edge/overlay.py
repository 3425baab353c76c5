"""Overlays for people: the anomaly heatmap blended on the frame, defect outlines.

Drawing is slow next to inference, so it never runs on the hot path: the
result store's background writer and the panel call it after the verdict.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from edge.types import ImageArray, Region, VerdictCode

_COLORS = {
    VerdictCode.OK: (0, 180, 0),
    VerdictCode.NG: (0, 0, 255),
    VerdictCode.ERROR: (0, 165, 255),
}


def to_bgr(image: ImageArray) -> ImageArray:
    """A BGR copy of a gray or BGR image."""
    if image.ndim == 2:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
    return image.copy()


def heatmap(
    anomaly_map: npt.NDArray[np.float32], size_wh: tuple[int, int], pixel_threshold: float
) -> ImageArray:
    """A JET-coloured BGR heatmap of the map, resized; 2x the pixel threshold is full red."""
    top = max(2.0 * pixel_threshold, 1e-6)
    scaled = np.clip(np.asarray(anomaly_map, dtype=np.float32) / top, 0.0, 1.0)
    u8 = (scaled * 255.0).astype(np.uint8)
    u8 = cv2.resize(u8, size_wh, interpolation=cv2.INTER_LINEAR)
    return np.asarray(cv2.applyColorMap(u8, cv2.COLORMAP_JET), dtype=np.uint8)


def draw_overlay(
    image: ImageArray,
    anomaly_map: npt.NDArray[np.float32] | None,
    regions: tuple[Region, ...],
    code: VerdictCode,
    *,
    pixel_threshold: float,
    alpha: float = 0.45,
    label: str = "",
) -> ImageArray:
    """The frame with the heatmap blended in, region outlines and a verdict label."""
    out = to_bgr(image)
    h, w = out.shape[:2]
    if anomaly_map is not None:
        hm = heatmap(anomaly_map, (w, h), pixel_threshold)
        out = np.asarray(cv2.addWeighted(out, 1.0 - alpha, hm, alpha, 0.0), dtype=np.uint8)
    color = _COLORS[code]
    for r in regions:
        cv2.rectangle(out, (r.x, r.y), (r.x + r.w - 1, r.y + r.h - 1), color, 2)
    text = label or code.name
    cv2.putText(out, text, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(out, text, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, color, 1, cv2.LINE_AA)
    return out
