"""Frame sources behind one small interface.

A :class:`FrameSource` is opened, read one image at a time, and closed. It
reports trouble only through three exceptions, which the capture loop turns
into status events and counters:

- :class:`SourceUnavailableError`: the source cannot be opened or was lost
  (camera unplugged, stream down, file or folder removed). The loop closes
  it and reopens it with exponential backoff.
- :class:`CorruptFrameError`: this one image is unreadable (zero-byte or
  truncated file, undecodable data). The loop counts it, logs it, skips it.
- :class:`SourceEndedError`: a replay that does not loop reached its end.

Sources are either *live* (a camera or stream that produces frames on its
own clock; the loop reads continuously so the image stays fresh) or
*on demand* (synthetic line, video file, image folder: a frame is made when
asked, paced at ``interval_s`` in free-run mode, one per trigger in
triggered mode).
"""

from __future__ import annotations

import logging
import os
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge.capture.config import (
    CameraSourceConfig,
    DeviceSourceConfig,
    FolderSourceConfig,
    StreamSourceConfig,
    SyntheticSourceConfig,
    VideoSourceConfig,
)
from edge.types import ImageArray

log = logging.getLogger(__name__)


class SourceError(Exception):
    """Base of the three ways a source reports trouble."""


class SourceUnavailableError(SourceError):
    """The source cannot be opened or was lost; the loop reconnects with backoff."""


class CorruptFrameError(SourceError):
    """One unreadable image; the loop counts and skips it."""


class SourceEndedError(SourceError):
    """A non-looping replay is finished."""


@dataclass(frozen=True, slots=True)
class Grab:
    """What a source returns for one frame: the pixels and source-specific extras."""

    image: ImageArray
    meta: dict[str, Any] = field(default_factory=dict)


class FrameSource(ABC):
    """One camera-like thing. Not thread-safe: the capture thread alone calls it."""

    live: bool = False
    """True for cameras and streams (frames arrive on their own clock)."""

    @property
    @abstractmethod
    def interval_s(self) -> float:
        """Free-run pacing for on-demand sources (0 = as fast as possible; live: 0)."""

    @abstractmethod
    def open(self) -> None:
        """Open (or reopen) the source; raises :class:`SourceUnavailableError`."""

    @abstractmethod
    def read(self) -> Grab:
        """The next image; raises one of the :class:`SourceError` subclasses."""

    @abstractmethod
    def close(self) -> None:
        """Release the source; safe to call twice or when never opened."""

    @abstractmethod
    def describe(self) -> str:
        """A short human description for logs and events."""


# --------------------------------------------------------------------------- synthetic


class SyntheticSource(FrameSource):
    """The synthetic line: one rendered part per frame, some with defects.

    Frames carry ``meta = {"defect": name | None, "part_index": i}`` (plain,
    JSON-friendly values); :meth:`defect_mask` re-renders a part's ground
    truth mask. Deterministic for a seed: part ``i`` always looks the same,
    and reopening continues the line where it stopped.
    """

    live = False

    def __init__(self, cfg: SyntheticSourceConfig) -> None:
        self.cfg = cfg
        self._index = 0
        self._line_rng = np.random.default_rng([cfg.seed, 0x11E])

    @property
    def interval_s(self) -> float:
        return 60.0 / self.cfg.parts_per_minute

    def open(self) -> None:
        """Nothing to open: the line is always there."""

    def read(self) -> Grab:
        from edge.capture.synth import part_rng, render_part

        defect: str | None = None
        if self._line_rng.random() < self.cfg.defect_rate:
            defect = self.cfg.defects[int(self._line_rng.integers(0, len(self.cfg.defects)))]
        image, mask = render_part(
            part_rng(self.cfg.seed, "line", self._index), defect, self.cfg.size_px
        )
        del mask
        meta = {"defect": defect, "part_index": self._index}
        self._index += 1
        return Grab(image, meta)

    def defect_mask(self, part_index: int, defect: str | None) -> ImageArray:
        """The ground-truth mask (HxW, 0/255) of a part this source produced."""
        from edge.capture.synth import part_rng, render_part

        return render_part(part_rng(self.cfg.seed, "line", part_index), defect, self.cfg.size_px)[1]

    def close(self) -> None:
        """Nothing to release."""

    def describe(self) -> str:
        return (
            f"synthetic line ({self.cfg.parts_per_minute:g} parts/min, "
            f"defect rate {self.cfg.defect_rate:g}, seed {self.cfg.seed})"
        )


# --------------------------------------------------------------------------- image files


def decode_image_bytes(data: bytes, name: str) -> ImageArray:
    """Decode an image file's bytes to BGR, refusing empty, truncated or bad data.

    OpenCV decodes a truncated JPEG into a partly grey image with only a
    warning, so JPEG and PNG files are first checked for their end marker.
    Raises :class:`CorruptFrameError` with the reason.
    """
    if not data:
        raise CorruptFrameError(f"{name}: zero-byte file")
    if data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9":
        raise CorruptFrameError(
            f"{name}: truncated JPEG ({len(data)} bytes, no end-of-image marker)"
        )
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-16:]:
        raise CorruptFrameError(f"{name}: truncated PNG ({len(data)} bytes, no IEND chunk)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise CorruptFrameError(f"{name}: not a readable image ({len(data)} bytes)")
    return np.asarray(image, dtype=np.uint8)


class FolderSource(FrameSource):
    """Images of a folder replayed in name order; frames carry ``meta={"path": ...}``.

    The folder is listed when opened and again at each loop, so files added
    later are picked up. A missing folder, an empty one, or a full pass in
    which no image could be read makes the source unavailable (the loop then
    retries with backoff); a single bad file is a :class:`CorruptFrameError`; a
    file that vanished between listing and reading is skipped.
    """

    live = False

    def __init__(self, cfg: FolderSourceConfig) -> None:
        self.cfg = cfg
        self._files: list[Path] = []
        self._pos = 0
        self._good_this_pass = 0
        self._tried_this_pass = 0

    @property
    def interval_s(self) -> float:
        return 1.0 / self.cfg.rate_fps

    def _list(self) -> list[Path]:
        root = self.cfg.path
        if not root.is_dir():
            raise SourceUnavailableError(f"image folder {root} is missing")
        pattern = "**/*" if self.cfg.recursive else "*"
        try:
            files = sorted(
                p
                for p in root.glob(pattern)
                if p.suffix.lower() in self.cfg.extensions and p.is_file()
            )
        except OSError as exc:
            raise SourceUnavailableError(f"cannot list image folder {root}: {exc}") from exc
        if not files:
            raise SourceUnavailableError(
                f"image folder {root} holds no {'/'.join(self.cfg.extensions)} files"
            )
        return files

    def open(self) -> None:
        self._files = self._list()
        self._pos = 0
        self._good_this_pass = 0
        self._tried_this_pass = 0

    def _next_pass(self) -> None:
        if self._tried_this_pass and not self._good_this_pass:
            raise SourceUnavailableError(
                f"no readable image in {self.cfg.path} ({self._tried_this_pass} tried)"
            )
        if not self.cfg.loop:
            raise SourceEndedError(f"replayed all {len(self._files)} images of {self.cfg.path}")
        self.open()

    def read(self) -> Grab:
        for _ in range(len(self._files) + 1):
            if self._pos >= len(self._files):
                self._next_pass()
            path = self._files[self._pos]
            self._pos += 1
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                if not self.cfg.path.is_dir():
                    raise SourceUnavailableError(
                        f"image folder {self.cfg.path} is missing"
                    ) from None
                log.info("skipping %s: removed since the folder was listed", path)
                continue
            except OSError as exc:
                self._tried_this_pass += 1
                raise CorruptFrameError(f"{path.name}: cannot read ({exc})") from exc
            self._tried_this_pass += 1
            image = decode_image_bytes(data, path.name)
            self._good_this_pass += 1
            return Grab(image, {"path": str(path)})
        raise SourceUnavailableError(f"every image of {self.cfg.path} vanished")

    def close(self) -> None:
        self._files = []

    def describe(self) -> str:
        return f"image folder {self.cfg.path} at {self.cfg.rate_fps:g} fps"


# --------------------------------------------------------------------------- OpenCV captures


def _release(cap: cv2.VideoCapture | None) -> None:
    if cap is not None:
        cap.release()


class VideoFileSource(FrameSource):
    """A video file replayed like a camera; ``meta={"frame_index": n}``.

    At the end of the file the source reopens the path (when looping), so a
    file removed or replaced while playing is noticed there.
    """

    live = False

    def __init__(self, cfg: VideoSourceConfig) -> None:
        self.cfg = cfg
        self._cap: cv2.VideoCapture | None = None
        self._file_fps = 0.0
        self._index = 0

    @property
    def interval_s(self) -> float:
        rate = self.cfg.rate_fps or self._file_fps or 10.0
        return 1.0 / rate

    def open(self) -> None:
        self.close()
        path = self.cfg.path
        if not path.is_file():
            raise SourceUnavailableError(f"video file {path} is missing")
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            raise SourceUnavailableError(
                f"cannot open video file {path} (unknown or damaged format)"
            )
        self._cap = cap
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self._file_fps = fps if 0 < fps < 1000 else 0.0
        self._index = 0

    def read(self) -> Grab:
        if self._cap is None:
            raise SourceUnavailableError("video file not open")
        ok, image = self._cap.read()
        if not ok or image is None:
            if self._index == 0:
                raise SourceUnavailableError(f"no frame could be decoded from {self.cfg.path}")
            if not self.cfg.loop:
                raise SourceEndedError(f"end of {self.cfg.path} after {self._index} frames")
            self.open()
            ok, image = self._cap.read()
            if not ok or image is None:
                raise SourceUnavailableError(f"no frame could be decoded from {self.cfg.path}")
        grab = Grab(np.asarray(image, dtype=np.uint8), {"frame_index": self._index})
        self._index += 1
        return grab

    def close(self) -> None:
        _release(self._cap)
        self._cap = None

    def describe(self) -> str:
        return f"video file {self.cfg.path}"


class DeviceSource(FrameSource):
    """A local camera through OpenCV (V4L2 on Linux) with the requested settings.

    Settings the driver refuses or changes are logged with the value it
    actually uses; they never stop the camera.
    """

    live = True

    def __init__(self, cfg: DeviceSourceConfig) -> None:
        self.cfg = cfg
        self._cap: cv2.VideoCapture | None = None

    @property
    def interval_s(self) -> float:
        return 0.0

    def _target(self) -> int | str:
        dev = self.cfg.device
        if isinstance(dev, str) and dev.isdigit():
            return int(dev)
        return dev

    def open(self) -> None:
        self.close()
        target = self._target()
        if isinstance(target, str) and target.startswith("/dev/") and not os.path.exists(target):
            raise SourceUnavailableError(f"camera device {target} does not exist (unplugged?)")
        api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
        cap = cv2.VideoCapture(target, api)
        if not cap.isOpened():
            cap.release()
            raise SourceUnavailableError(f"cannot open camera device {target!r}")
        self._apply_settings(cap)
        self._cap = cap

    def _apply_settings(self, cap: cv2.VideoCapture) -> None:
        c = self.cfg
        wanted: list[tuple[str, int, float]] = []
        if c.fourcc:
            wanted.append(("fourcc", cv2.CAP_PROP_FOURCC, float(cv2.VideoWriter.fourcc(*c.fourcc))))
        if c.width_px:
            wanted.append(("width_px", cv2.CAP_PROP_FRAME_WIDTH, float(c.width_px)))
        if c.height_px:
            wanted.append(("height_px", cv2.CAP_PROP_FRAME_HEIGHT, float(c.height_px)))
        if c.fps:
            wanted.append(("fps", cv2.CAP_PROP_FPS, float(c.fps)))
        if c.auto_exposure is not None:
            # V4L2 through OpenCV: 3 = aperture-priority auto, 1 = manual.
            wanted.append(
                ("auto_exposure", cv2.CAP_PROP_AUTO_EXPOSURE, 3.0 if c.auto_exposure else 1.0)
            )
        if c.exposure is not None:
            wanted.append(("exposure", cv2.CAP_PROP_EXPOSURE, float(c.exposure)))
        wanted.append(("buffer_frames", cv2.CAP_PROP_BUFFERSIZE, float(c.buffer_frames)))
        for name, prop, value in wanted:
            accepted = bool(cap.set(prop, value))
            actual = float(cap.get(prop))
            if not accepted or abs(actual - value) > 1e-3 * max(abs(value), 1.0):
                log.warning(
                    "camera %s: driver did not take %s=%g (uses %g)", c.device, name, value, actual
                )

    def read(self) -> Grab:
        if self._cap is None:
            raise SourceUnavailableError("camera not open")
        ok, image = self._cap.read()
        if not ok or image is None:
            raise SourceUnavailableError(
                f"camera {self.cfg.device!r} stopped delivering frames (unplugged?)"
            )
        return Grab(np.asarray(image, dtype=np.uint8))

    def close(self) -> None:
        _release(self._cap)
        self._cap = None

    def describe(self) -> str:
        return f"camera device {self.cfg.device!r}"


class StreamSource(FrameSource):
    """An RTSP/HTTP stream (FFmpeg) or a GStreamer pipeline string."""

    live = True

    def __init__(self, cfg: StreamSourceConfig) -> None:
        self.cfg = cfg
        self._cap: cv2.VideoCapture | None = None

    @property
    def interval_s(self) -> float:
        return 0.0

    def _api(self) -> int:
        backend = self.cfg.backend
        if backend == "auto":
            backend = "gstreamer" if "!" in self.cfg.url else "ffmpeg"
        return cv2.CAP_GSTREAMER if backend == "gstreamer" else cv2.CAP_FFMPEG

    def open(self) -> None:
        self.close()
        api = self._api()
        if api == cv2.CAP_GSTREAMER and not _has_backend(cv2.CAP_GSTREAMER):
            raise SourceUnavailableError(
                "this OpenCV build has no GStreamer support; on a Jetson use the system "
                "OpenCV (python3-opencv built with GStreamer) or give an rtsp:// URL"
            )
        params: list[int] = []
        for name, seconds in (
            ("CAP_PROP_OPEN_TIMEOUT_MSEC", self.cfg.open_timeout_s),
            ("CAP_PROP_READ_TIMEOUT_MSEC", self.cfg.read_timeout_s),
        ):
            prop = getattr(cv2, name, None)  # missing in OpenCV < 4.5.2 (JetPack 4)
            if prop is not None:
                params += [int(prop), int(seconds * 1000)]
        try:
            cap = cv2.VideoCapture(self.cfg.url, api, params)
        except TypeError:  # OpenCV without the (url, api, params) overload
            cap = cv2.VideoCapture(self.cfg.url, api)
        if not cap.isOpened():
            cap.release()
            raise SourceUnavailableError(f"cannot open stream {self._redacted()}")
        self._cap = cap

    def _redacted(self) -> str:
        """The URL without a password (rtsp://user:pass@host -> rtsp://user:***@host)."""
        url = self.cfg.url
        if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
            scheme, rest = url.split("://", 1)
            creds, host = rest.split("@", 1)
            user = creds.split(":", 1)[0]
            return f"{scheme}://{user}:***@{host}"
        return url

    def read(self) -> Grab:
        if self._cap is None:
            raise SourceUnavailableError("stream not open")
        ok, image = self._cap.read()
        if not ok or image is None:
            raise SourceUnavailableError(f"stream {self._redacted()} stopped delivering frames")
        return Grab(np.asarray(image, dtype=np.uint8))

    def close(self) -> None:
        _release(self._cap)
        self._cap = None

    def describe(self) -> str:
        return f"stream {self._redacted()}"


def _has_backend(api: int) -> bool:
    """Whether this OpenCV build has a video I/O backend (True when it cannot tell)."""
    registry = getattr(cv2, "videoio_registry", None)
    if registry is None:
        return True
    return bool(registry.hasBackend(api))


def open_source(cfg: CameraSourceConfig) -> FrameSource:
    """The frame source for a ``camera.source`` config (not yet opened)."""
    if isinstance(cfg, SyntheticSourceConfig):
        return SyntheticSource(cfg)
    if isinstance(cfg, DeviceSourceConfig):
        return DeviceSource(cfg)
    if isinstance(cfg, StreamSourceConfig):
        return StreamSource(cfg)
    if isinstance(cfg, VideoSourceConfig):
        return VideoFileSource(cfg)
    return FolderSource(cfg)
