"""Frame sources on real files: video files, image folders with bad files, devices, streams."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge.capture.config import (
    DeviceSourceConfig,
    FolderSourceConfig,
    StreamSourceConfig,
    SyntheticSourceConfig,
    VideoSourceConfig,
)
from edge.capture.sources import (
    CorruptFrameError,
    DeviceSource,
    FolderSource,
    SourceEndedError,
    SourceUnavailableError,
    StreamSource,
    SyntheticSource,
    VideoFileSource,
    decode_image_bytes,
    open_source,
)
from edge.capture.synth import DEFECT_TYPES


def test_video_file_replays_in_order_and_loops(
    tmp_path: Path, make_video: Callable[..., Path]
) -> None:
    path = make_video(tmp_path / "line.avi", 6, fps=12.5)
    src = VideoFileSource(VideoSourceConfig(path=path))
    src.open()
    assert src.interval_s == pytest.approx(1 / 12.5)
    grabs = [src.read() for _ in range(8)]
    src.close()
    assert [g.meta["frame_index"] for g in grabs] == [0, 1, 2, 3, 4, 5, 0, 1]
    levels = [int(np.median(g.image)) for g in grabs]
    assert levels[:6] == sorted(levels[:6])  # frames come in file order
    assert abs(levels[6] - levels[0]) <= 3  # looped back to frame 0
    assert grabs[0].image.shape == (48, 64, 3)


def test_video_file_without_loop_ends(tmp_path: Path, make_video: Callable[..., Path]) -> None:
    path = make_video(tmp_path / "short.avi", 3)
    src = VideoFileSource(VideoSourceConfig(path=path, loop=False, rate_fps=5))
    src.open()
    assert src.interval_s == pytest.approx(0.2)
    for _ in range(3):
        src.read()
    with pytest.raises(SourceEndedError, match="after 3 frames"):
        src.read()


def test_video_file_missing_or_garbage_is_unavailable(tmp_path: Path) -> None:
    src = VideoFileSource(VideoSourceConfig(path=tmp_path / "nope.avi"))
    with pytest.raises(SourceUnavailableError, match="missing"):
        src.open()
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"this is not a video" * 50)
    src = VideoFileSource(VideoSourceConfig(path=junk))
    with pytest.raises(SourceUnavailableError, match="cannot open video file"):
        src.open()


def test_folder_skips_truncated_jpeg_and_zero_byte_file(
    tmp_path: Path, make_png: Callable[..., Path], make_jpeg: Callable[..., bytes]
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    make_png(folder / "a.png", 50)
    good_jpeg = make_jpeg(1)
    (folder / "b.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])  # truncated JPEG
    (folder / "c.png").write_bytes(b"")  # zero-byte file
    (folder / "d.jpg").write_bytes(good_jpeg)
    (folder / "notes.txt").write_text("ignored: not an image extension")
    src = FolderSource(FolderSourceConfig(path=folder, rate_fps=10))
    src.open()
    assert src.read().meta["path"].endswith("a.png")
    with pytest.raises(CorruptFrameError, match=r"b\.jpg: truncated JPEG"):
        src.read()
    with pytest.raises(CorruptFrameError, match=r"c\.png: zero-byte file"):
        src.read()
    last = src.read()
    assert last.meta["path"].endswith("d.jpg")
    assert last.image.shape == (30, 40, 3)
    # Loops: a new file added meanwhile is picked up on the next pass.
    make_png(folder / "0.png", 200)
    assert src.read().meta["path"].endswith("0.png")


def test_decode_refuses_bad_bytes_and_accepts_padded_jpeg(make_jpeg: Callable[..., bytes]) -> None:
    ok = make_jpeg(3)
    assert decode_image_bytes(ok + b"\x00\x00", "pad.jpg").shape == (30, 40, 3)
    png = bytearray(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(CorruptFrameError, match="truncated PNG"):
        decode_image_bytes(bytes(png), "t.png")
    with pytest.raises(CorruptFrameError, match="not a readable image"):
        decode_image_bytes(b"GIF89a-garbage-garbage", "x.bmp")


def test_folder_gray_images_become_bgr(tmp_path: Path) -> None:
    import cv2

    folder = tmp_path / "g"
    folder.mkdir()
    cv2.imwrite(str(folder / "g.png"), np.full((10, 12), 77, np.uint8))
    src = FolderSource(FolderSourceConfig(path=folder))
    src.open()
    assert src.read().image.shape == (10, 12, 3)


def test_folder_missing_empty_all_corrupt_and_no_loop(
    tmp_path: Path, make_png: Callable[..., Path]
) -> None:
    with pytest.raises(SourceUnavailableError, match="missing"):
        FolderSource(FolderSourceConfig(path=tmp_path / "absent")).open()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceUnavailableError, match="holds no"):
        FolderSource(FolderSourceConfig(path=empty)).open()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"")
    src = FolderSource(FolderSourceConfig(path=bad))
    src.open()
    with pytest.raises(CorruptFrameError):
        src.read()
    with pytest.raises(SourceUnavailableError, match="no readable image"):
        src.read()
    once = tmp_path / "once"
    once.mkdir()
    make_png(once / "a.png", 1)
    src = FolderSource(FolderSourceConfig(path=once, loop=False))
    src.open()
    src.read()
    with pytest.raises(SourceEndedError):
        src.read()


def test_synthetic_source_is_deterministic_and_honours_defect_rate() -> None:
    cfg = SyntheticSourceConfig(seed=5, size_px=32, defect_rate=0.5)
    a, b = SyntheticSource(cfg), SyntheticSource(cfg)
    for _ in range(4):
        ga, gb = a.read(), b.read()
        assert ga.meta["defect"] == gb.meta["defect"]
        assert np.array_equal(ga.image, gb.image)
    all_bad = SyntheticSource(
        SyntheticSourceConfig(size_px=32, defect_rate=1.0, defects=("stain",))
    )
    grabs = [all_bad.read() for _ in range(3)]
    assert [g.meta["defect"] for g in grabs] == ["stain"] * 3
    masks = [all_bad.defect_mask(g.meta["part_index"], "stain") for g in grabs]
    assert all(m.any() for m in masks)
    assert not np.array_equal(masks[0], masks[1])
    assert all(set(g.meta) == {"defect", "part_index"} for g in grabs)  # JSON-friendly
    none_bad = SyntheticSource(SyntheticSourceConfig(size_px=32, defect_rate=0.0))
    assert none_bad.read().meta["defect"] is None
    assert none_bad.interval_s == pytest.approx(0.5)  # 120 parts per minute


def test_config_defect_list_matches_generator() -> None:
    assert SyntheticSourceConfig().defects == DEFECT_TYPES


def test_missing_device_is_unavailable() -> None:
    src = DeviceSource(DeviceSourceConfig(device="/dev/video99"))
    with pytest.raises(SourceUnavailableError, match="does not exist"):
        src.open()
    assert src.live


def test_stream_refused_port_and_gstreamer_without_support(free_port: int) -> None:
    port = free_port
    src = StreamSource(
        StreamSourceConfig(url=f"rtsp://u:secret@127.0.0.1:{port}/cam", open_timeout_s=2)
    )
    with pytest.raises(SourceUnavailableError) as info:
        src.open()
    assert "secret" not in str(info.value)  # the password never reaches logs
    assert "u:***@" in src.describe()
    import cv2

    if not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
        gst = StreamSource(StreamSourceConfig(url="videotestsrc ! videoconvert ! appsink"))
        with pytest.raises(SourceUnavailableError, match="no GStreamer"):
            gst.open()


def test_stream_over_ffmpeg_reads_frames(tmp_path: Path, make_video: Callable[..., Path]) -> None:
    path = make_video(tmp_path / "cam.avi", 4)
    src = open_source(StreamSourceConfig(url=str(path)))
    assert isinstance(src, StreamSource)
    src.open()
    assert [src.read().image.shape for _ in range(4)] == [(48, 64, 3)] * 4
    with pytest.raises(SourceUnavailableError, match="stopped delivering"):
        src.read()  # a stream that ends is a stream that is down
    src.close()
    src.close()  # idempotent
