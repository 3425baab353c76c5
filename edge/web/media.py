"""Images for the panel: overlays drawn and JPEGs encoded lazily, in web threads, cached.

Nothing here runs on the pipeline thread. The live JPEG is encoded at most
once per inspected part, however many browsers watch it.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from edge.types import ImageArray, Region, VerdictCode
from edge.web.backend import AnomalyMap

_CODE_BGR = {
    VerdictCode.OK: (60, 170, 60),
    VerdictCode.NG: (40, 40, 220),
    VerdictCode.ERROR: (0, 150, 230),
}


def draw_live(
    image: ImageArray,
    anomaly_map: AnomalyMap | None,
    regions: tuple[Region, ...],
    threshold: float,
    code: VerdictCode,
) -> ImageArray:
    """The live frame with the verdict drawn: heatmap only where it matters, outlines, frame.

    The heatmap is scaled so that ``threshold`` sits at two thirds of the colour
    map, and blended in only above a third of the threshold, so the part stays
    readable on an OK frame and the defect stands out on an NG one.
    """
    out = to_bgr(image).copy()
    h, w = out.shape[:2]
    if anomaly_map is not None and anomaly_map.size:
        amap = np.asarray(anomaly_map, dtype=np.float32)
        if amap.shape != (h, w):
            amap = np.asarray(
                cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR), dtype=np.float32
            )
        top = (threshold if math.isfinite(threshold) and threshold > 0 else 1.0) * 1.5
        norm = np.clip(amap / top, 0.0, 1.0)
        colour = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
        alpha = np.clip((norm - 1 / 3) * 1.5, 0.0, 0.6)[..., None]
        out = (out * (1 - alpha) + colour * alpha).astype(np.uint8)
    thick = max(1, round(min(h, w) / 200))
    for r in regions:
        cv2.rectangle(
            out, (r.x - 2, r.y - 2), (r.x + r.w + 1, r.y + r.h + 1), (0, 0, 255), thick + 1
        )
    cv2.rectangle(out, (0, 0), (w - 1, h - 1), _CODE_BGR[code], 2 * thick + 2)
    return np.ascontiguousarray(out)


def to_bgr(image: ImageArray) -> ImageArray:
    if image.ndim == 2:
        return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    return image


def encode_jpeg(image: ImageArray, quality: int = 85, max_side: int | None = None) -> bytes:
    img = to_bgr(image)
    if max_side is not None:
        h, w = img.shape[:2]
        scale = max_side / max(h, w)
        if scale < 1:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            img = np.asarray(cv2.resize(img, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(buf.tobytes())


def read_image(path: Path) -> ImageArray | None:
    """An image file as BGR, or None when unreadable."""
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        return None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return None if img is None else np.asarray(img, dtype=np.uint8)


class JpegCache:
    """A small thread-safe LRU of encoded images keyed by anything hashable.

    ``get(key, make)`` runs ``make`` once per key even when several requests
    ask at the same moment (a per-cache lock; encoding is a few ms).
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[object, bytes] = collections.OrderedDict()
        self.encoded = 0
        """How many times ``make`` ran (cache misses that produced data)."""

    def get(self, key: object, make: Callable[[], bytes | None]) -> bytes | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            data = make()
            if data is not None:
                self.encoded += 1
                self._items[key] = data
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
            return data
