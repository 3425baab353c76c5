"""What the web panel needs from the appliance: the :class:`PanelBackend` protocol.

The panel (``edge.web.server.create_app``) talks to the running appliance only
through this protocol; ``edge.app.Appliance`` implements it. Every method is
called from a web worker thread, never from the pipeline thread, and must be
cheap: return what is already in memory or one indexed SQLite query. Nothing
here may block the inspection path (no lock held by the pipeline across a
frame, no image encoding: the panel encodes and caches JPEGs itself).

All value types are frozen dataclasses defined here, so an implementation
needs nothing from the panel but this module.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from edge.types import ImageArray, Region, StatusEvent, Verdict, VerdictCode

if TYPE_CHECKING:
    from edge.config import LineInspectConfig

AnomalyMap = npt.NDArray[np.float32]
"""Normalised per-pixel anomaly (same scale as ``Verdict.score``), any HxW."""


@dataclass(frozen=True, slots=True)
class LiveResult:
    """The most recent inspected part: what the Live page draws."""

    verdict: Verdict
    image: ImageArray
    """The raw frame as captured (BGR or gray, no overlay drawn on it)."""
    anomaly_map: AnomalyMap | None = None
    """The model's anomaly map (any resolution; the panel resizes to ``image``), or None."""


@dataclass(frozen=True, slots=True)
class StatsBucket:
    """Counts and latency for one time bucket ``[start_unix, start_unix + bucket_s)``."""

    start_unix: float
    ok: int
    ng: int
    error: int
    latency_ms_p50: float | None
    """Median ``timings_ms["total"]`` of the bucket's parts, None when it has none."""
    latency_ms_max: float | None


@dataclass(frozen=True, slots=True)
class Stats:
    """Totals since ``since_unix`` and a time series in buckets of ``bucket_s``."""

    since_unix: float
    bucket_s: float
    ok: int
    ng: int
    error: int
    buckets: tuple[StatsBucket, ...]
    """Oldest first; empty buckets may be omitted."""

    @property
    def total(self) -> int:
        return self.ok + self.ng + self.error


@dataclass(frozen=True, slots=True)
class PartQuery:
    """A history filter. All conditions are ANDed; newest parts first."""

    code: VerdictCode | None = None
    defect_class: str | None = None
    since_unix: float | None = None
    until_unix: float | None = None
    limit: int = 50
    offset: int = 0


@dataclass(frozen=True, slots=True)
class PartRecord:
    """One stored verdict (a row of the result store)."""

    inspection_id: int
    decided_unix: float
    code: VerdictCode
    score: float
    """NaN when the verdict is ERROR without a score."""
    threshold: float
    defect_class: str = ""
    regions: tuple[Region, ...] = ()
    model_name: str = ""
    model_version: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str = ""
    trigger_id: int | None = None
    source_id: str = ""
    frame_sequence: int = 0
    has_image: bool = False
    """True when :meth:`PanelBackend.part_file` can return the raw image."""
    has_heatmap: bool = False
    """True when :meth:`PanelBackend.part_file` can return the anomaly overlay."""

    @classmethod
    def from_verdict(
        cls, v: Verdict, *, has_image: bool = False, has_heatmap: bool = False
    ) -> PartRecord:
        """The record of one verdict (live, or read back from the result store)."""
        return cls(
            inspection_id=v.inspection_id,
            decided_unix=v.decided_unix,
            code=v.code,
            score=v.score,
            threshold=v.threshold,
            defect_class=v.defect_class,
            regions=v.regions,
            model_name=v.model_name,
            model_version=v.model_version,
            timings_ms=dict(v.timings_ms),
            error=v.error,
            trigger_id=v.trigger_id,
            source_id=v.source_id,
            frame_sequence=v.frame_sequence,
            has_image=has_image,
            has_heatmap=has_heatmap,
        )


@dataclass(frozen=True, slots=True)
class PartPage:
    """One page of a history query."""

    parts: tuple[PartRecord, ...]
    total: int
    """How many parts match the query in all (for pagination)."""


PartFileKind = Literal["image", "heatmap"]
"""``image``: the raw frame as stored; ``heatmap``: the frame with the anomaly overlay drawn."""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What :meth:`PanelBackend.apply_config` did with a new configuration."""

    applied: tuple[str, ...]
    """Dotted keys (``pipeline.threshold``) now in force."""
    restart_required: tuple[str, ...] = ()
    """Dotted keys saved to the config file but only in force after a restart."""


class SlotName(enum.StrEnum):
    ACTIVE = "active"
    STAGED = "staged"
    PREVIOUS = "previous"


@dataclass(frozen=True, slots=True)
class ModelSlot:
    """One model slot and the package in it (``name`` empty when the slot is empty)."""

    slot: SlotName
    name: str = ""
    version: str = ""
    created: str = ""
    """ISO 8601 from the manifest."""
    threshold: float | None = None
    """The manifest's image threshold."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The manifest's ``metrics`` (image_auroc, ...)."""
    path: Path | None = None
    sha256: str = ""
    """Of manifest.json, identifies the package."""

    @property
    def empty(self) -> bool:
        return not self.name


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """Live health of the appliance's parts. ``None`` means unknown / not configured."""

    camera_connected: bool
    camera_fps: float | None
    """Frames per second delivered by the source over the last few seconds."""
    camera_dropped_frames: int
    """Frames dropped by the free-run policy (or failed triggers) since start."""
    backend_name: str
    """e.g. ``onnxruntime:CPUExecutionProvider``."""
    backend_latency_ms_p50: float | None
    backend_latency_ms_p99: float | None
    pipeline_running: bool
    threshold: float
    """The image threshold in force now."""
    plc_connected: bool | None = None
    """None when no PLC is configured."""
    plc_last_trigger_unix: float | None = None
    uplink_state: str = "disabled"
    """``disabled`` | ``connecting`` | ``connected`` | ``disconnected`` (agent's own words)."""
    uplink_outbox_depth: int | None = None
    store_path: Path | None = None
    """Folder of the result store (the panel reports its disk usage)."""
    extra: dict[str, float] = field(default_factory=dict)
    """More numeric gauges, exported as ``lineinspect_<key>`` on /metrics."""


@runtime_checkable
class PanelBackend(Protocol):
    """The appliance as the panel sees it. Implemented by ``edge.app.Appliance``.

    Methods raise ``ValueError`` (with a message a technician can read) for a
    refused request (bad threshold, empty staged slot...); the panel shows the
    message and changes nothing. Any other exception is a fault (HTTP 500 plus
    a log line).
    """

    # -- live ---------------------------------------------------------------
    def latest(self) -> LiveResult | None:
        """The last inspected part, or None before the first one. O(1), no copy needed."""
        ...

    def stats(self, since_unix: float, bucket_s: float) -> Stats:
        """OK/NG/ERROR counts and latency since ``since_unix`` (store query)."""
        ...

    # -- history ------------------------------------------------------------
    def query_parts(self, query: PartQuery) -> PartPage:
        """Stored parts matching ``query``, newest first."""
        ...

    def part(self, inspection_id: int) -> PartRecord | None:
        """One stored part, or None when unknown."""
        ...

    def part_file(self, inspection_id: int, kind: PartFileKind) -> Path | None:
        """Path of a stored image file (PNG or JPEG) of a part, or None if none was kept."""
        ...

    def defect_classes(self) -> Sequence[str]:
        """Defect classes seen in the store (for the history filter)."""
        ...

    # -- configuration ------------------------------------------------------
    def config(self) -> LineInspectConfig:
        """The configuration in force."""
        ...

    def apply_config(self, new: LineInspectConfig) -> ApplyResult:
        """Apply a validated configuration: live where safe, else saved for a restart.

        Raises ValueError when the change is refused (nothing applied then).
        """
        ...

    def set_threshold(self, threshold: float | None) -> None:
        """Set the image threshold for the next parts (None: the model's own)."""
        ...

    # -- models -------------------------------------------------------------
    def model_slots(self) -> Sequence[ModelSlot]:
        """Active, staged and previous slots (each present, possibly empty)."""
        ...

    def stage_model(self, package: Path) -> ModelSlot:
        """Verify ``package`` and copy it into the staged slot. ValueError when refused."""
        ...

    def activate_staged(self) -> ModelSlot:
        """Swap the staged package in between parts; the old active becomes previous."""
        ...

    def rollback(self) -> ModelSlot:
        """Swap the previous package back in between parts."""
        ...

    # -- health -------------------------------------------------------------
    def health(self) -> HealthSnapshot:
        """Current health of camera, backend, PLC and uplink."""
        ...

    def recent_events(self, limit: int) -> Sequence[StatusEvent]:
        """The last ``limit`` status events, newest last (``EventBus.history()``)."""
        ...
