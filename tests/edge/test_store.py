"""The result store: durability, queries, image quota/retention, a full disk."""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge.events import EventBus
from edge.runtime_config import StoreConfig
from edge.store import BACKGROUND_NICE, ImageJob, ResultStore, lower_thread_priority
from edge.types import Region, StatusEvent, Verdict, VerdictCode


def _verdict(
    iid: int,
    code: VerdictCode = VerdictCode.OK,
    score: float = 0.3,
    t: float | None = None,
    dclass: str = "",
) -> Verdict:
    return Verdict(
        inspection_id=iid,
        frame_sequence=iid * 10,
        source_id="cam0",
        trigger_id=iid + 100 if iid % 2 else None,
        code=code,
        score=score,
        threshold=1.0,
        defect_class=dclass,
        regions=(Region(1, 2, 3, 4, 12, 1.5),) if code is VerdictCode.NG else (),
        model_name="toy",
        model_version="1.0.0",
        timings_ms={"infer": 1.5, "total": 2.0 + iid},
        decided_unix=t if t is not None else time.time(),
    )


def test_commit_and_read_back_every_field(store: ResultStore) -> None:
    v = _verdict(store.next_inspection_id(), VerdictCode.NG, 1.7, dclass="anomaly")
    store.commit(v)
    got = store.get(v.inspection_id)
    assert got is not None
    assert got.to_verdict() == v
    assert got.to_dict()["code"] == "NG"


def test_nan_score_round_trips_as_nan(store: ResultStore) -> None:
    v = _verdict(store.next_inspection_id(), VerdictCode.ERROR, float("nan"))
    store.commit(v)
    got = store.get(v.inspection_id)
    assert got is not None
    assert math.isnan(got.score)
    assert got.to_dict()["score"] is None


def test_inspection_id_survives_restart(tmp_path: Path) -> None:
    cfg = StoreConfig(path=tmp_path / "r")
    s = ResultStore(cfg)
    s.start()
    for _ in range(3):
        s.commit(_verdict(s.next_inspection_id()))
    s.stop()
    s2 = ResultStore(cfg)
    s2.start()
    assert s2.next_inspection_id() == 4
    s2.stop()


def test_duplicate_id_is_refused_with_an_event(store: ResultStore, events: EventBus) -> None:
    seen: list[StatusEvent] = []
    events.subscribe(seen.append)
    v = _verdict(store.next_inspection_id())
    store.commit(v)
    from edge.store import StoreError

    with pytest.raises(StoreError):
        store.commit(v)
    assert any(e.kind == "store.error" for e in seen)


def test_queries_filter_paginate_count(store: ResultStore) -> None:
    t0 = 1_000_000.0
    codes = [VerdictCode.OK] * 6 + [VerdictCode.NG] * 3 + [VerdictCode.ERROR]
    for i, code in enumerate(codes):
        store.commit(
            _verdict(
                store.next_inspection_id(),
                code,
                t=t0 + i,
                dclass="anomaly" if code is VerdictCode.NG else "",
            )
        )
    page, total = store.query(limit=4)
    assert total == 10
    assert [p.inspection_id for p in page] == [10, 9, 8, 7]
    page2, _ = store.query(limit=4, offset=4)
    assert [p.inspection_id for p in page2] == [6, 5, 4, 3]
    ng, n = store.query(code=VerdictCode.NG)
    assert n == 3
    assert all(p.code is VerdictCode.NG for p in ng)
    _, n = store.query(defect_class="anomaly")
    assert n == 3
    _, n = store.query(since_unix=t0 + 5, until_unix=t0 + 8)
    assert n == 3
    c = store.counts()
    assert (c.ok, c.ng, c.error, c.total) == (6, 3, 1, 10)
    assert c.ng_rate == pytest.approx(0.3)
    assert store.defect_classes() == ["anomaly"]
    b = store.buckets(t0, 5.0)
    assert [(x.ok, x.ng, x.error) for x in b] == [(5, 0, 0), (1, 3, 1)]
    assert b[0].latency_ms_p50 == pytest.approx(5.0)


def test_verdicts_after_feeds_in_order(store: ResultStore) -> None:
    for _ in range(7):
        store.commit(_verdict(store.next_inspection_id()))
    got = store.verdicts_after(0, 3)
    assert [v.inspection_id for v in got] == [1, 2, 3]
    got = store.verdicts_after(3, 100)
    assert [v.inspection_id for v in got] == [4, 5, 6, 7]
    assert store.verdicts_after(7, 10) == []


def test_committed_rows_are_visible_to_another_connection(store: ResultStore) -> None:
    store.commit(_verdict(store.next_inspection_id()))
    with contextlib.closing(sqlite3.connect(store.db_path)) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == 1


def _noise(seed: int, h: int = 240, w: int = 320) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _job(iid: int, code: VerdictCode, seed: int) -> ImageJob:
    return ImageJob(
        iid,
        code,
        _noise(seed),
        np.random.default_rng(seed).random((64, 64), dtype=np.float32),
        (),
        1.0,
    )


def test_images_written_in_background_with_overlay(store: ResultStore) -> None:
    v = _verdict(store.next_inspection_id(), VerdictCode.NG, 2.0)
    store.commit(v)
    assert store.submit_images(_job(v.inspection_id, VerdictCode.NG, 1))
    assert store.flush_images(10)
    img = store.image_path(v.inspection_id, "image")
    heat = store.image_path(v.inspection_id, "heatmap")
    assert img is not None
    assert img.stat().st_size > 1000
    assert heat is not None
    assert heat.suffix == ".jpg"
    assert store.image_kinds([v.inspection_id]) == {v.inspection_id: {"image", "heatmap"}}


def test_quota_evicts_oldest_ok_images_first(tmp_path: Path) -> None:
    s = ResultStore(StoreConfig(path=tmp_path / "r", image_quota_mb=1.0, min_free_mb=0))
    s.start()
    try:
        ids: dict[int, VerdictCode] = {}
        for i in range(12):
            code = VerdictCode.NG if i % 4 == 0 else VerdictCode.OK
            v = _verdict(s.next_inspection_id(), code)
            s.commit(v)
            ids[v.inspection_id] = code
            s.submit_images(_job(v.inspection_id, code, i))
            s.flush_images(10)
        st = s.writer_stats()
        assert st.bytes_used <= 1_000_000
        assert st.evicted > 0
        kept = s.image_kinds(list(ids))
        ng_ids = [i for i, c in ids.items() if c is VerdictCode.NG]
        ok_ids = [i for i, c in ids.items() if c is VerdictCode.OK]
        assert all(i in kept for i in ng_ids), "NG images evicted while OK ones existed"
        assert not all(i in kept for i in ok_ids)
        assert ok_ids[-1] in kept  # the newest OK survives
        on_disk = sum(p.stat().st_size for p in (tmp_path / "r" / "images").rglob("*.jpg"))
        assert on_disk == st.bytes_used
    finally:
        s.stop()


def test_retention_deletes_old_images(tmp_path: Path) -> None:
    s = ResultStore(StoreConfig(path=tmp_path / "r", retention_days=1.0))
    s.start()
    try:
        v = _verdict(s.next_inspection_id(), VerdictCode.NG)
        s.commit(v)
        s.submit_images(_job(v.inspection_id, VerdictCode.NG, 0))
        s.flush_images(10)
        assert s.image_path(v.inspection_id, "image") is not None
        with contextlib.closing(sqlite3.connect(s.db_path)) as c, c:
            c.execute("UPDATE images SET created_unix = created_unix - 2 * 86400")
        s._last_retention = 0.0  # run the hourly sweep now
        s.submit_images(_job(999, VerdictCode.NG, 1))
        s.flush_images(10)
        assert s.image_path(v.inspection_id, "image") is None
        assert s.get(v.inspection_id) is not None  # the verdict itself stays
    finally:
        s.stop()


def test_writer_queue_full_skips_never_blocks(tmp_path: Path) -> None:
    s = ResultStore(StoreConfig(path=tmp_path / "r", writer_queue=1))
    # not started: nothing drains the queue
    assert s.submit_images(_job(1, VerdictCode.NG, 0))
    t = time.perf_counter()
    assert not s.submit_images(_job(2, VerdictCode.NG, 0))
    assert time.perf_counter() - t < 0.05
    assert s.writer_stats().skipped_queue_full == 1


def test_ok_sampling(tmp_path: Path) -> None:
    s = ResultStore(StoreConfig(path=tmp_path / "r", ok_sample_every=3))
    picks = [s.wants_images(VerdictCode.OK) for _ in range(9)]
    assert picks.count(True) == 3
    assert s.wants_images(VerdictCode.NG)
    none = ResultStore(StoreConfig(path=tmp_path / "r2", ok_sample_every=0))
    assert not any(none.wants_images(VerdictCode.OK) for _ in range(5))


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs (needs root); skipped when it cannot be mounted."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); quota tests cover it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> None:
    # unbuffered: nothing is left to flush (and fail) at close once the disk is full
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(os.urandom(16384))
        except OSError:
            pass


def test_full_disk_degrades_to_verdicts_without_images(tiny_disk: Path) -> None:
    events = EventBus()
    seen: list[StatusEvent] = []
    events.subscribe(seen.append)
    s = ResultStore(StoreConfig(path=tiny_disk / "r", min_free_mb=0.05), events)
    s.start()
    try:
        v = _verdict(s.next_inspection_id(), VerdictCode.NG)
        s.commit(v)
        s.submit_images(_job(v.inspection_id, VerdictCode.NG, 0))
        s.flush_images(10)
        ballast = tiny_disk / "ballast"
        _fill(ballast)
        from edge.store import StoreError

        committed, refused = [], 0
        for i in range(40):
            w = _verdict(s.next_inspection_id(), VerdictCode.NG)
            try:
                s.commit(w)
                committed.append(w.inspection_id)
            except StoreError:
                refused += 1
            s.submit_images(_job(w.inspection_id, VerdictCode.NG, i + 1))
        s.flush_images(10)
        assert any(e.kind == "store.disk_full" for e in seen)
        st = s.writer_stats()
        assert st.skipped_no_space > 0 or st.evicted > 0
        assert st.failed == 0, st  # a full disk is a skip, never a writer failure
        for iid in committed:
            assert s.get(iid) is not None
        # space comes back: images are written again
        ballast.unlink()
        w = _verdict(s.next_inspection_id(), VerdictCode.NG)
        s.commit(w)
        s.submit_images(_job(w.inspection_id, VerdictCode.NG, 99))
        s.flush_images(10)
        assert s.image_path(w.inspection_id, "image") is not None
        assert any(e.kind == "store.disk_ok" for e in seen)
    finally:
        s.stop()


def test_eviction_on_a_disk_too_full_for_sqlite_to_delete_keeps_going(tiny_disk: Path) -> None:
    """Deleting a row needs room in SQLite's WAL; the files go first and the rows later."""
    s = ResultStore(StoreConfig(path=tiny_disk / "r", min_free_mb=0.05))
    s.start()
    try:
        old = []
        for i in range(3):
            v = _verdict(s.next_inspection_id(), VerdictCode.NG)
            s.commit(v)
            s.submit_images(_job(v.inspection_id, VerdictCode.NG, i))
            old.append(v.inspection_id)
        s.flush_images(10)
        # hard links: deleting the stored files frees nothing, so SQLite stays out of room
        keep = tiny_disk / "keep"
        keep.mkdir()
        for f in (s.images_dir).rglob("*.*"):
            os.link(f, keep / f.name)
        with contextlib.closing(sqlite3.connect(s.db_path)) as c:
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()  # the WAL has no slack
        ballast = tiny_disk / "ballast"
        _fill(ballast)
        assert s.submit_images(_job(999, VerdictCode.NG, 7))
        s.flush_images(10)
        st = s.writer_stats()
        assert st.failed == 0, st
        assert st.skipped_no_space == 1, st
        assert st.evicted == 6, st  # every stored file was deleted to make room
        assert all(s.image_path(iid, "image") is None for iid in old)
        # room again: the kept rows are deleted and new images written
        ballast.unlink()
        for f in keep.iterdir():
            f.unlink()
        assert s.submit_images(_job(1000, VerdictCode.NG, 8))
        s.flush_images(10)
        assert s.image_path(1000, "image") is not None
        assert s.image_kinds(old) == {}
        assert s.writer_stats().failed == 0
    finally:
        s.stop()


def test_pipeline_on_a_full_disk_never_crashes_never_claims(
    tiny_disk: Path, toy_package_dir: Path
) -> None:
    from edge.pipeline import Pipeline, load_model
    from edge.runtime_config import BackendSection, PipelineConfig
    from edge.types import Frame
    from models.package import load_package

    events = EventBus()
    seen: list[StatusEvent] = []
    events.subscribe(seen.append)
    s = ResultStore(StoreConfig(path=tiny_disk / "r", min_free_mb=0.0), events)
    s.start()
    pkg = load_package(toy_package_dir)
    state = load_model(pkg, BackendSection(), PipelineConfig(), events)
    p = Pipeline(s, events)
    p.set_model(state)
    p.start()
    try:
        _fill(tiny_disk / "ballast")
        verdicts = []
        for i in range(300):  # until SQLite itself cannot grow
            img = np.full((64, 64, 3), 240 if i % 2 else 40, np.uint8)
            verdicts.append(p.inspect(Frame(img, time.monotonic(), i, "cam0")))
        s.flush_images(10)
        stored = [v for v in verdicts if s.get(v.inspection_id) is not None]
        lost = [v for v in verdicts if s.get(v.inspection_id) is None]
        assert lost, "the disk never filled up"
        assert all(v.code is VerdictCode.ERROR for v in lost)
        assert all("result store failed" in v.error for v in lost)
        assert all(s.get(v.inspection_id).code is v.code for v in stored)  # type: ignore[union-attr]
        assert any(e.kind == "store.disk_full" for e in seen)
        assert p.stats().not_stored == len(lost)
    finally:
        state.runner.stop()
        s.stop()
        pkg.close()


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice is Linux")
def test_image_writer_runs_at_lower_priority_than_the_hot_path(store: ResultStore) -> None:
    import threading

    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    want = min(19, main_nice + BACKGROUND_NICE)
    writer = next(t for t in threading.enumerate() if t.name == "store-writer")
    assert writer.native_id is not None
    deadline = time.monotonic() + 30.0  # a wait, not a timing check: the thread sets it first
    while os.getpriority(os.PRIO_PROCESS, writer.native_id) != want:
        assert time.monotonic() < deadline, "the writer never lowered its priority"
        time.sleep(0.01)
    # only that thread: the caller (the hot path) keeps its priority
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice is Linux")
def test_lower_thread_priority_is_per_thread_and_capped() -> None:
    import threading

    seen: dict[str, int | bool] = {}

    def work() -> None:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        seen["ok"] = lower_thread_priority(5)
        seen["delta"] = os.getpriority(os.PRIO_PROCESS, tid) - before
        seen["again"] = lower_thread_priority(100)
        seen["capped"] = os.getpriority(os.PRIO_PROCESS, tid)

    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=work)
    t.start()
    t.join(30)
    assert seen["ok"] is True
    assert seen["delta"] == min(5, 19 - main_before)
    assert seen["capped"] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before
    assert lower_thread_priority(0) is False


def test_commits_never_checkpoint_the_writer_thread_does(tmp_path: Path) -> None:
    s = ResultStore(StoreConfig(path=tmp_path / "r"))
    s.start()
    conn = s._conn  # the hot-path connection
    assert conn is not None
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    wal = tmp_path / "r" / "results.sqlite-wal"
    for _ in range(3000):  # several thousand pages of WAL: the default would checkpoint
        s.commit(_verdict(s.next_inspection_id()))
    deadline = time.monotonic() + 30
    while s.writer_stats().checkpoints < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.writer_stats().checkpoints >= 2
    # the writer's PASSIVE checkpoint copied the commits into the database file
    assert s.writer_stats().wal_pages > 0
    assert wal.stat().st_size > 0
    s.stop()
    # stop truncates the WAL: everything is in the database file itself
    assert not wal.exists() or wal.stat().st_size == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "r" / "results.sqlite")) as db:
        assert db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == 3000
