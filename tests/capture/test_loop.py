"""The capture loop: backpressure policies, failures, reconnect with backoff."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.capture.config import CameraConfig
from edge.capture.loop import (
    CameraUnavailableError,
    CaptureLoop,
    CaptureStoppedError,
    TriggerOverrunError,
    TriggerTimeoutError,
    WrongModeError,
)
from edge.capture.sources import FrameSource, Grab
from edge.events import EventBus
from edge.types import Component, Frame

FAST_RECONNECT = {"initial_delay_s": 0.05, "max_delay_s": 0.4, "factor": 2.0}


def camera(source: dict[str, Any], **kw: Any) -> CameraConfig:
    return CameraConfig.model_validate({"source": source, "reconnect": FAST_RECONNECT, **kw})


def synthetic(ppm: float = 6000, **kw: Any) -> dict[str, Any]:
    return {"type": "synthetic", "parts_per_minute": ppm, "size_px": 32, **kw}


def fresh_frame(loop: CaptureLoop, after: float, timeout_s: float = 5.0) -> Frame | None:
    """The first free-run frame captured after ``after`` (monotonic), or None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        frame = loop.latest(0.5)
        if frame is not None and frame.capture_time > after:
            return frame
    return None


class GatedSource(FrameSource):
    """An on-demand test source whose reads block until the test opens the gate."""

    live = False

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.reads = 0

    @property
    def interval_s(self) -> float:
        return 0.0

    def open(self) -> None:
        """Nothing to open."""

    def read(self) -> Grab:
        self.gate.wait(5)
        self.reads += 1
        return Grab(np.full((8, 8, 3), self.reads, np.uint8))

    def close(self) -> None:
        self.gate.set()

    def describe(self) -> str:
        return "gated test source"


def test_free_run_keeps_latest_and_counts_drops(bus: EventBus, stop_after: list[object]) -> None:
    loop = CaptureLoop(camera(synthetic(ppm=3000)), bus)  # 50 parts/s
    stop_after.append(loop)
    assert isinstance(loop, Component)
    loop.start()
    first = loop.latest(5.0)
    assert first is not None
    time.sleep(0.5)  # a consumer that falls behind
    taken = [first]
    for _ in range(5):
        frame = loop.latest(2.0)
        assert frame is not None
        taken.append(frame)
    loop.stop()
    stats = loop.stats()
    assert stats.drops > 5
    # Every frame handed on was taken, replaced (a drop) or is still waiting (at most one).
    assert stats.frames - len(taken) - stats.drops in {0, 1}
    seqs = [f.sequence for f in taken]
    assert seqs == sorted(set(seqs))
    assert seqs[1] - seqs[0] > 5  # the slow consumer got the freshest frame, not a backlog
    assert stats.fps > 5
    assert stats.state == "stopped"
    assert not first.image.flags.writeable  # frames are read-only
    assert loop.latest(0.01) is None  # stopped: nothing more


def test_triggered_one_frame_per_trigger(bus: EventBus, stop_after: list[object]) -> None:
    loop = CaptureLoop(camera(synthetic(), mode="triggered"), bus)
    stop_after.append(loop)
    loop.start()
    frames = [loop.trigger(1000 + i, timeout_s=5.0) for i in range(6)]
    assert [f.trigger_id for f in frames] == list(range(1000, 1006))
    assert [f.sequence for f in frames] == list(range(6))
    futures = [loop.submit(i) for i in range(4)]  # several at once, each its own frame
    got = [f.result(timeout=5.0) for f in futures]
    assert [f.trigger_id for f in got] == [0, 1, 2, 3]
    assert len({f.sequence for f in got}) == 4
    time.sleep(0.3)  # triggered mode never captures on its own
    stats = loop.stats()
    assert stats.frames == 10
    assert stats.triggers == 10
    assert stats.trigger_failures == 0
    with pytest.raises(WrongModeError):
        loop.latest(0.1)


def test_trigger_timeout_overrun_and_no_late_delivery(
    bus: EventBus, stop_after: list[object]
) -> None:
    src = GatedSource()
    loop = CaptureLoop(
        camera(synthetic(), mode="triggered", max_pending_triggers=2), bus, source=src
    )
    stop_after.append(loop)
    loop.start()
    with pytest.raises(TriggerTimeoutError) as info:
        loop.trigger(1, timeout_s=0.1)
    assert info.value.trigger_id == 1
    assert info.value.reason == "timeout"
    waiting = [loop.submit(2), loop.submit(3)]
    overrun = loop.submit(4)
    with pytest.raises(TriggerOverrunError):
        overrun.result(timeout=0)
    src.gate.set()
    results = [f.result(timeout=5.0) for f in waiting]
    # Trigger 1 timed out and was withdrawn: its (late) frame never goes to anyone else.
    assert [f.trigger_id for f in results] == [2, 3]
    stats = loop.stats()
    assert stats.trigger_failures == 2  # timeout + overrun
    assert stats.triggers == 4


def test_stop_fails_waiting_triggers(bus: EventBus) -> None:
    src = GatedSource()
    loop = CaptureLoop(camera(synthetic(), mode="triggered"), bus, source=src)
    loop.start()
    fut = loop.submit(7)
    time.sleep(0.05)
    threading.Timer(0.05, src.gate.set).start()
    loop.stop()
    # Either the frame made it just before the stop, or the trigger failed explicitly.
    exc = fut.exception(timeout=1.0)
    if exc is None:
        assert fut.result().trigger_id == 7
    else:
        assert isinstance(exc, CaptureStoppedError)
        assert exc.trigger_id == 7
    with pytest.raises(CaptureStoppedError):
        loop.trigger(8, timeout_s=0.1)
    free = CaptureLoop(camera(synthetic()), bus)
    with pytest.raises(WrongModeError):
        free.trigger(1)


def test_folder_with_bad_files_counts_corrupt_and_keeps_going(
    tmp_path: Path,
    bus: EventBus,
    event_log: Any,
    stop_after: list[object],
    make_png: Callable[..., Path],
    make_jpeg: Callable[..., bytes],
) -> None:
    folder = tmp_path / "replay"
    folder.mkdir()
    make_png(folder / "01.png", 10)
    jpeg = make_jpeg(2)
    (folder / "02.jpg").write_bytes(jpeg[:-200])  # truncated JPEG
    (folder / "03.png").write_bytes(b"")  # zero-byte file
    make_png(folder / "04.png", 40)
    loop = CaptureLoop(
        camera({"type": "folder", "path": str(folder), "rate_fps": 200}, mode="triggered"), bus
    )
    stop_after.append(loop)
    loop.start()
    frames = [loop.trigger(i, timeout_s=5.0) for i in range(4)]
    names = [Path(f.meta["path"]).name for f in frames]
    assert names == ["01.png", "04.png", "01.png", "04.png"]
    stats = loop.stats()
    assert stats.corrupt == 4  # 02 and 03, once per pass
    corrupt = event_log.of("camera.corrupt_frame")
    assert len(corrupt) == 4
    assert "02.jpg: truncated JPEG" in corrupt[0].message
    assert "03.png: zero-byte file" in corrupt[1].message
    assert stats.state == "running"


def test_folder_disappears_and_comes_back(
    tmp_path: Path,
    bus: EventBus,
    event_log: Any,
    stop_after: list[object],
    make_png: Callable[..., Path],
) -> None:
    folder = tmp_path / "cam"
    folder.mkdir()
    for i in range(3):
        make_png(folder / f"{i}.png", 30 * i)
    loop = CaptureLoop(camera({"type": "folder", "path": str(folder), "rate_fps": 100}), bus)
    stop_after.append(loop)
    loop.start()
    assert loop.latest(5.0) is not None
    aside = tmp_path / "aside"
    folder.rename(aside)  # the source disappears mid-run
    event_log.wait_kind("camera.lost")
    event_log.wait_kind("camera.reconnect_failed", 3)
    assert loop.state == "reconnecting"
    delays = [e.data["next_delay_s"] for e in event_log.of("camera.reconnect_failed")[:4]]
    assert delays[:3] == pytest.approx([0.1, 0.2, 0.4])  # exponential backoff...
    aside.rename(folder)  # ...and it comes back
    event_log.wait_kind("camera.recovered")
    assert fresh_frame(loop, time.monotonic()) is not None
    stats = loop.stats()
    assert stats.reconnects == 1
    assert stats.reconnect_attempts >= 3
    kinds = event_log.kinds()
    assert (
        kinds.index("camera.connected")
        < kinds.index("camera.lost")
        < kinds.index("camera.recovered")
    )


def test_backoff_is_capped(
    bus: EventBus, event_log: Any, stop_after: list[object], tmp_path: Path
) -> None:
    loop = CaptureLoop(camera({"type": "folder", "path": str(tmp_path / "never")}), bus)
    stop_after.append(loop)
    loop.start()
    event_log.wait_kind("camera.reconnect_failed", 5)
    delays = [e.data["next_delay_s"] for e in event_log.of("camera.reconnect_failed")[:5]]
    assert delays == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.4])
    assert len(event_log.of("camera.lost")) == 1  # one loss, many attempts


def test_video_file_removed_mid_run_then_restored(
    tmp_path: Path,
    bus: EventBus,
    event_log: Any,
    stop_after: list[object],
    make_video: Callable[..., Path],
) -> None:
    path = make_video(tmp_path / "line.avi", 5)
    loop = CaptureLoop(camera({"type": "video", "path": str(path), "rate_fps": 200}), bus)
    stop_after.append(loop)
    loop.start()
    assert loop.latest(5.0) is not None
    aside = path.with_suffix(".bak")
    path.rename(aside)
    event_log.wait_kind("camera.lost")  # noticed when the replay loops and reopens
    aside.rename(path)
    event_log.wait_kind("camera.recovered")
    frame = fresh_frame(loop, time.monotonic())
    assert frame is not None
    assert frame.image.shape == (48, 64, 3)
    assert loop.stats().reconnects >= 1


def test_triggers_fail_fast_while_camera_is_down(
    tmp_path: Path, bus: EventBus, event_log: Any, stop_after: list[object]
) -> None:
    loop = CaptureLoop(
        camera({"type": "folder", "path": str(tmp_path / "absent")}, mode="triggered"), bus
    )
    stop_after.append(loop)
    loop.start()
    event_log.wait_kind("camera.lost")
    t0 = time.monotonic()
    with pytest.raises(CameraUnavailableError, match="camera unavailable") as info:
        loop.trigger(5, timeout_s=3.0)
    assert time.monotonic() - t0 < 1.0  # an explicit failure, not a wait for the deadline
    assert info.value.trigger_id == 5
    assert loop.stats().trigger_failures == 1


def test_non_looping_replay_ends_and_refuses_triggers(
    tmp_path: Path,
    bus: EventBus,
    event_log: Any,
    stop_after: list[object],
    make_video: Callable[..., Path],
) -> None:
    path = make_video(tmp_path / "once.avi", 2)
    loop = CaptureLoop(
        camera({"type": "video", "path": str(path), "loop": False}, mode="triggered"), bus
    )
    stop_after.append(loop)
    loop.start()
    assert loop.trigger(1, timeout_s=5.0).trigger_id == 1
    assert loop.trigger(2, timeout_s=5.0).trigger_id == 2
    with pytest.raises(CameraUnavailableError, match="ended"):
        loop.trigger(3, timeout_s=5.0)
    event_log.wait_kind("camera.ended")
    with pytest.raises(CameraUnavailableError, match="ended"):
        loop.trigger(4, timeout_s=1.0)
    assert loop.state == "ended"


def test_missing_device_reports_and_retries_without_crashing(
    bus: EventBus, event_log: Any, stop_after: list[object]
) -> None:
    loop = CaptureLoop(camera({"type": "device", "device": "/dev/video99"}), bus)
    stop_after.append(loop)
    loop.start()
    event_log.wait_kind("camera.reconnect_failed", 2)
    lost = event_log.of("camera.lost")[0]
    assert lost.severity == "error"
    assert "/dev/video99" in lost.message
    assert loop.latest(0.05) is None
    assert bus.latest()[("camera0", "camera")].kind == "camera.reconnect_failed"


class FlakySource(GatedSource):
    """Returns an unusable image once (wrong dtype): the loop counts it as corrupt."""

    def read(self) -> Grab:
        self.reads += 1
        if self.reads == 1:
            return Grab(np.zeros((4, 4, 3), np.float32))
        return Grab(np.zeros((4, 4), np.uint8))  # grey: becomes BGR


def test_unusable_images_are_skipped_and_grey_becomes_bgr(
    bus: EventBus, stop_after: list[object]
) -> None:
    loop = CaptureLoop(camera(synthetic(), mode="triggered"), bus, source=FlakySource())
    stop_after.append(loop)
    loop.start()
    frame: Frame = loop.trigger(1, timeout_s=5.0)
    assert frame.image.shape == (4, 4, 3)
    assert loop.stats().corrupt == 1


def test_submit_futures_work_with_concurrent_wait(bus: EventBus, stop_after: list[object]) -> None:
    loop = CaptureLoop(camera(synthetic(), mode="triggered"), bus)
    stop_after.append(loop)
    loop.start()
    futs = [loop.submit(i) for i in range(3)]
    done, _ = concurrent.futures.wait(futs, timeout=5.0)
    assert len(done) == 3


def test_triggered_on_demand_source_reads_one_part_ahead(
    bus: EventBus, stop_after: list[object]
) -> None:
    src = GatedSource()
    src.gate.set()
    loop = CaptureLoop(camera(synthetic(), mode="triggered"), bus, source=src)
    stop_after.append(loop)
    loop.start()
    deadline = time.monotonic() + 5
    while src.reads < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert src.reads == 1  # exactly one part waits, ready for the next trigger
    assert loop.stats().frames == 0
    frame = loop.trigger(9, timeout_s=5.0)
    assert int(frame.image[0, 0, 0]) == 1  # the part read ahead
    assert frame.capture_time >= time.monotonic() - 5.0


def test_network_stream_goes_down_and_comes_back(
    bus: EventBus, event_log: Any, stop_after: list[object], mjpeg_camera: Any
) -> None:
    source = {"type": "stream", "url": mjpeg_camera.url, "open_timeout_s": 2, "read_timeout_s": 1}
    loop = CaptureLoop(camera(source), bus)
    stop_after.append(loop)
    loop.start()
    event_log.wait_kind("camera.connected")
    first = loop.latest(5.0)
    assert first is not None
    assert first.image.shape == (48, 64, 3)
    mjpeg_camera.stop()  # the camera drops off the network
    event_log.wait_kind("camera.lost")
    event_log.wait_kind("camera.reconnect_failed", 2)  # port refused while it is away
    mjpeg_camera.start()
    event_log.wait_kind("camera.recovered", timeout_s=15)
    assert fresh_frame(loop, time.monotonic()) is not None
    assert loop.stats().reconnects == 1


def test_frozen_stream_times_out_and_reconnects(
    bus: EventBus, event_log: Any, stop_after: list[object], mjpeg_camera: Any
) -> None:
    source = {"type": "stream", "url": mjpeg_camera.url, "open_timeout_s": 2, "read_timeout_s": 1}
    loop = CaptureLoop(camera(source, mode="triggered"), bus)
    stop_after.append(loop)
    loop.start()
    assert loop.trigger(1, timeout_s=5.0).trigger_id == 1
    mjpeg_camera.hang = True  # connection stays open, no more frames
    with pytest.raises((CameraUnavailableError, TriggerTimeoutError)):
        loop.trigger(2, timeout_s=3.0)  # never a stale frame
    event_log.wait_kind("camera.lost", timeout_s=10)
    mjpeg_camera.hang = False
    event_log.wait_kind("camera.recovered", timeout_s=15)
    assert loop.trigger(3, timeout_s=5.0).trigger_id == 3
