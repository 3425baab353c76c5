"""The contracts that pass between packages: Frame, Verdict, StatusEvent.

All are frozen dataclasses. Times are monotonic seconds (``time.monotonic()``)
unless a name says ``_unix``; durations carry their unit in the name.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

ImageArray = npt.NDArray[np.uint8]
"""An image as OpenCV holds it: HxWx3 BGR or HxW gray, uint8."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One image from a frame source."""

    image: ImageArray
    """HxWx3 BGR (or HxW gray) uint8 pixels; never modified after creation."""
    capture_time: float
    """``time.monotonic()`` when the frame was grabbed."""
    sequence: int
    """Per-source sequence number, starting at 0, +1 per delivered frame."""
    source_id: str
    """Which source produced it (config name)."""
    trigger_id: int | None = None
    """The PLC trigger / part id that caused it, or None in free-run."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Source-specific extras (e.g. synthetic ground truth: ``defect``)."""


class VerdictCode(enum.IntEnum):
    """The three outcomes. ERROR is first-class: a fault never looks like OK.

    The integer values are the ones written to the PLC verdict register.
    """

    OK = 1
    NG = 2
    ERROR = 3


@dataclass(frozen=True, slots=True)
class Region:
    """One defect region found on the anomaly map, in frame pixel coordinates."""

    x: int
    y: int
    w: int
    h: int
    area_px: int
    """Pixels above the pixel threshold inside the region."""
    peak_score: float
    """Highest normalised anomaly value in the region."""
    defect_class: str = "anomaly"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The pipeline's answer for one frame."""

    inspection_id: int
    """Increments by one per inspected part on this appliance (never reused)."""
    frame_sequence: int
    source_id: str
    trigger_id: int | None
    code: VerdictCode
    score: float
    """Normalised image anomaly score (NaN when code is ERROR and none exists)."""
    threshold: float
    """The image threshold in force when this verdict was decided."""
    regions: tuple[Region, ...] = ()
    defect_class: str = ""
    """Dominant defect class for NG ("anomaly" for an unsupervised model), "" for OK."""
    model_name: str = ""
    model_version: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    """Time per stage: preprocess, infer, decide, total (frame capture -> verdict)."""
    error: str = ""
    """Why an ERROR verdict is an error (empty otherwise)."""
    capture_time: float = 0.0
    decided_unix: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.code is VerdictCode.OK


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """A typed status event: one stream feeds the panel, the logs and MQTT.

    ``kind`` is a dotted name such as ``camera.lost``, ``camera.recovered``,
    ``backend.slow``, ``backend.error``, ``plc.connected``, ``outbox.backlog``,
    ``update.staged``, ``store.disk_full``.
    """

    kind: str
    source: str
    severity: Severity = Severity.INFO
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    time_unix: float = field(default_factory=time.time)


@runtime_checkable
class Component(Protocol):
    """Something the app starts in order and stops in reverse order."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


class VerdictSink(Protocol):
    """Receives every verdict after it is committed to the result store."""

    def on_verdict(self, verdict: Verdict) -> None: ...
