"""Camera / frame source configuration (owned by the capture loop).

``camera.source`` is a discriminated union on ``type``: ``synthetic``,
``device``, ``stream``, ``video`` or ``folder``; each has its own model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from edge.config_base import StrictModel

_DEFECTS = ("missing_bolt", "scratch", "crack", "stain", "dent")
"""Mirror of edge.capture.synth.DEFECT_TYPES (kept import-light; a test checks they agree)."""


class SyntheticSourceConfig(StrictModel):
    """The built-in synthetic line: rendered machined parts, some with defects."""

    type: Literal["synthetic"] = Field(
        "synthetic", title="Source type", description="The synthetic line (no camera needed)."
    )
    parts_per_minute: float = Field(
        120.0,
        gt=0,
        le=60_000,
        title="Parts per minute",
        description="Rate at which synthetic parts pass the camera in free-run mode "
        "(triggered mode renders one part per trigger).",
    )
    defect_rate: float = Field(
        0.1, ge=0, le=1, title="Defect rate", description="Share of parts that carry a defect."
    )
    defects: tuple[str, ...] = Field(
        _DEFECTS,
        min_length=1,
        title="Defect types",
        description="Defects drawn on defective parts, chosen uniformly: "
        + ", ".join(_DEFECTS)
        + ".",
    )
    seed: int = Field(0, ge=0, title="Seed", description="Random seed of the synthetic line.")
    size_px: int = Field(
        256, ge=32, le=2048, title="Image size (px)", description="Side of the square images."
    )

    @field_validator("defects")
    @classmethod
    def _known_defects(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [d for d in value if d not in _DEFECTS]
        if unknown:
            raise ValueError(f"unknown defect(s) {unknown}; choose from {list(_DEFECTS)}")
        return value


class DeviceSourceConfig(StrictModel):
    """A camera the operating system exposes (V4L2 on Linux) read through OpenCV."""

    type: Literal["device"] = Field(
        "device", title="Source type", description="A local camera device."
    )
    device: int | str = Field(
        0,
        title="Device",
        description="OpenCV device index (0, 1, ...) or a device path such as /dev/video0.",
    )
    width_px: int | None = Field(
        None,
        ge=1,
        le=16384,
        title="Width (px)",
        description="Requested frame width; None keeps "
        "the driver's default. The driver may pick the nearest mode it supports.",
    )
    height_px: int | None = Field(
        None,
        ge=1,
        le=16384,
        title="Height (px)",
        description="Requested frame height; None keeps the driver's default.",
    )
    fps: float | None = Field(
        None,
        gt=0,
        le=1000,
        title="Frame rate (fps)",
        description="Requested frames per second; None keeps the driver's default.",
    )
    fourcc: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9 ]{4}$",
        title="Pixel format",
        description="Four-character code requested from the driver, e.g. MJPG or YUYV.",
    )
    auto_exposure: bool | None = Field(
        None,
        title="Auto exposure",
        description="Turn the driver's auto exposure on or off; None leaves it as it is.",
    )
    exposure: float | None = Field(
        None,
        title="Exposure (driver units)",
        description="Manual exposure value passed to "
        "the driver (V4L2: units of 100 µs); needs auto_exposure false on most cameras.",
    )
    buffer_frames: int = Field(
        1,
        ge=1,
        le=32,
        title="Driver buffer (frames)",
        description="Frames the driver may "
        "queue; 1 keeps the image fresh (where the driver honours it).",
    )


class StreamSourceConfig(StrictModel):
    """A network stream (RTSP/HTTP URL) or a GStreamer pipeline string."""

    type: Literal["stream"] = Field(
        "stream", title="Source type", description="A network stream or GStreamer pipeline."
    )
    url: str = Field(
        ...,
        min_length=1,
        title="URL or pipeline",
        description="rtsp://, http(s):// or any URL FFmpeg opens; or a GStreamer pipeline ending "
        "in appsink (e.g. 'nvarguscamerasrc ! nvvidconv ! video/x-raw,format=BGRx ! "
        "videoconvert ! video/x-raw,format=BGR ! appsink drop=1').",
    )
    backend: Literal["auto", "ffmpeg", "gstreamer"] = Field(
        "auto",
        title="Backend",
        description="OpenCV backend; auto uses GStreamer when the string contains '!', "
        "FFmpeg otherwise.",
    )
    open_timeout_s: float = Field(
        5.0, gt=0, le=300, title="Open timeout (s)", description="Give up opening after this long."
    )
    read_timeout_s: float = Field(
        5.0,
        gt=0,
        le=300,
        title="Read timeout (s)",
        description="A read blocked this long counts as the stream being down.",
    )


class VideoSourceConfig(StrictModel):
    """A video file replayed as if it were a camera."""

    type: Literal["video"] = Field("video", title="Source type", description="A video file.")
    path: Path = Field(
        ...,
        title="Video file",
        description="Path of the file (any format OpenCV's FFmpeg reads: mp4, avi, mkv ...).",
    )
    rate_fps: float | None = Field(
        None,
        gt=0,
        le=1000,
        title="Replay rate (fps)",
        description="Frames per second in free-run mode; None uses the file's own rate.",
    )
    loop: bool = Field(
        True,
        title="Loop",
        description="Start again at the end (the file is reopened, so a "
        "replaced file is picked up); false ends the source after the last frame.",
    )


class FolderSourceConfig(StrictModel):
    """A folder of images replayed in name order at a set rate."""

    type: Literal["folder"] = Field(
        "folder", title="Source type", description="A folder of image files."
    )
    path: Path = Field(..., title="Folder", description="Folder holding the images.")
    rate_fps: float = Field(
        2.0,
        gt=0,
        le=1000,
        title="Replay rate (fps)",
        description="Images per second in free-run mode.",
    )
    loop: bool = Field(
        True,
        title="Loop",
        description="Start again after the last image (the folder is "
        "listed again, so new files are picked up); false ends the source.",
    )
    extensions: tuple[str, ...] = Field(
        (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"),
        min_length=1,
        title="File extensions",
        description="Only files with these (case-insensitive) extensions are read.",
    )
    recursive: bool = Field(
        False, title="Recursive", description="Also read images in sub-folders."
    )

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in value)


CameraSourceConfig = Annotated[
    SyntheticSourceConfig
    | DeviceSourceConfig
    | StreamSourceConfig
    | VideoSourceConfig
    | FolderSourceConfig,
    Field(discriminator="type"),
]
"""One frame source, chosen by its ``type`` key."""


class ReconnectConfig(StrictModel):
    """Exponential backoff between attempts to reopen a failed source."""

    initial_delay_s: float = Field(
        0.5, gt=0, le=60, title="First delay (s)", description="Wait before the first retry."
    )
    max_delay_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        title="Longest delay (s)",
        description="The delay never grows past this.",
    )
    factor: float = Field(
        2.0,
        ge=1,
        le=10,
        title="Growth factor",
        description="Each failed attempt multiplies the delay by this.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> ReconnectConfig:
        if self.max_delay_s < self.initial_delay_s:
            raise ValueError("max_delay_s must be at least initial_delay_s")
        return self


class CameraConfig(StrictModel):
    """The frame source and how frames are handed to the pipeline."""

    id: str = Field(
        "camera0",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        title="Source id",
        description="Name of this frame source (in frames, events and logs).",
    )
    mode: Literal["free_run", "triggered"] = Field(
        "free_run",
        title="Acquisition mode",
        description="free_run keeps only the latest frame (drops counted); triggered yields "
        "exactly one frame or an explicit failure per trigger.",
    )
    source: CameraSourceConfig = Field(
        default_factory=SyntheticSourceConfig,
        title="Source",
        description="Which frame source to use; pick one with its 'type' key.",
    )
    trigger_timeout_s: float = Field(
        2.0,
        gt=0,
        le=60,
        title="Trigger timeout (s)",
        description="Longest wait for the frame "
        "of one trigger before it fails (callers may pass a shorter deadline).",
    )
    max_pending_triggers: int = Field(
        8,
        ge=1,
        le=1024,
        title="Pending triggers",
        description="Triggers waiting for a frame at "
        "once; a trigger beyond this fails at once (overrun) instead of queueing.",
    )
    trigger_settle_frames: int = Field(
        1,
        ge=0,
        le=10,
        title="Settle frames",
        description="Live cameras and streams in triggered mode: frames grabbed after a trigger "
        "that are discarded before the one it gets, since the first may have been exposed "
        "before the trigger (0 takes the first frame grabbed after it).",
    )
    reconnect: ReconnectConfig = Field(
        default_factory=ReconnectConfig,
        title="Reconnect",
        description="Backoff when the source fails.",
    )
