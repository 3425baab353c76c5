"""Parts finished on the backend's thread: no hand-off back before the verdict.

The backend's worker thread decides, commits and reports a part itself when
nothing waits behind it and every earlier part is committed; otherwise the
caller's :meth:`Pipeline.finish` does, as before. Real ONNX Runtime sessions
(the toy package), stalled or slowed by the test double of test_pipeline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from edge.events import EventBus
from edge.pipeline import PartInFlight, Pipeline
from edge.store import ResultStore
from edge.types import Verdict, VerdictCode
from edge.watchdog import InferenceRunner
from models.package import ModelPackage
from tests.edge.test_pipeline import _Camera, _candidate, _frame, _pipeline


@pytest.fixture
def release() -> Iterator[threading.Event]:
    ev = threading.Event()
    yield ev
    ev.set()  # free any stalled worker thread


class _ThreadSink:
    """Records each reported verdict's frame and the thread that reported it."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self.seen: list[tuple[int, str, bool]] = []
        self.sleep_s = 0.0

    def on_verdict(self, verdict: Verdict) -> None:
        committed = self.store.get(verdict.inspection_id) is not None
        self.seen.append((verdict.frame_sequence, threading.current_thread().name, committed))
        if self.sleep_s:
            time.sleep(self.sleep_s)


def _setup(
    pkg: ModelPackage,
    store: ResultStore,
    events: EventBus,
    release: threading.Event,
    modes: list[tuple[str, dict[str, str]]],
    deadline_s: float,
) -> tuple[Pipeline, InferenceRunner, _ThreadSink]:
    """A pipeline over ``(name, mode)`` backends (the first is primary) with a thread sink."""
    candidates = [_candidate(pkg, name, release, mode, []) for name, mode in modes]
    p, runner = _pipeline(pkg, store, events, candidates, deadline_s=deadline_s)
    sink = _ThreadSink(store)
    p.sinks.append(sink)
    return p, runner, sink


def test_a_lone_part_is_committed_and_reported_on_the_backend_thread(
    toy_package: ModelPackage, store: ResultStore, events: EventBus, release: threading.Event
) -> None:
    p, runner, sink = _setup(toy_package, store, events, release, [("primary", {"run": "ok"})], 5.0)
    ok = p.inspect(_frame(0))
    ng = p.inspect(_frame(1, bright=True))
    assert (ok.code, ng.code) == (VerdictCode.OK, VerdictCode.NG)
    # reported by the backend's worker thread, after the commit; inspect returns that verdict
    assert sink.seen == [(0, "backend-primary", True), (1, "backend-primary", True)]
    rows = store.verdicts_after(0, 10)
    assert [(r.inspection_id, r.code) for r in rows] == [
        (ok.inspection_id, VerdictCode.OK),
        (ng.inspection_id, VerdictCode.NG),
    ]
    assert all(set(r.timings_ms) >= {"preprocess", "infer", "decide", "total"} for r in rows)
    assert p.stats().infer_ms_p50 is not None
    runner.stop()


def test_a_part_queued_behind_is_finished_by_the_caller_and_the_last_one_by_the_backend(
    toy_package: ModelPackage, store: ResultStore, events: EventBus, release: threading.Event
) -> None:
    p, runner, sink = _setup(
        toy_package, store, events, release, [("primary", {"run": "slow", "sleep_s": "0.3"})], 5.0
    )
    cam = _Camera(3, waiting=True)
    me = threading.current_thread().name
    assert p.run_overlapped(cam.next_frame, cam.stopping) == 3
    # parts 0 and 1 had the next part queued behind them: the loop finished them while the
    # backend went on; part 2 had none, so the backend's thread finished it
    assert sink.seen == [(0, me, True), (1, me, True), (2, "backend-primary", True)]
    assert [r.frame_sequence for r in store.verdicts_after(0, 10)] == [0, 1, 2]
    runner.stop()


def test_the_backend_thread_never_commits_a_part_before_an_earlier_one(
    toy_package: ModelPackage, store: ResultStore, events: EventBus, release: threading.Event
) -> None:
    p, runner, sink = _setup(
        toy_package, store, events, release, [("primary", {"run": "slow", "sleep_s": "0.3"})], 5.0
    )
    first = p.begin(_frame(0))
    second = p.begin(_frame(1))  # queued behind the first, which is left to this thread
    for part in (first, second):
        assert part.call is not None
        part.call.future.result(timeout=30)
    # both returned; the second had nothing behind it but the first was not committed yet
    assert sink.seen == []
    assert not second.finished.is_set()
    v0, v1 = p.finish(first), p.finish(second)
    me = threading.current_thread().name
    assert sink.seen == [(0, me, True), (1, me, True)]
    assert v1.inspection_id == v0.inspection_id + 1
    runner.stop()


def test_a_hung_part_gets_one_error_verdict_even_when_the_backend_returns_later(
    toy_package: ModelPackage, store: ResultStore, events: EventBus, release: threading.Event
) -> None:
    mode = {"run": "hang"}
    p, runner, sink = _setup(
        toy_package, store, events, release, [("primary", mode), ("fallback", {"run": "ok"})], 0.3
    )
    stuck = [t for t in threading.enumerate() if t.name == "backend-primary"]
    assert len(stuck) == 1
    v = p.inspect(_frame(0))
    assert v.code is VerdictCode.ERROR
    assert "deadline" in v.error
    assert runner.hangs == 1
    release.set()  # the stalled call returns now, long after its deadline
    stuck[0].join(timeout=30)
    assert not stuck[0].is_alive()
    # its late result was dropped: the part has its one ERROR verdict, reported by this thread
    me = threading.current_thread().name
    assert sink.seen == [(0, me, True)]
    assert [(r.frame_sequence, r.code) for r in store.verdicts_after(0, 10)] == [
        (0, VerdictCode.ERROR)
    ]
    assert runner.wait_ready(10)
    assert p.inspect(_frame(1, bright=True)).code is VerdictCode.NG
    runner.stop()


def test_a_slow_commit_on_the_backend_thread_is_not_a_hang(
    toy_package: ModelPackage, store: ResultStore, events: EventBus, release: threading.Event
) -> None:
    p, runner, sink = _setup(toy_package, store, events, release, [("primary", {"run": "ok"})], 0.2)
    sink.sleep_s = 0.6  # reporting (on the backend's thread) outlasts the deadline
    v = p.inspect(_frame(0))
    assert v.code is VerdictCode.OK
    assert runner.hangs == 0
    assert runner.ready
    assert sink.seen == [(0, "backend-primary", True)]
    runner.stop()


def test_finish_returns_the_backend_threads_verdict_for_its_own_part(
    toy_package: ModelPackage, store: ResultStore, events: EventBus, release: threading.Event
) -> None:
    p, runner, _ = _setup(toy_package, store, events, release, [("primary", {"run": "ok"})], 5.0)
    parts: list[PartInFlight] = []
    for i in range(4):
        part = p.begin(_frame(i, bright=i % 2 == 1))
        assert part.call is not None
        part.call.future.result(timeout=30)  # returned, nothing behind: finished there
        assert part.finished.wait(30)
        parts.append(part)
    verdicts = [p.finish(part) for part in parts]
    assert [v.frame_sequence for v in verdicts] == [0, 1, 2, 3]
    assert [v.code for v in verdicts] == [VerdictCode.OK, VerdictCode.NG] * 2
    assert [v.inspection_id for v in verdicts] == [
        r.inspection_id for r in store.verdicts_after(0, 10)
    ]
    runner.stop()
