"""The decision: thresholds, ROI, minimum defect area, regions in frame pixels."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.decide import DecisionSettings, Roi, decide
from edge.types import VerdictCode


def _map(h: int = 64, w: int = 64) -> np.ndarray:
    return np.zeros((h, w), np.float32)


def test_ok_below_threshold() -> None:
    d = decide(0.5, _map(), (64, 64), DecisionSettings(1.0, 1.0))
    assert d.code is VerdictCode.OK
    assert d.regions == ()
    assert d.defect_class == ""


def test_ng_with_region_scaled_to_frame() -> None:
    m = _map()
    m[10:20, 30:34] = 2.0  # 10 rows x 4 cols at map resolution
    d = decide(2.0, m, (128, 256), DecisionSettings(1.0, 1.0))  # frame 2x tall, 4x wide
    assert d.code is VerdictCode.NG
    assert d.defect_class == "anomaly"
    (r,) = d.regions
    assert (r.x, r.y, r.w, r.h) == (120, 20, 16, 20)
    assert r.area_px == 40 * 8
    assert math.isclose(r.peak_score, 2.0)


def test_threshold_is_inclusive() -> None:
    assert decide(1.0, _map(), (64, 64), DecisionSettings(1.0, 1.0)).code is VerdictCode.NG


def test_min_defect_area_suppresses_specks() -> None:
    m = _map()
    m[5, 5] = 3.0
    s = DecisionSettings(1.0, 1.0, min_defect_area_px=4)
    d = decide(3.0, m, (64, 64), s)
    assert d.code is VerdictCode.OK
    m[40:43, 40:43] = 3.0
    d = decide(3.0, m, (64, 64), s)
    assert d.code is VerdictCode.NG
    assert [r.area_px for r in d.regions] == [9]


def test_roi_ignores_anomalies_outside() -> None:
    m = _map()
    m[0:4, 0:4] = 5.0  # top-left corner, outside the ROI
    s = DecisionSettings(1.0, 1.0, roi=Roi(32, 32, 32, 32))
    d = decide(5.0, m, (64, 64), s)
    assert d.code is VerdictCode.OK
    assert d.score == 0.0
    m[50, 50] = 1.5
    d = decide(5.0, m, (64, 64), s)
    assert d.code is VerdictCode.NG
    assert d.score == 1.5


def test_regions_sorted_and_capped() -> None:
    m = _map()
    m[0:2, 0:2] = 2.0
    m[10:15, 10:15] = 2.0
    m[30:33, 30:33] = 2.0
    d = decide(2.0, m, (64, 64), DecisionSettings(1.0, 1.0, max_regions=2))
    assert [r.area_px for r in d.regions] == [25, 9]


def test_non_finite_is_error_never_ok() -> None:
    d = decide(float("nan"), _map(), (64, 64), DecisionSettings(1.0, 1.0))
    assert d.code is VerdictCode.ERROR
    m = _map()
    m[3, 3] = np.inf
    assert decide(0.1, m, (64, 64), DecisionSettings(1.0, 1.0)).code is VerdictCode.ERROR
    assert (
        decide(0.1, np.zeros((2, 2, 2), np.float32), (64, 64), DecisionSettings(1.0, 1.0)).code
        is VerdictCode.ERROR
    )


@settings(max_examples=60, deadline=None)
@given(
    score=st.floats(0, 5),
    thr=st.floats(0.01, 5),
    y=st.integers(0, 60),
    x=st.integers(0, 60),
    fh=st.integers(16, 400),
    fw=st.integers(16, 400),
)
def test_regions_stay_inside_frame(
    score: float, thr: float, y: int, x: int, fh: int, fw: int
) -> None:
    m = _map()
    m[y : y + 4, x : x + 4] = 2.0
    d = decide(score, m, (fh, fw), DecisionSettings(thr, 1.0))
    assert d.code is (VerdictCode.NG if score >= thr else VerdictCode.OK)
    for r in d.regions:
        assert 0 <= r.x < fw
        assert 0 <= r.y < fh
        assert r.x + r.w <= fw + 1
        assert r.y + r.h <= fh + 1


def _regions_over_the_whole_map(
    amap: np.ndarray, thr: float, scale_yx: tuple[float, float]
) -> set[tuple[int, int, int, int, int, float]]:
    """Reference: label the full map (what decide did before it labelled the mask's box)."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(
        (amap >= thr).astype(np.uint8), connectivity=8
    )
    sy, sx = scale_yx
    out = set()
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if round(area * (sy * sx)) == 0:
            continue  # smaller than one frame pixel: decide drops it
        out.add(
            (
                math.floor(x * sx),
                math.floor(y * sy),
                max(1, round(w * sx)),
                max(1, round(h * sy)),
                round(area * (sy * sx)),
                float(amap[labels == i].max()),
            )
        )
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), fh=st.integers(16, 400), fw=st.integers(16, 400))
def test_regions_match_labelling_the_whole_map(seed: int, fh: int, fw: int) -> None:
    rng = np.random.default_rng(seed)
    m = _map(48, 40)
    for _ in range(int(rng.integers(1, 6))):  # a few blobs anywhere, edges included
        y, x = int(rng.integers(0, 48)), int(rng.integers(0, 40))
        h, w = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        m[y : y + h, x : x + w] = rng.uniform(1.0, 3.0, size=m[y : y + h, x : x + w].shape)
    d = decide(5.0, m, (fh, fw), DecisionSettings(1.0, 1.0, max_regions=1000))
    got = {(r.x, r.y, r.w, r.h, r.area_px, r.peak_score) for r in d.regions}
    assert got == _regions_over_the_whole_map(m, 1.0, (fh / 48, fw / 40))
