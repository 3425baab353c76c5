"""The decision: scores and an anomaly map in, OK / NG and defect regions out.

This is the only place that knows about thresholds. Rules, in order:

1. A score or map that is not finite is an ERROR (a fault never looks OK).
2. With a region of interest (ROI), only the anomaly map inside it counts and
   the image score becomes the map's maximum inside the ROI; without one the
   graph's image score is used as is.
3. Defect regions are the connected components
   (``cv2.connectedComponentsWithStats``, 8-connectivity) of
   ``anomaly_map >= pixel_threshold`` inside the ROI, mapped to frame pixels,
   largest first; regions smaller than ``min_defect_area_px`` are dropped.
4. NG when ``score >= image_threshold`` and, if ``min_defect_area_px > 0``,
   at least one region is left; OK otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from edge.types import Region, VerdictCode

DEFAULT_DEFECT_CLASS = "anomaly"


@dataclass(frozen=True, slots=True)
class Roi:
    """A rectangle in frame pixels."""

    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True, slots=True)
class DecisionSettings:
    """Everything the decision depends on; replaced as a whole on a threshold change."""

    image_threshold: float
    pixel_threshold: float
    roi: Roi | None = None
    min_defect_area_px: int = 0
    max_regions: int = 16


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :func:`decide`."""

    code: VerdictCode
    score: float
    regions: tuple[Region, ...]
    defect_class: str
    error: str = ""


def _roi_in_map(
    roi: Roi, frame_hw: tuple[int, int], map_hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    fh, fw = frame_hw
    mh, mw = map_hw
    sx, sy = mw / fw, mh / fh
    x0 = min(max(math.floor(roi.x * sx), 0), mw)
    y0 = min(max(math.floor(roi.y * sy), 0), mh)
    x1 = min(max(math.ceil((roi.x + roi.w) * sx), x0), mw)
    y1 = min(max(math.ceil((roi.y + roi.h) * sy), y0), mh)
    return x0, y0, x1, y1


def decide(
    score: float,
    anomaly_map: npt.NDArray[np.float32],
    frame_hw: tuple[int, int],
    settings: DecisionSettings,
) -> Decision:
    """Turn one image's score and [H, W] anomaly map into a :class:`Decision`.

    ``frame_hw`` is the frame's (height, width): the map is at the graph's
    input resolution and regions are reported in frame pixels.
    """
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.ndim != 2 or amap.size == 0:
        return Decision(
            VerdictCode.ERROR,
            float("nan"),
            (),
            "",
            f"anomaly map has shape {amap.shape}, expected (H, W)",
        )
    if not math.isfinite(score) or not bool(np.isfinite(amap).all()):
        return Decision(
            VerdictCode.ERROR, float("nan"), (), "", "the model returned a non-finite score or map"
        )
    mh, mw = amap.shape
    fh, fw = frame_hw
    mask = amap >= settings.pixel_threshold
    if settings.roi is not None:
        x0, y0, x1, y1 = _roi_in_map(settings.roi, frame_hw, (mh, mw))
        inside = np.zeros_like(mask)
        inside[y0:y1, x0:x1] = True
        mask &= inside
        window = amap[y0:y1, x0:x1]
        score = float(window.max()) if window.size else 0.0
    regions = _regions(amap, mask, (fh / mh, fw / mw), settings)
    is_ng = score >= settings.image_threshold
    if is_ng and settings.min_defect_area_px > 0 and not regions:
        is_ng = False
    if not is_ng:
        return Decision(VerdictCode.OK, float(score), (), "")
    return Decision(VerdictCode.NG, float(score), regions, DEFAULT_DEFECT_CLASS)


def _regions(
    amap: npt.NDArray[np.float32],
    mask: npt.NDArray[np.bool_],
    scale_yx: tuple[float, float],
    settings: DecisionSettings,
) -> tuple[Region, ...]:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return ()
    cols = np.flatnonzero(mask.any(axis=0))
    # Components are labelled inside the mask's bounding box only: a defect covers a small
    # part of the map, and labelling the whole map cost ~0.6 ms (256 x 256) where the box
    # of a typical defect takes a few tens of microseconds; nothing outside it is set.
    oy, ox = int(rows[0]), int(cols[0])
    box_y, box_x = slice(oy, int(rows[-1]) + 1), slice(ox, int(cols[-1]) + 1)
    amap = amap[box_y, box_x]
    crop = np.ascontiguousarray(mask[box_y, box_x])
    n, labels, stats, _ = cv2.connectedComponentsWithStats(crop.view(np.uint8), connectivity=8)
    sy, sx = scale_yx
    px_area = sy * sx
    # largest first; the peak is looked up only inside the bounding box of kept regions
    order = sorted(range(1, n), key=lambda i: -int(stats[i][4]))
    found: list[Region] = []
    for i in order:
        x, y, w, h, area = (int(v) for v in stats[i])
        area_px = round(area * px_area)
        if area_px < settings.min_defect_area_px or area_px == 0:
            break  # sorted by area: every later region is smaller
        box = amap[y : y + h, x : x + w][labels[y : y + h, x : x + w] == i]
        found.append(
            Region(
                x=math.floor((x + ox) * sx),
                y=math.floor((y + oy) * sy),
                w=max(1, round(w * sx)),
                h=max(1, round(h * sy)),
                area_px=area_px,
                peak_score=float(box.max()),
                defect_class=DEFAULT_DEFECT_CLASS,
            )
        )
        if len(found) >= settings.max_regions:
            break
    found.sort(key=lambda r: (-r.area_px, -r.peak_score))
    return tuple(found[: settings.max_regions])
