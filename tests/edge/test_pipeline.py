"""The pipeline and its watchdog: verdicts, stage timings, hangs, errors, recovery."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np
import pytest

from edge.backends import Backend, BackendError, create_backend
from edge.backends.base import BackendOutput, FloatArray, GraphSource
from edge.backends.config import OnnxRuntimeBackendConfig
from edge.events import EventBus
from edge.pipeline import (
    InspectionResult,
    ModelState,
    PartInFlight,
    Pipeline,
    decision_settings,
    graph_source,
    load_model,
)
from edge.runtime_config import BackendSection, PipelineConfig
from edge.store import ResultStore
from edge.types import Frame, StatusEvent, Verdict, VerdictCode
from edge.watchdog import BackendCandidate, InferenceRunner
from models.package import InputSpec, ModelPackage, preprocess_image


def _frame(seq: int, bright: bool = False, size: tuple[int, int] = (120, 160)) -> Frame:
    img = np.full((*size, 3), 50, np.uint8)
    if bright:
        img[40:60, 60:90] = 240
    return Frame(image=img, capture_time=time.monotonic(), sequence=seq, source_id="cam0")


class _Collect:
    def __init__(self) -> None:
        self.verdicts: list[Verdict] = []

    def on_verdict(self, verdict: Verdict) -> None:
        self.verdicts.append(verdict)


def test_ok_and_ng_verdicts_with_timings_committed_before_reporting(
    toy_package: ModelPackage, store: ResultStore, events: EventBus
) -> None:
    state = load_model(toy_package, BackendSection(), PipelineConfig(), events)
    seen_in_store: list[bool] = []

    class Sink:
        def on_verdict(self, verdict: Verdict) -> None:
            seen_in_store.append(store.get(verdict.inspection_id) is not None)

    results: list[InspectionResult] = []
    p = Pipeline(store, events, sinks=[Sink()], listeners=[results.append])
    p.set_model(state)
    p.start()
    ok = p.inspect(_frame(0))
    ng = p.inspect(_frame(1, bright=True))
    assert ok.code is VerdictCode.OK
    assert ok.score < 1.0
    assert ng.code is VerdictCode.NG
    assert ng.score > 1.0
    assert ng.regions
    assert ng.regions[0].w >= 25
    assert ng.model_name == "toy-brightness"
    assert ng.model_version == "1.0.0"
    assert set(ok.timings_ms) >= {"preprocess", "infer", "decide", "pipeline", "total"}
    assert ng.inspection_id == ok.inspection_id + 1
    assert seen_in_store == [True, True]
    assert results[-1].anomaly_map is not None
    assert results[-1].stored
    assert p.stats().ng == 1
    assert p.stats().ok == 1
    state.runner.stop()


def test_threshold_override_and_live_change(
    toy_package: ModelPackage, store: ResultStore, events: EventBus
) -> None:
    state = load_model(toy_package, BackendSection(), PipelineConfig(threshold=0.3), events)
    p = Pipeline(store, events)
    p.set_model(state)
    p.start()
    v = p.inspect(_frame(0))  # brightness 50/255/0.5 = 0.39 >= 0.3
    assert v.code is VerdictCode.NG
    assert v.threshold == 0.3
    p.set_settings(decision_settings(toy_package, PipelineConfig(), threshold=0.5))
    v = p.inspect(_frame(1))
    assert v.code is VerdictCode.OK
    assert v.threshold == 0.5
    state.runner.stop()


def test_bad_frame_and_no_model_are_errors(
    toy_package: ModelPackage, store: ResultStore, events: EventBus
) -> None:
    p = Pipeline(store, events)
    p.start()
    v = p.inspect(_frame(0))
    assert v.code is VerdictCode.ERROR
    assert "no model" in v.error
    state = load_model(toy_package, BackendSection(), PipelineConfig(), events)
    p.set_model(state)
    bad = Frame(
        image=np.zeros((0, 0, 3), np.uint8),
        capture_time=time.monotonic(),
        sequence=1,
        source_id="cam0",
    )
    v = p.inspect(bad)
    assert v.code is VerdictCode.ERROR
    assert "bad frame" in v.error
    v = p.report_error(reason="capture timeout", source_id="cam0", trigger_id=7)
    assert v.code is VerdictCode.ERROR
    assert v.trigger_id == 7
    got = store.get(v.inspection_id)
    assert got is not None
    assert got.error == "capture timeout"
    state.runner.stop()


class StallingBackend(Backend):
    """A real ONNX Runtime backend that can be told to stall or fail (test double)."""

    type_key = "stalling"

    def __init__(self, inner: Backend, release: threading.Event, mode: dict[str, str]) -> None:
        super().__init__(None)
        self.inner = inner
        self.release = release
        self.mode = mode

    @classmethod
    def check(cls, config: Any) -> str | None:
        return None

    @classmethod
    def choose_graph(cls, config: Any, available: Any, default: str) -> str:
        return default

    def load(self, graph: GraphSource) -> None:
        self.inner.load(graph)

    def run(self, image: FloatArray) -> BackendOutput:
        if self.mode.get("run") == "hang":
            self.release.wait(30)
        if self.mode.get("run") == "fail":
            raise BackendError("injected failure")
        if self.mode.get("run") == "slow":
            time.sleep(float(self.mode.get("sleep_s", "0.15")))
        return self.inner.run(image)

    def describe(self) -> dict[str, Any]:
        return {"type": "stalling"}


def _candidate(
    pkg: ModelPackage, label: str, release: threading.Event, mode: dict[str, str], loads: list[str]
) -> BackendCandidate:
    def load() -> Backend:
        loads.append(label)
        b = StallingBackend(
            create_backend(OnnxRuntimeBackendConfig(intra_op_threads=1)), release, mode
        )
        b.load(graph_source(pkg, "fp32"))
        return b

    return BackendCandidate(label, load)


@pytest.fixture
def release() -> Any:
    ev = threading.Event()
    yield ev
    ev.set()  # free any stalled worker thread


def _pipeline(
    pkg: ModelPackage,
    store: ResultStore,
    events: EventBus,
    cands: list[BackendCandidate],
    deadline_s: float = 0.2,
    max_errors: int = 2,
) -> tuple[Pipeline, InferenceRunner]:
    runner = InferenceRunner(
        cands, events, deadline_s=deadline_s, max_consecutive_errors=max_errors, retry_backoff_s=0.1
    )
    runner.start()
    p = Pipeline(store, events)
    p.set_model(ModelState(pkg, runner, decision_settings(pkg, PipelineConfig())))
    p.start()
    return p, runner


def test_hung_backend_gives_error_by_deadline_and_falls_back(
    toy_package: ModelPackage, store: ResultStore, events: EventBus, release: threading.Event
) -> None:
    seen: list[StatusEvent] = []
    events.subscribe(seen.append)
    primary_mode = {"run": "ok"}
    loads: list[str] = []
    p, runner = _pipeline(
        toy_package,
        store,
        events,
        [
            _candidate(toy_package, "primary", release, primary_mode, loads),
            _candidate(toy_package, "fallback", release, {"run": "ok"}, loads),
        ],
    )
    assert p.inspect(_frame(0)).code is VerdictCode.OK
    primary_mode["run"] = "hang"
    t = time.perf_counter()
    v = p.inspect(_frame(1))
    elapsed = time.perf_counter() - t
    assert v.code is VerdictCode.ERROR
    assert "deadline" in v.error
    assert elapsed < 10.0  # the stalled call lasts until the test ends (30 s)
    assert any(e.kind == "backend.hung" for e in seen)
    assert store.get(v.inspection_id) is not None
    assert runner.wait_ready(10)
    assert runner.active_label == "fallback"
    assert any(e.kind == "backend.recovered" for e in seen)
    v = p.inspect(_frame(2, bright=True))
    assert v.code is VerdictCode.NG
    runner.stop()


def test_hung_backend_without_fallback_is_reloaded(
    toy_package: ModelPackage, store: ResultStore, events: EventBus, release: threading.Event
) -> None:
    loads: list[str] = []
    modes = [{"run": "hang"}, {"run": "ok"}]

    def load() -> Backend:
        mode = modes[min(len(loads), 1)]
        loads.append("primary")
        b = StallingBackend(
            create_backend(OnnxRuntimeBackendConfig(intra_op_threads=1)), release, mode
        )
        b.load(graph_source(toy_package, "fp32"))
        return b

    p, runner = _pipeline(toy_package, store, events, [BackendCandidate("primary", load)])
    v = p.inspect(_frame(0))
    assert v.code is VerdictCode.ERROR
    # while recovering, parts get ERROR immediately, never OK
    while not runner.ready:
        w = p.inspect(_frame(1))
        if w.code is not VerdictCode.ERROR:
            break
        assert "recovering" in w.error or "deadline" in w.error
    assert runner.wait_ready(10)
    assert loads == ["primary", "primary"]
    assert p.inspect(_frame(2)).code is VerdictCode.OK
    runner.stop()


def test_failing_backend_gives_errors_then_recovers(
    toy_package: ModelPackage, store: ResultStore, events: EventBus, release: threading.Event
) -> None:
    seen: list[StatusEvent] = []
    events.subscribe(seen.append)
    mode = {"run": "fail"}
    loads: list[str] = []
    p, runner = _pipeline(
        toy_package,
        store,
        events,
        [
            _candidate(toy_package, "primary", release, mode, loads),
            _candidate(toy_package, "fallback", release, {"run": "ok"}, loads),
        ],
        max_errors=2,
    )
    v1, v2 = p.inspect(_frame(0)), p.inspect(_frame(1))
    assert v1.code is v2.code is VerdictCode.ERROR
    assert "injected failure" in v1.error
    assert [e.kind for e in seen].count("backend.error") == 2
    assert runner.wait_ready(10)
    assert runner.active_label == "fallback"
    assert p.inspect(_frame(2)).code is VerdictCode.OK
    assert all(math.isnan(v.score) for v in (v1, v2))
    runner.stop()


def test_unavailable_primary_drops_to_fallback_at_start(
    toy_package: ModelPackage, events: EventBus
) -> None:
    seen: list[StatusEvent] = []
    events.subscribe(seen.append)
    cfg = BackendSection(
        primary={"type": "tensorrt"},  # type: ignore[arg-type]
        fallback={"type": "onnxruntime"},
    )  # type: ignore[arg-type]
    state = load_model(toy_package, cfg, PipelineConfig(), events)
    assert state.runner.active_label.startswith("fallback")
    assert any(e.kind == "backend.fallback" for e in seen)
    state.runner.stop()


def test_no_backend_at_all_is_a_clear_error(toy_package: ModelPackage, events: EventBus) -> None:
    cfg = BackendSection(primary={"type": "onnxruntime", "provider": "cuda"})  # type: ignore[arg-type]
    with pytest.raises(BackendError, match="CUDAExecutionProvider"):
        load_model(toy_package, cfg, PipelineConfig(), events)


def test_model_swap_between_parts(
    toy_package: ModelPackage, toy_rgb_package_dir: Any, store: ResultStore, events: EventBus
) -> None:
    from models.package import load_package

    p = Pipeline(store, events)
    p.set_model(load_model(toy_package, BackendSection(), PipelineConfig(), events))
    p.start()
    assert p.inspect(_frame(0)).model_name == "toy-brightness"
    with load_package(toy_rgb_package_dir) as rgb:
        old = p.set_model(load_model(rgb, BackendSection(), PipelineConfig(), events))
        assert old is not None
        old.runner.stop()
        v = p.inspect(_frame(1))
        assert (v.model_name, v.model_version, v.code) == ("toy-rgb", "2.0.0", VerdictCode.OK)
        assert p.model is not None
        p.model.runner.stop()


def test_slow_backend_is_reported_but_still_answers(
    toy_package: ModelPackage, store: ResultStore, events: EventBus, release: threading.Event
) -> None:
    seen: list[StatusEvent] = []
    events.subscribe(seen.append)
    p, runner = _pipeline(
        toy_package,
        store,
        events,
        # slow: over half the deadline, with seconds to spare on a loaded machine
        [_candidate(toy_package, "primary", release, {"run": "slow", "sleep_s": "1.6"}, [])],
        deadline_s=3.0,
    )
    v = p.inspect(_frame(0))
    assert v.code is VerdictCode.OK
    assert v.timings_ms["infer"] >= 1600
    slow = [e for e in seen if e.kind == "backend.slow"]
    assert len(slow) == 1
    assert p.inspect(_frame(1)).code is VerdictCode.OK
    assert len([e for e in seen if e.kind == "backend.slow"]) == 1  # rate-limited
    runner.stop()


# --------------------------------------------------------------------------- overlapped free-run


class _Recorder(Pipeline):
    """The real pipeline, recording the order of begin / finish (frame sequence numbers)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.order: list[str] = []

    def begin(self, frame: Frame) -> PartInFlight:
        self.order.append(f"begin {frame.sequence}")
        return super().begin(frame)

    def finish(self, part: PartInFlight) -> Verdict:
        self.order.append(f"finish {part.frame.sequence}")
        return super().finish(part)


class _Camera:
    """next_frame(timeout_s) for run_overlapped: ``n`` frames, then stop."""

    def __init__(self, n: int, *, waiting: bool) -> None:
        self.n = n
        self.taken = 0
        self.waiting = waiting
        """True: a frame is always already waiting (a camera faster than the pipeline)."""

    def next_frame(self, timeout_s: float) -> Frame | None:
        if self.taken >= self.n or (timeout_s == 0.0 and not self.waiting):
            return None
        self.taken += 1
        return _frame(self.taken - 1, bright=self.taken % 3 == 0)

    def stopping(self) -> bool:
        return self.taken >= self.n


def test_overlapped_free_run_finishes_part_n_while_n_plus_1_runs(
    toy_package: ModelPackage, store: ResultStore, events: EventBus
) -> None:
    state = load_model(toy_package, BackendSection(), PipelineConfig(), events)
    committed_first: list[bool] = []

    class Sink:
        def on_verdict(self, verdict: Verdict) -> None:
            committed_first.append(store.get(verdict.inspection_id) is not None)

    sink = _Collect()
    p = _Recorder(store, events, sinks=[Sink(), sink])
    p.set_model(state)
    p.start()
    cam = _Camera(6, waiting=True)
    assert p.run_overlapped(cam.next_frame, cam.stopping) == 6
    # part N+1 begins (its backend call starts) before part N is decided and committed
    assert p.order == [
        "begin 0",
        "begin 1",
        "finish 0",
        "begin 2",
        "finish 1",
        "begin 3",
        "finish 2",
        "begin 4",
        "finish 3",
        "begin 5",
        "finish 4",
        "finish 5",
    ]
    # every part got its own verdict, committed before it was reported, ids in frame order
    assert [v.frame_sequence for v in sink.verdicts] == [0, 1, 2, 3, 4, 5]
    ids = [v.inspection_id for v in sink.verdicts]
    assert ids == list(range(ids[0], ids[0] + 6))
    assert committed_first == [True] * 6
    assert [v.code for v in sink.verdicts] == [
        VerdictCode.OK,
        VerdictCode.OK,
        VerdictCode.NG,
        VerdictCode.OK,
        VerdictCode.OK,
        VerdictCode.NG,
    ]
    rows = store.verdicts_after(0, 100)
    assert [r.frame_sequence for r in rows] == [0, 1, 2, 3, 4, 5]
    assert all(
        set(r.timings_ms) >= {"preprocess", "infer", "decide", "pipeline", "total"} for r in rows
    )
    state.runner.stop()


def test_free_run_queues_part_n_plus_1_behind_n_on_the_backend(
    toy_package: ModelPackage, store: ResultStore, events: EventBus, release: threading.Event
) -> None:
    p, runner = _pipeline(
        toy_package,
        store,
        events,
        [_candidate(toy_package, "primary", release, {"run": "slow", "sleep_s": "0.3"}, [])],
        deadline_s=5.0,
    )
    begun: list[PartInFlight] = []
    original_begin = p.begin

    def begin(frame: Frame) -> PartInFlight:
        begun.append(original_begin(frame))
        return begun[-1]

    p.begin = begin  # type: ignore[method-assign]
    cam = _Camera(3, waiting=True)
    assert p.run_overlapped(cam.next_frame, cam.stopping) == 3
    calls = [part.call for part in begun if part.call is not None]
    assert len(calls) == 3
    c0, c1, c2 = calls
    # part 1 was handed to the backend while part 0 still ran, and started after it returned
    assert c1.submitted < c0.returned <= c1.started
    assert c2.submitted < c1.returned <= c2.started
    # its infer time is the backend's own (about 0.3 s), not the wait behind part 0
    assert begun[1].timings["infer"] == pytest.approx(c1.latency_ms)
    assert c1.latency_ms < (c1.returned - c1.submitted) * 1000.0
    assert [r.code for r in store.verdicts_after(0, 10)] == [VerdictCode.OK] * 2 + [VerdictCode.NG]
    runner.stop()


def test_free_run_part_queued_behind_a_hung_one_fails_at_once_with_the_reason(
    toy_package: ModelPackage, store: ResultStore, events: EventBus, release: threading.Event
) -> None:
    p, runner = _pipeline(
        toy_package,
        store,
        events,
        [
            _candidate(toy_package, "primary", release, {"run": "hang"}, []),
            _candidate(toy_package, "fallback", release, {"run": "ok"}, []),
        ],
        deadline_s=0.3,
    )
    sink = _Collect()
    p.sinks.append(sink)
    cam = _Camera(2, waiting=True)
    t = time.perf_counter()
    assert p.run_overlapped(cam.next_frame, cam.stopping) == 2
    assert time.perf_counter() - t < 10.0  # the hung call itself lasts until the test ends
    assert [v.frame_sequence for v in sink.verdicts] == [0, 1]
    assert [v.code for v in sink.verdicts] == [VerdictCode.ERROR, VerdictCode.ERROR]
    assert "deadline" in sink.verdicts[0].error
    assert "hung on the previous part" in sink.verdicts[1].error
    assert [r.code for r in store.verdicts_after(0, 10)] == [VerdictCode.ERROR] * 2
    assert runner.hangs == 1  # the queued part is not counted as a second hang
    assert runner.wait_ready(10)
    assert runner.active_label == "fallback"
    runner.stop()


def test_a_third_call_while_two_are_in_flight_is_refused_as_busy(
    toy_package: ModelPackage, store: ResultStore, events: EventBus, release: threading.Event
) -> None:
    _, runner = _pipeline(
        toy_package,
        store,
        events,
        [_candidate(toy_package, "primary", release, {"run": "hang"}, [])],
        deadline_s=5.0,
    )
    x = toy_package.preprocess(_frame(0).image)
    first, second = runner.submit(x), runner.submit(x)
    third = runner.submit(x)
    assert isinstance(third.future.exception(timeout=5), BackendError)
    assert "busy" in str(third.future.exception())
    assert not first.future.done()
    assert not second.future.done()
    release.set()  # the running call returns, the waiting one runs next
    assert runner.result(first).score.shape == (1,)
    assert runner.result(second).score.shape == (1,)
    assert second.started >= first.returned
    runner.stop()


def test_overlapped_free_run_with_a_slow_camera_finishes_each_part_at_once(
    toy_package: ModelPackage, store: ResultStore, events: EventBus
) -> None:
    state = load_model(toy_package, BackendSection(), PipelineConfig(), events)
    p = _Recorder(store, events)
    p.set_model(state)
    p.start()
    cam = _Camera(3, waiting=False)
    assert p.run_overlapped(cam.next_frame, cam.stopping) == 3
    # no frame waiting when the backend is done: nothing is held back for an overlap
    assert p.order == ["begin 0", "finish 0", "begin 1", "finish 1", "begin 2", "finish 2"]
    assert p.stats().ok + p.stats().ng == 3
    state.runner.stop()


def test_overlapped_free_run_failing_backend_errors_every_part_in_order(
    toy_package: ModelPackage, store: ResultStore, events: EventBus, release: threading.Event
) -> None:
    p, runner = _pipeline(
        toy_package,
        store,
        events,
        [_candidate(toy_package, "primary", release, {"run": "fail"}, [])],
        deadline_s=5.0,
        max_errors=100,
    )
    sink = _Collect()
    p.sinks.append(sink)
    cam = _Camera(4, waiting=True)
    assert p.run_overlapped(cam.next_frame, cam.stopping) == 4
    assert [v.frame_sequence for v in sink.verdicts] == [0, 1, 2, 3]
    assert all(v.code is VerdictCode.ERROR for v in sink.verdicts)
    assert all("injected failure" in v.error for v in sink.verdicts)
    assert len(store.verdicts_after(0, 100)) == 4
    runner.stop()


def test_unusable_image_in_free_run_is_an_error_verdict_and_the_loop_goes_on(
    toy_package: ModelPackage, store: ResultStore, events: EventBus
) -> None:
    state = load_model(toy_package, BackendSection(), PipelineConfig(), events)
    p = Pipeline(store, events)
    p.set_model(state)
    p.start()
    broken = Frame(
        image=None,  # type: ignore[arg-type]  # not even an array: preprocessing raises
        capture_time=time.monotonic(),
        sequence=1,
        source_id="cam0",
    )
    frames = [_frame(0), broken, _frame(2)]

    def next_frame(timeout_s: float) -> Frame | None:
        return frames.pop(0) if frames else None

    assert p.run_overlapped(next_frame, lambda: not frames) == 3
    rows = store.verdicts_after(0, 10)
    assert [(r.frame_sequence, r.code) for r in rows] == [
        (0, VerdictCode.OK),
        (1, VerdictCode.ERROR),
        (2, VerdictCode.OK),
    ]
    assert "bad frame" in rows[1].error
    state.runner.stop()


def test_stopped_pipeline_still_finishes_the_part_in_flight(
    toy_package: ModelPackage, store: ResultStore, events: EventBus
) -> None:
    state = load_model(toy_package, BackendSection(), PipelineConfig(), events)
    p = Pipeline(store, events)
    p.set_model(state)
    p.start()
    part = p.begin(_frame(0))
    p.stop()  # between begin and finish: the begun part still gets its real verdict
    assert p.finish(part).code is VerdictCode.OK
    late = p.finish(p.begin(_frame(1)))
    assert late.code is VerdictCode.ERROR
    assert "stopped" in late.error
    assert [r.code for r in store.verdicts_after(0, 10)] == [VerdictCode.OK, VerdictCode.ERROR]
    state.runner.stop()


def test_result_after_the_deadline_of_a_call_that_already_returned_is_not_a_hang(
    toy_package: ModelPackage, store: ResultStore, events: EventBus, release: threading.Event
) -> None:
    _, runner = _pipeline(
        toy_package,
        store,
        events,
        [_candidate(toy_package, "primary", release, {"run": "ok"}, [])],
        deadline_s=0.05,
    )
    x = toy_package.preprocess(_frame(0).image)
    call = runner.submit(x)
    call.future.exception(timeout=30)  # the backend returned ...
    observed = time.perf_counter()
    time.sleep(0.1)  # ... and its caller was busy past the deadline (the overlapped loop)
    out = runner.result(call)
    assert out.score.shape == (1,)
    assert runner.hangs == 0
    assert 0 < call.returned <= observed
    assert call.latency_ms <= (observed - call.submitted) * 1000.0
    runner.stop()


@pytest.mark.parametrize(
    ("color", "channels", "shape"),
    [
        ("rgb", 3, (80, 100, 3)),
        ("bgr", 3, (64, 64, 3)),
        ("gray", 1, (64, 64)),
        ("rgb", 3, (70, 64)),
        ("rgb", 3, (64, 64, 4)),
    ],
)
def test_preprocess_is_the_manifest_formula_bit_for_bit(
    color: str, channels: int, shape: tuple[int, ...]
) -> None:
    import cv2

    mean = (0.485, 0.456, 0.406)[:channels] if channels == 3 else (0.45,)
    std = (0.229, 0.224, 0.225)[:channels] if channels == 3 else (0.226,)
    spec = InputSpec.model_validate(
        {"width": 64, "height": 64, "color": color, "channels": channels, "mean": mean, "std": std}
    )
    img = np.random.default_rng(5).integers(0, 256, shape, dtype=np.uint8)
    got = preprocess_image(img, spec)
    # the straightforward reading of the manifest, in HWC order
    src = (
        img
        if img.shape[:2] == (64, 64)
        else cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)
    )
    if src.ndim == 2:
        src = cv2.cvtColor(src, cv2.COLOR_GRAY2BGR) if channels == 3 else src
    elif src.shape[2] == 4:
        src = cv2.cvtColor(src, cv2.COLOR_BGRA2BGR)
    if color == "rgb":
        src = cv2.cvtColor(src, cv2.COLOR_BGR2RGB)
    hwc = src.reshape(64, 64, channels).astype(np.float32)
    s = np.float32(spec.scale) / np.asarray(std, np.float32)
    want = (hwc * s + -np.asarray(mean, np.float32) / np.asarray(std, np.float32)).transpose(
        2, 0, 1
    )
    assert got.dtype == np.float32
    assert got.flags.c_contiguous
    assert np.array_equal(got, want)
