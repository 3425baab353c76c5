"""The capture loop: one thread reads the source and hands frames on.

Backpressure policy (explicit, see docs/capture.md):

- **free_run**: the hand-off holds one frame, the latest. A new frame
  replaces one nobody took yet, and that replaced frame is counted in
  ``drops``. Consumers call :meth:`CaptureLoop.latest`; frames never queue
  up, so a slow consumer always inspects the freshest image. Sequence gaps
  are exactly the dropped frames.
- **triggered**: each :meth:`CaptureLoop.trigger` (or :meth:`submit`) is a
  request in a bounded FIFO (``camera.max_pending_triggers``). Every request
  ends in exactly one of: a :class:`~edge.types.Frame` carrying its trigger
  id, or a :class:`CaptureError` subclass (timeout, camera unavailable,
  overrun, stopped). Nothing is dropped silently. On-demand sources
  (synthetic, video, folder) read one frame per request; live sources
  (device, stream) are read continuously and a request takes the first frame
  grabbed after it was made.

Failures never escape the thread: a lost source publishes ``camera.lost``,
then ``camera.reconnect_failed`` per failed attempt with exponential backoff,
then ``camera.recovered``; a corrupt image publishes ``camera.corrupt_frame``
and is skipped; a finished replay publishes ``camera.ended``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from edge.capture.config import CameraConfig
from edge.capture.sources import (
    CorruptFrameError,
    FrameSource,
    Grab,
    SourceEndedError,
    SourceUnavailableError,
    open_source,
)
from edge.events import EventBus
from edge.types import Frame, ImageArray, Severity

log = logging.getLogger(__name__)

CaptureState = Literal["idle", "connecting", "running", "reconnecting", "ended", "stopped"]


class CaptureError(Exception):
    """A trigger that got no frame; ``trigger_id`` says which, ``reason`` why."""

    reason = "error"

    def __init__(self, message: str, trigger_id: int | None = None) -> None:
        super().__init__(message)
        self.trigger_id = trigger_id


class TriggerTimeoutError(CaptureError):
    """No frame arrived within the trigger's deadline."""

    reason = "timeout"


class CameraUnavailableError(CaptureError):
    """The source is down (reconnecting) or its replay has ended."""

    reason = "camera_unavailable"


class TriggerOverrunError(CaptureError):
    """Too many triggers were already waiting for a frame."""

    reason = "overrun"


class CaptureStoppedError(CaptureError):
    """The loop is stopped (or stopping)."""

    reason = "stopped"


class WrongModeError(CaptureError):
    """latest() in triggered mode, or trigger() in free-run mode."""

    reason = "wrong_mode"


@dataclass(frozen=True, slots=True)
class CaptureStats:
    """Counters of one capture loop, for the panel, telemetry and logs."""

    source_id: str
    mode: str
    state: CaptureState
    source: str
    """Human description of the source."""
    frames: int
    """Frames handed on (free-run: put in the hand-off; triggered: given to a trigger)."""
    grabbed: int
    """Good images read from the source (live triggered sources read more than they hand on)."""
    drops: int
    """Free-run frames replaced before anyone took them."""
    corrupt: int
    """Unreadable images skipped."""
    reconnects: int
    """Times the source came back after being lost."""
    reconnect_attempts: int
    """Failed attempts to (re)open the source."""
    triggers: int
    """Triggers requested."""
    trigger_failures: int
    """Triggers that ended in a CaptureError."""
    fps: float
    """Grab rate over the last few seconds (0 when the source is silent)."""
    last_frame_age_s: float | None
    """Seconds since the last good image, None before the first."""
    last_error: str


@dataclass(slots=True)
class _Request:
    trigger_id: int
    future: concurrent.futures.Future[Frame]
    requested_at: float
    skip_left: int
    """Live sources: frames still to discard after the request (trigger_settle_frames)."""


_FPS_WINDOW_S = 5.0
_POLL_S = 0.1


class CaptureLoop:
    """Reads one frame source on a thread and hands frames on (a :class:`Component`).

    ``source`` overrides the one built from ``cfg.source`` (tests, custom
    sources). All public methods are thread-safe.
    """

    name = "capture"

    def __init__(
        self, cfg: CameraConfig, events: EventBus, source: FrameSource | None = None
    ) -> None:
        self.cfg = cfg
        self.events = events
        self.source = source if source is not None else open_source(cfg.source)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state: CaptureState = "idle"
        self._latest: Frame | None = None
        self._latest_taken = True
        self._pending: collections.deque[_Request] = collections.deque()
        self._sequence = 0
        self._grab_times: collections.deque[float] = collections.deque(maxlen=512)
        self._frames = 0
        self._grabbed = 0
        self._drops = 0
        self._corrupt = 0
        self._reconnects = 0
        self._attempts = 0
        self._triggers = 0
        self._trigger_failures = 0
        self._last_grab: float | None = None
        self._last_error = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the capture thread (returns at once; the source opens on the thread)."""
        with self._cond:
            if self._thread is not None:
                return
            self._stop.clear()
            self._state = "connecting"
            self._thread = threading.Thread(
                target=self._run, name=f"capture-{self.cfg.id}", daemon=True
            )
            self._thread.start()
        log.info("capture %s: started (%s, %s)", self.cfg.id, self.cfg.mode, self.source.describe())

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread, fail waiting triggers with CaptureStoppedError, close the source."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning(
                    "capture %s: thread still blocked in the source after %.1f s",
                    self.cfg.id,
                    timeout_s,
                )
        with self._cond:
            self._state = "stopped"
            self._fail_pending(CaptureStoppedError, "capture stopped")
            self._thread = None
            self._cond.notify_all()
        if thread is None or not thread.is_alive():
            self.source.close()

    # ------------------------------------------------------------------ consumers

    @property
    def state(self) -> CaptureState:
        with self._cond:
            return self._state

    def latest(self, timeout_s: float) -> Frame | None:
        """Free-run: the newest frame not yet returned, waiting up to ``timeout_s``.

        Returns None on timeout or when the loop stops. Each frame is returned
        once; frames replaced before being taken are counted as drops.
        """
        if self.cfg.mode != "free_run":
            raise WrongModeError("latest() needs camera.mode free_run")
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._latest_taken and not self._stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            if self._latest_taken or self._latest is None or self._stop.is_set():
                return None
            self._latest_taken = True
            return self._latest

    def peek(self) -> Frame | None:
        """The most recent frame handed on (taken or not), for previews; never consumes."""
        with self._cond:
            return self._latest

    def submit(self, trigger_id: int) -> concurrent.futures.Future[Frame]:
        """Triggered: request one frame; the future ends with a Frame or a CaptureError.

        Fails at once (an already-failed future) when the camera is down,
        the replay ended, the loop is stopped, or too many triggers wait.
        """
        if self.cfg.mode != "triggered":
            raise WrongModeError("trigger() needs camera.mode triggered", trigger_id)
        fut: concurrent.futures.Future[Frame] = concurrent.futures.Future()
        with self._cond:
            self._triggers += 1
            error: CaptureError | None = None
            if self._stop.is_set() or self._state in {"idle", "stopped"}:
                error = CaptureStoppedError("capture is not running", trigger_id)
            elif self._state == "ended":
                error = CameraUnavailableError(f"source ended: {self._last_error}", trigger_id)
            elif self._state == "reconnecting":
                error = CameraUnavailableError(
                    f"camera unavailable: {self._last_error}", trigger_id
                )
            elif len(self._pending) >= self.cfg.max_pending_triggers:
                error = TriggerOverrunError(
                    f"{len(self._pending)} triggers already waiting for a frame", trigger_id
                )
            if error is not None:
                self._trigger_failures += 1
                fut.set_exception(error)
                return fut
            settle = self.cfg.trigger_settle_frames if self.source.live else 0
            self._pending.append(_Request(trigger_id, fut, time.monotonic(), settle))
            self._cond.notify_all()
        return fut

    def trigger(self, trigger_id: int, timeout_s: float | None = None) -> Frame:
        """Triggered: exactly one frame for this trigger, or a :class:`CaptureError`.

        ``timeout_s`` defaults to ``camera.trigger_timeout_s``. On timeout the
        request is withdrawn, so a late frame is never handed to it.
        """
        fut = self.submit(trigger_id)
        wait_s = self.cfg.trigger_timeout_s if timeout_s is None else timeout_s
        try:
            return fut.result(timeout=wait_s)
        except concurrent.futures.TimeoutError:
            with self._cond:
                for req in list(self._pending):
                    if req.future is fut:
                        self._pending.remove(req)
                cancelled = fut.cancel()
                if cancelled:
                    self._trigger_failures += 1
            if cancelled:
                raise TriggerTimeoutError(
                    f"no frame for trigger {trigger_id} within {wait_s:g} s", trigger_id
                ) from None
            return fut.result()  # completed while we were withdrawing it

    def stats(self) -> CaptureStats:
        """A snapshot of the counters."""
        now = time.monotonic()
        with self._cond:
            recent = [t for t in self._grab_times if t >= now - _FPS_WINDOW_S]
            fps = 0.0
            if len(recent) >= 2 and recent[-1] > recent[0]:
                fps = (len(recent) - 1) / (recent[-1] - recent[0])
            return CaptureStats(
                source_id=self.cfg.id,
                mode=self.cfg.mode,
                state=self._state,
                source=self.source.describe(),
                frames=self._frames,
                grabbed=self._grabbed,
                drops=self._drops,
                corrupt=self._corrupt,
                reconnects=self._reconnects,
                reconnect_attempts=self._attempts,
                triggers=self._triggers,
                trigger_failures=self._trigger_failures,
                fps=fps,
                last_frame_age_s=None if self._last_grab is None else now - self._last_grab,
                last_error=self._last_error,
            )

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # the last line of defence: report, never crash the app
            log.exception("capture %s: loop failed", self.cfg.id)
            with self._cond:
                self._state = "stopped"
                self._last_error = f"internal error: {exc!r}"
                self._fail_pending(CameraUnavailableError, self._last_error)
            self.events.emit(
                "camera.error", self.cfg.id, f"capture loop failed: {exc!r}", Severity.ERROR
            )

    def _loop(self) -> None:
        delay_s = self.cfg.reconnect.initial_delay_s
        lost_since: float | None = None
        while not self._stop.is_set():
            if not self._try_open(lost_since, delay_s):
                if lost_since is None:
                    lost_since = time.monotonic()
                if self._stop.wait(delay_s):
                    break
                delay_s = min(delay_s * self.cfg.reconnect.factor, self.cfg.reconnect.max_delay_s)
                continue
            lost_since = None
            delay_s = self.cfg.reconnect.initial_delay_s
            outcome = self._read_until_failure()
            if outcome == "ended":
                self._idle_until_stopped()
                return
            if outcome == "lost":
                lost_since = time.monotonic()
                if self._stop.wait(delay_s):
                    break
                delay_s = min(delay_s * self.cfg.reconnect.factor, self.cfg.reconnect.max_delay_s)

    def _try_open(self, lost_since: float | None, next_delay_s: float) -> bool:
        """Open the source; on failure publish events announcing the next wait."""
        try:
            self.source.open()
        except (SourceUnavailableError, OSError, cv2.error) as exc:
            self._close_quietly()
            with self._cond:
                self._attempts += 1
                attempt = self._attempts
                first = lost_since is None
                self._last_error = str(exc)
                self._state = "reconnecting"
                self._fail_pending(CameraUnavailableError, f"camera unavailable: {exc}")
            if first:
                self.events.emit(
                    "camera.lost",
                    self.cfg.id,
                    f"cannot open source: {exc}",
                    Severity.ERROR,
                    error=str(exc),
                    description=self.source.describe(),
                )
            self.events.emit(
                "camera.reconnect_failed",
                self.cfg.id,
                f"attempt {attempt} failed: {exc}; next try in {next_delay_s:.2f} s",
                Severity.WARNING,
                attempt=attempt,
                error=str(exc),
                next_delay_s=next_delay_s,
            )
            return False
        was_down = lost_since is not None
        with self._cond:
            self._state = "running"
            self._last_error = ""
            if was_down:
                self._reconnects += 1
            self._cond.notify_all()
        if was_down:
            downtime = 0.0 if lost_since is None else time.monotonic() - lost_since
            self.events.emit(
                "camera.recovered",
                self.cfg.id,
                f"source back after {downtime:.1f} s: {self.source.describe()}",
                Severity.INFO,
                downtime_s=downtime,
            )
        else:
            self.events.emit(
                "camera.connected", self.cfg.id, f"opened {self.source.describe()}", Severity.INFO
            )
        return True

    def _read_until_failure(self) -> Literal["lost", "ended", "stopped"]:
        next_due = time.monotonic()
        source = self.source
        triggered = self.cfg.mode == "triggered"
        ready: Grab | None = None  # triggered on-demand sources: the next part, already read
        while not self._stop.is_set():
            if triggered and not source.live and ready is not None:
                with self._cond:
                    while not self._pending and not self._stop.is_set():
                        self._cond.wait(_POLL_S)
                    if self._stop.is_set():
                        break
                self._deliver(ready)
                ready = None
                continue
            if not triggered and not source.live and source.interval_s > 0:
                wait_s = next_due - time.monotonic()
                if wait_s > 0 and self._stop.wait(wait_s):
                    break
                now = time.monotonic()
                next_due = max(next_due + source.interval_s, now - source.interval_s)
            result = self._read_once()
            if isinstance(result, Grab):
                if triggered and not source.live:
                    ready = result  # handed to the next trigger the moment it arrives
                else:
                    self._deliver(result)
            elif result != "corrupt":
                return result
        return "stopped"

    def _read_once(self) -> Grab | Literal["corrupt", "lost", "ended"]:
        """One read from the source, its failures already reported."""
        try:
            grab = self.source.read()
            return Grab(_as_bgr(grab.image), grab.meta)
        except (CorruptFrameError, ValueError) as exc:
            self._on_corrupt(str(exc))
            return "corrupt"
        except SourceEndedError as exc:
            self._on_ended(str(exc))
            return "ended"
        except (SourceUnavailableError, OSError, cv2.error) as exc:
            self._on_lost(str(exc))
            return "lost"

    def _deliver(self, grab: Grab) -> None:
        """Hand a (converted) image on: to the free-run slot or to the oldest trigger."""
        now = time.monotonic()
        image = grab.image
        with self._cond:
            self._grabbed += 1
            self._grab_times.append(now)
            self._last_grab = now
            if self.cfg.mode == "free_run":
                frame = self._frame(image, now, None, grab)
                if not self._latest_taken:
                    self._drops += 1
                self._latest, self._latest_taken = frame, False
                self._cond.notify_all()
                return
            for req in list(self._pending):
                if req.future.cancelled():
                    self._pending.remove(req)  # withdrawn (timed out) meanwhile
                    continue
                if req.requested_at > now:
                    break  # this and later requests came after the frame was read
                if req.skip_left > 0:
                    req.skip_left -= 1  # may have been exposed before the trigger
                    continue
                self._pending.remove(req)
                if not req.future.set_running_or_notify_cancel():
                    continue
                frame = self._frame(image, now, req.trigger_id, grab)
                self._latest, self._latest_taken = frame, True
                req.future.set_result(frame)
                return

    def _frame(self, image: ImageArray, now: float, trigger_id: int | None, grab: Grab) -> Frame:
        frame = Frame(
            image=image,
            capture_time=now,
            sequence=self._sequence,
            source_id=self.cfg.id,
            trigger_id=trigger_id,
            meta=grab.meta,
        )
        self._sequence += 1
        self._frames += 1
        return frame

    def _on_corrupt(self, detail: str) -> None:
        with self._cond:
            self._corrupt += 1
            count = self._corrupt
        self.events.emit(
            "camera.corrupt_frame",
            self.cfg.id,
            f"skipped corrupt frame: {detail}",
            Severity.WARNING,
            detail=detail,
            corrupt_total=count,
        )

    def _on_lost(self, detail: str) -> None:
        self._close_quietly()
        with self._cond:
            self._state = "reconnecting"
            self._last_error = detail
            self._fail_pending(CameraUnavailableError, f"camera lost: {detail}")
        self.events.emit(
            "camera.lost",
            self.cfg.id,
            f"source lost: {detail}",
            Severity.ERROR,
            error=detail,
            description=self.source.describe(),
        )

    def _on_ended(self, detail: str) -> None:
        self._close_quietly()
        with self._cond:
            self._state = "ended"
            self._last_error = detail
            self._fail_pending(CameraUnavailableError, f"source ended: {detail}")
        self.events.emit("camera.ended", self.cfg.id, detail, Severity.WARNING)

    def _idle_until_stopped(self) -> None:
        while not self._stop.wait(_POLL_S * 5):
            pass

    def _fail_pending(self, kind: type[CaptureError], message: str) -> None:
        """Fail every waiting trigger (call with the lock held)."""
        while self._pending:
            req = self._pending.popleft()
            if req.future.set_running_or_notify_cancel():
                self._trigger_failures += 1
                req.future.set_exception(
                    kind(f"trigger {req.trigger_id}: {message}", req.trigger_id)
                )

    def _close_quietly(self) -> None:
        try:
            self.source.close()
        except Exception:
            log.exception("capture %s: closing the source failed", self.cfg.id)


def _as_bgr(image: ImageArray) -> ImageArray:
    """A read-only, contiguous HxWx3 uint8 BGR copy-free view when possible."""
    arr: ImageArray = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in {2, 3} or arr.size == 0:
        raise ValueError(f"source gave an unusable image (dtype {arr.dtype}, shape {arr.shape})")
    if arr.ndim == 2:
        arr = np.asarray(cv2.cvtColor(arr, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
    elif arr.shape[2] == 4:
        arr = np.asarray(cv2.cvtColor(arr, cv2.COLOR_BGRA2BGR), dtype=np.uint8)
    elif arr.shape[2] == 1:
        arr = np.asarray(cv2.cvtColor(arr, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
    elif arr.shape[2] != 3:
        raise ValueError(f"source gave an image with {arr.shape[2]} channels")
    out = np.ascontiguousarray(arr, dtype=np.uint8)
    out.flags.writeable = False
    return out
