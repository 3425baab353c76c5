"""Helpers for capture tests: real video files and image folders, event recording."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge.events import EventBus
from edge.types import StatusEvent


def write_video(
    path: Path, n_frames: int, size: tuple[int, int] = (64, 48), fps: float = 25.0
) -> Path:
    """A real MJPG/AVI file whose frame i is filled with grey level 10 + 20*i (mod 240)."""
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened(), "OpenCV cannot write MJPG/AVI here"
    for i in range(n_frames):
        img = np.full((h, w, 3), 10 + (20 * i) % 240, np.uint8)
        cv2.putText(img, str(i), (2, h - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
        writer.write(img)
    writer.release()
    return path


def write_png(path: Path, value: int, size: tuple[int, int] = (40, 30)) -> Path:
    w, h = size
    ok, buf = cv2.imencode(".png", np.full((h, w, 3), value, np.uint8))
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def jpeg_bytes(value: int, size: tuple[int, int] = (40, 30)) -> bytes:
    w, h = size
    noise = np.random.default_rng(value).integers(0, 255, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", noise)
    assert ok
    return bytes(buf.tobytes())


class EventLog:
    """Records every status event and waits for conditions on them."""

    def __init__(self, bus: EventBus) -> None:
        self.events: list[StatusEvent] = []
        self._lock = threading.Lock()
        bus.subscribe(self._on)

    def _on(self, ev: StatusEvent) -> None:
        with self._lock:
            self.events.append(ev)

    def kinds(self) -> list[str]:
        with self._lock:
            return [e.kind for e in self.events]

    def of(self, kind: str) -> list[StatusEvent]:
        with self._lock:
            return [e for e in self.events if e.kind == kind]

    def wait_for(self, pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.01)
        raise AssertionError(f"condition not met within {timeout_s} s; events: {self.kinds()}")

    def wait_kind(self, kind: str, count: int = 1, timeout_s: float = 10.0) -> None:
        self.wait_for(lambda: len(self.of(kind)) >= count, timeout_s)


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def event_log(bus: EventBus) -> EventLog:
    return EventLog(bus)


@pytest.fixture
def stop_after() -> Iterator[list[object]]:
    """Collects capture loops (anything with stop()) and stops them after the test."""
    loops: list[object] = []
    yield loops
    for loop in loops:
        stop = getattr(loop, "stop", None)
        if stop is not None:
            stop()


@pytest.fixture
def make_video() -> Callable[..., Path]:
    """:func:`write_video` as a fixture (test modules do not import each other)."""
    return write_video


@pytest.fixture
def make_png() -> Callable[..., Path]:
    return write_png


@pytest.fixture
def make_jpeg() -> Callable[..., bytes]:
    return jpeg_bytes


class MjpegCamera:
    """A real network camera stand-in: MJPEG over HTTP (multipart/x-mixed-replace).

    ``stop()`` takes it off the network (connections drop, port refused);
    ``start()`` brings it back on the same port. With ``hang=True`` it
    accepts connections and then sends nothing (a frozen camera).
    """

    def __init__(self, port: int, fps: float = 20.0) -> None:
        self.port = port
        self.fps = fps
        self.hang = False
        self._server: Any = None
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def start(self) -> None:
        import http.server
        import socketserver

        camera = self
        stopping = threading.Event()
        self._stopping = stopping

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                try:
                    while not stopping.is_set():
                        if camera.hang:
                            stopping.wait(0.05)
                            continue
                        _, buf = cv2.imencode(
                            ".jpg", np.full((48, 64, 3), (i * 10) % 250, np.uint8)
                        )
                        data = buf.tobytes()
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\n"
                            b"Content-Length: "
                            + str(len(data)).encode()
                            + b"\r\n\r\n"
                            + data
                            + b"\r\n"
                        )
                        i += 1
                        stopping.wait(1.0 / camera.fps)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def mjpeg_camera(free_port: int) -> Iterator[MjpegCamera]:
    cam = MjpegCamera(free_port)
    cam.start()
    yield cam
    cam.stop()
