"""Threshold rule: pick the raw decision level from held-out good images.

Rule ``quantile`` (the default): the raw threshold is the ``1 - target_false_reject_rate``
quantile of the raw scores of good images that were *not* used to build the memory bank,
times a safety ``margin``. With few held-out images the quantile is taken with the
``higher`` method (never interpolated below an observed score), so at least that share of the
held-out goods pass. The graph divides by this value (``raw_scale``), so every package's
image threshold is 1.0 and the pixel threshold (used to cut defect regions) is 1.0 too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class ThresholdRule:
    """Parameters of the ``quantile`` rule."""

    target_false_reject_rate: float = 0.01
    margin: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_false_reject_rate < 1.0:
            raise ValueError("target_false_reject_rate must be in [0, 1)")
        if self.margin <= 0:
            raise ValueError("margin must be > 0")


@dataclass(frozen=True)
class Threshold:
    """The chosen threshold, in the form the manifest stores it."""

    raw_scale: float
    image: float
    pixel: float
    rule: str
    params: dict[str, Any]

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's ``threshold`` object."""
        return {
            "image": self.image,
            "pixel": self.pixel,
            "raw_scale": self.raw_scale,
            "rule": self.rule,
            "params": self.params,
        }


def choose_threshold(raw_good_scores: npt.ArrayLike, rule: ThresholdRule) -> Threshold:
    """Apply the ``quantile`` rule to raw scores of held-out good images."""
    scores = np.asarray(raw_good_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("no held-out good scores to choose a threshold from")
    if not np.all(np.isfinite(scores)):
        raise ValueError("held-out good scores contain NaN or infinity")
    q = float(np.quantile(scores, 1.0 - rule.target_false_reject_rate, method="higher"))
    raw = q * rule.margin
    if raw <= 0:
        raw = float(np.finfo(np.float32).eps)
    return Threshold(
        raw_scale=raw,
        image=1.0,
        pixel=1.0,
        rule="quantile",
        params={
            "target_false_reject_rate": rule.target_false_reject_rate,
            "margin": rule.margin,
            "n_good": int(scores.size),
            "good_raw_median": float(np.median(scores)),
            "good_raw_max": float(scores.max()),
        },
    )
