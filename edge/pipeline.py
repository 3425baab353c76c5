"""The inspection pipeline: Frame -> preprocess -> backend -> decide -> Verdict.

The hot path, in order, with nothing slow in between:

1. preprocess exactly as the package's manifest says
   (:meth:`models.package.ModelPackage.preprocess`, the one implementation);
2. run the backend through the watchdog (:class:`edge.watchdog.InferenceRunner`)
   under its deadline;
3. decide (:func:`edge.decide.decide`);
4. reserve the next inspection id (in memory, continues after a restart) and
   commit the verdict to SQLite (:meth:`edge.store.ResultStore.commit`), so
   ids are committed in increasing order;
5. only then report it to the sinks (PLC, panel, logs), and queue the images
   for the store's background writer (drawing and disk writes happen there).

:meth:`Pipeline.inspect` runs them one part at a time (triggered mode). The
free-run loop overlaps parts instead: :meth:`Pipeline.begin` does 1 and starts
2, :meth:`Pipeline.collect` waits for 2, :meth:`Pipeline.finish` does 3-5, and
the loop begins part N+1 (when a frame is already waiting) while the backend
still runs part N, queued behind it, so the backend goes from N to N+1 with
no hand-off between threads, and deciding, committing and reporting N run
while the backend works on N+1 (see :meth:`Pipeline.run_overlapped`).

When the backend returns a part and no other part waits behind it (triggered
mode, a slow camera), its own thread runs 3-5 for that part right away (the
watchdog's ``on_return`` hook), so the verdict does not wait for a hand-off
back to the thread that began the part; :meth:`Pipeline.finish` then returns
that verdict. Parts are still committed in the order begun, and exactly one
thread commits each part (a caller past the deadline commits the ERROR; the
late result of a hung backend is dropped).

Any fault on the way (bad frame, backend error or hang, store failure) makes
an ERROR verdict: a fault never looks like OK.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from edge.backends.base import (
    Backend,
    BackendError,
    BackendOutput,
    GraphSource,
    create_backend,
    registry,
)
from edge.backends.config import BackendConfig
from edge.decide import DecisionSettings, Roi, decide
from edge.events import EventBus
from edge.runtime_config import BackendSection, PipelineConfig
from edge.store import ImageJob, ResultStore, StoreError
from edge.types import Frame, ImageArray, Region, Severity, Verdict, VerdictCode, VerdictSink
from edge.watchdog import BackendCandidate, InferenceCall, InferenceRunner
from models.package import ModelPackage

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- loading


def graph_source(package: ModelPackage, kind: str) -> GraphSource:
    """The package's ``kind`` graph as a :class:`GraphSource`."""
    path = package.graph_path(kind)
    rel = package.manifest.graphs[kind]
    spec = package.input_spec
    return GraphSource(
        path=path,
        kind=kind,
        sha256=package.manifest.files[rel],
        input_shape=(spec.channels, spec.height, spec.width),
    )


def backend_label(config: BackendConfig) -> str:
    """A short human name of a backend config, e.g. ``onnxruntime:cpu``."""
    if config.type == "onnxruntime":
        return f"onnxruntime:{config.provider}"
    return f"tensorrt:{config.precision}"


def verify_references(backend: Backend, package: ModelPackage, kind: str) -> list[str]:
    """Score the package's reference images with ``backend``; the mismatches, as text.

    This is the load-time round trip: the same bytes run by this backend
    must give the manifest's scores within ``reference_tolerance[kind]``.
    """
    tol = package.manifest.reference_tolerance.get(kind, 0.05)
    problems: list[str] = []
    for ref, path in package.reference_images():
        if kind not in ref.scores:
            continue
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            problems.append(f"{ref.file}: cannot decode")
            continue
        got = float(backend.run(package.preprocess(image)).score[0])
        want = ref.scores[kind]
        if not (math.isfinite(got) and abs(got - want) <= tol):
            problems.append(f"{ref.file}: {got:.4f} vs {want:.4f} (±{tol})")
    return problems


def make_candidate(
    config: BackendConfig,
    package: ModelPackage,
    role: str,
    *,
    warmup_runs: int = 3,
    verify: bool = True,
) -> BackendCandidate:
    """A :class:`BackendCandidate` that creates, loads, checks and warms up a backend."""
    label = f"{role} {backend_label(config)}"

    def load() -> Backend:
        backend = create_backend(config)
        spec = registry()[config.type]
        available = {k: package.graph_path(k) for k in package.graph_variants}
        kind = spec.backend_cls.choose_graph(config, available, package.manifest.default_graph)
        try:
            backend.load(graph_source(package, kind))
            if verify:
                bad = verify_references(backend, package, kind)
                if bad:
                    raise BackendError(
                        f"{package.model_id} {kind} graph on {label} disagrees "
                        "with its reference scores: " + "; ".join(bad)
                    )
            spec_in = package.input_spec
            dummy = np.zeros((1, spec_in.channels, spec_in.height, spec_in.width), np.float32)
            for _ in range(warmup_runs):
                backend.run(dummy)
        except BaseException:
            backend.close()
            raise
        return backend

    return BackendCandidate(label=label, load=load)


def decision_settings(
    package: ModelPackage, cfg: PipelineConfig, threshold: float | None = None
) -> DecisionSettings:
    """The decision settings from the package's thresholds and the pipeline config."""
    thr = package.manifest.threshold
    image_thr = threshold if threshold is not None else cfg.threshold
    roi = cfg.roi
    return DecisionSettings(
        image_threshold=float(image_thr if image_thr is not None else thr.image),
        pixel_threshold=float(cfg.pixel_threshold or thr.pixel),
        roi=Roi(roi.x, roi.y, roi.w, roi.h) if roi else None,
        min_defect_area_px=cfg.min_defect_area_px,
        max_regions=cfg.max_regions,
    )


@dataclass(frozen=True, slots=True)
class ModelState:
    """A loaded model: package, running backend and decision settings, swapped as one."""

    package: ModelPackage
    runner: InferenceRunner
    settings: DecisionSettings

    @property
    def name(self) -> str:
        return self.package.manifest.name

    @property
    def version(self) -> str:
        return self.package.manifest.version


def load_model(
    package: ModelPackage,
    backend_cfg: BackendSection,
    pipeline_cfg: PipelineConfig,
    events: EventBus,
    *,
    verify: bool = True,
    threshold: float | None = None,
) -> ModelState:
    """Load ``package`` on the configured backend (or its fallback) and start its runner."""
    cands = [
        make_candidate(
            backend_cfg.primary,
            package,
            "primary",
            warmup_runs=backend_cfg.warmup_runs,
            verify=verify,
        )
    ]
    if backend_cfg.fallback is not None:
        cands.append(
            make_candidate(
                backend_cfg.fallback,
                package,
                "fallback",
                warmup_runs=backend_cfg.warmup_runs,
                verify=verify,
            )
        )
    runner = InferenceRunner(
        cands,
        events,
        deadline_s=backend_cfg.deadline_ms / 1000.0,
        max_consecutive_errors=backend_cfg.max_consecutive_errors,
    )
    runner.start()
    return ModelState(package, runner, decision_settings(package, pipeline_cfg, threshold))


# --------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True, slots=True)
class InspectionResult:
    """A verdict with what the panel and the store need to show it (off the hot path)."""

    verdict: Verdict
    image: ImageArray | None
    anomaly_map: npt.NDArray[np.float32] | None
    pixel_threshold: float
    stored: bool
    """False when the store could not commit it (the verdict is then ERROR)."""


ResultListener = Callable[[InspectionResult], None]
NAN = float("nan")


@dataclass(frozen=True, slots=True)
class _Pending:
    verdict: Verdict
    image: ImageArray | None
    anomaly_map: npt.NDArray[np.float32] | None
    pixel_threshold: float


@dataclass(slots=True)
class PartInFlight:
    """A part between :meth:`Pipeline.begin` and :meth:`Pipeline.finish`."""

    frame: Frame
    state: ModelState | None
    t0: float
    """``time.perf_counter()`` at begin."""
    timings: dict[str, float]
    call: InferenceCall | None = None
    """The backend call in flight (None: none was started)."""
    error: str = ""
    """Why this part is an ERROR, once known (bad frame, backend fault, ...)."""
    output: BackendOutput | None = None
    collected: bool = False
    after: threading.Event | None = None
    """The previous begun part's :attr:`finished` (parts are committed in the order begun)."""
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)
    """Set once the part's verdict is committed and reported (:attr:`verdict`)."""
    verdict: Verdict | None = None
    claimed: bool = False
    """True once a thread has taken on committing this part (exactly one does)."""
    claim_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def claim(self) -> bool:
        """Take on committing this part; False when another thread already has."""
        with self.claim_lock:
            if self.claimed:
                return False
            self.claimed = True
            return True


class _Rolling:
    """Recent values for percentiles (thread-safe enough: deque appends are atomic)."""

    def __init__(self, n: int = 2000) -> None:
        self.values: collections.deque[float] = collections.deque(maxlen=n)

    def add(self, v: float) -> None:
        self.values.append(v)

    def percentiles(self, *qs: float) -> list[float | None]:
        data = list(self.values)
        if not data:
            return [None for _ in qs]
        return [float(x) for x in np.percentile(np.asarray(data), list(qs))]


@dataclass(frozen=True, slots=True)
class PipelineStats:
    """Counters since start and recent latencies (ms)."""

    ok: int
    ng: int
    error: int
    not_stored: int
    total_ms_p50: float | None
    total_ms_p99: float | None
    infer_ms_p50: float | None
    infer_ms_p99: float | None
    commit_ms_p50: float | None
    commit_ms_p99: float | None
    last_inspection_id: int | None


class Pipeline:
    """Turns frames into committed, reported verdicts. A :class:`~edge.types.Component`."""

    name = "pipeline"

    def __init__(
        self,
        store: ResultStore,
        events: EventBus,
        *,
        sinks: Sequence[VerdictSink] = (),
        listeners: Sequence[ResultListener] = (),
    ) -> None:
        self.store = store
        self.events = events
        self.sinks: list[VerdictSink] = list(sinks)
        self.listeners: list[ResultListener] = list(listeners)
        self._state: ModelState | None = None
        self._inspect_lock = threading.Lock()
        self._finish_lock = threading.Lock()
        """Serialises id reservation, commit and reporting: ids are committed in order."""
        self._counts = {VerdictCode.OK: 0, VerdictCode.NG: 0, VerdictCode.ERROR: 0}
        self._not_stored = 0
        self._last_id: int | None = None
        self._last_begun: threading.Event | None = None
        """The last begun part's ``finished``: the next part is committed after it."""
        self._total = _Rolling()
        self._infer = _Rolling()
        self._commit = _Rolling()
        self.running = False

    # -- component --------------------------------------------------------------
    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        """Wait for the part in flight, then refuse new ones (they get ERROR verdicts)."""
        with self._inspect_lock:
            self.running = False

    # -- model -------------------------------------------------------------------
    @property
    def model(self) -> ModelState | None:
        return self._state

    def set_model(self, state: ModelState) -> ModelState | None:
        """Swap the model in between parts; returns the previous one (caller stops it)."""
        with self._inspect_lock:
            old, self._state = self._state, state
        return old

    def set_settings(self, settings: DecisionSettings) -> None:
        """Replace the decision settings (threshold, ROI...) for the next parts."""
        with self._inspect_lock:
            if self._state is None:
                raise ValueError("no model is loaded")
            self._state = dataclasses.replace(self._state, settings=settings)

    # -- hot path ----------------------------------------------------------------
    def inspect(self, frame: Frame) -> Verdict:
        """Inspect one frame; the returned verdict is committed and already reported."""
        with self._inspect_lock:
            return self.finish(self._begin(frame))

    def begin(self, frame: Frame) -> PartInFlight:
        """Preprocess ``frame`` and start the backend on it (returns while it runs).

        Every part begun must be :meth:`finish`-ed, in the order begun (it then
        gets its verdict, ERROR when anything failed); at most two parts may be
        begun and not yet collected (one running, one queued behind it).
        """
        with self._inspect_lock:
            return self._begin(frame)

    def _begin(self, frame: Frame) -> PartInFlight:
        t0 = time.perf_counter()
        state = self._state
        part = PartInFlight(frame, state, t0, {}, after=self._last_begun)
        self._last_begun = part.finished
        if state is None or not self.running:
            part.error = "no model loaded" if state is None else "pipeline stopped"
            part.collected = True
            return part
        try:
            x = state.package.preprocess(frame.image)
        except Exception as exc:  # any unusable image: an ERROR verdict, never a lost part
            if not isinstance(exc, ValueError | cv2.error):
                log.warning("preprocessing failed on frame %d", frame.sequence, exc_info=True)
            part.error = f"bad frame: {exc}"
            part.collected = True
            return part
        t1 = time.perf_counter()
        part.timings["preprocess"] = (t1 - t0) * 1000.0
        try:
            part.call = state.runner.submit(x, on_return=self._on_return(part))
        except BackendError as exc:
            part.timings["infer"] = (time.perf_counter() - t1) * 1000.0
            part.error = str(exc)
            part.collected = True
        return part

    def collect(self, part: PartInFlight) -> None:
        """Wait for the part's backend call (at most until its deadline); idempotent."""
        if part.collected:
            return
        part.collected = True
        call, state = part.call, part.state
        if call is None or state is None:  # not started: its error is already set
            part.error = part.error or "the backend was not started"
            return
        try:
            part.output = state.runner.result(call)
        except BackendError as exc:
            part.error = str(exc)
        part.timings["infer"] = call.latency_ms
        if part.output is not None:
            self._infer.add(part.timings["infer"])

    def _on_return(self, part: PartInFlight) -> Callable[[InferenceCall, BackendOutput], None]:
        def finish_on_backend_thread(call: InferenceCall, out: BackendOutput) -> None:
            """The backend returned and no part waits behind it: finish the part right here.

            Only when every part begun before it is committed (ids stay in
            the order begun) and no other thread took it on (a caller whose
            deadline passed meanwhile); its caller's :meth:`finish` then
            returns this verdict.
            """
            call.on_return = None  # no cycle part -> call -> hook -> part
            after = part.after
            if (after is not None and not after.is_set()) or not part.claim():
                return
            part.output = out
            part.timings["infer"] = call.latency_ms
            try:
                self._complete(part)
            except Exception:
                log.exception("finishing frame %d failed", part.frame.sequence)

        return finish_on_backend_thread

    def finish(self, part: PartInFlight) -> Verdict:
        """Decide, commit and report a begun part; the verdict returned is committed.

        When the backend's thread has already finished the part (see
        :meth:`InferenceRunner.submit`'s ``on_return``), this returns that verdict.
        """
        self.collect(part)
        if part.call is not None:
            part.call.on_return = None
        if not part.claim():  # the backend's thread has taken it on
            part.finished.wait()
            if part.verdict is None:
                raise RuntimeError(f"finishing frame {part.frame.sequence} failed (logged)")
            return part.verdict
        return self._complete(part)

    def _complete(self, part: PartInFlight) -> Verdict:
        """Decide (or ERROR), commit and report a claimed part; sets its ``finished``.

        Deciding that raises makes the part an ERROR (never a lost part).
        """
        try:
            try:
                part.verdict = self._decide_and_finish(part)
            except Exception as exc:
                if part.output is None:
                    raise
                log.exception("deciding frame %d failed", part.frame.sequence)
                part.output, part.error = None, f"deciding failed: {exc!r}"
                part.verdict = self._decide_and_finish(part)
        finally:
            part.after = None
            part.finished.set()
        return part.verdict

    def _decide_and_finish(self, part: PartInFlight) -> Verdict:
        frame, state = part.frame, part.state
        pixel_thr = state.settings.pixel_threshold if state else 1.0

        def make(
            code: VerdictCode,
            score: float,
            error: str = "",
            regions: tuple[Region, ...] = (),
            defect_class: str = "",
        ) -> Verdict:
            return Verdict(
                inspection_id=0,  # reserved at the commit
                frame_sequence=frame.sequence,
                source_id=frame.source_id,
                trigger_id=frame.trigger_id,
                code=code,
                score=score,
                threshold=state.settings.image_threshold if state else float("nan"),
                regions=regions,
                defect_class=defect_class,
                model_name=state.name if state else "",
                model_version=state.version if state else "",
                error=error,
                capture_time=frame.capture_time,
            )

        out = part.output
        if out is None or state is None:
            error = part.error or "no result"
            verdict = make(VerdictCode.ERROR, NAN, error)
            return self._finish(
                _Pending(verdict, frame.image, None, pixel_thr), part.t0, part.timings
            )
        t2 = time.perf_counter()
        amap = out.anomaly_map[0]
        d = decide(float(out.score[0]), amap, frame.image.shape[:2], state.settings)
        part.timings["decide"] = (time.perf_counter() - t2) * 1000.0
        verdict = make(d.code, d.score, d.error, d.regions, d.defect_class)
        return self._finish(_Pending(verdict, frame.image, amap, pixel_thr), part.t0, part.timings)

    def run_overlapped(
        self,
        next_frame: Callable[[float], Frame | None],
        stopping: Callable[[], bool],
        beat: Callable[[], None] = lambda: None,
    ) -> int:
        """The free-run loop: inspect frames from ``next_frame(timeout_s)`` until ``stopping()``.

        While the backend runs part N, a frame that is already waiting (a
        camera faster than the pipeline) is preprocessed and queued behind it
        as part N+1, so the backend starts N+1 the moment N returns; part N is
        then decided, committed and reported while N+1 runs. With no frame
        waiting, N is finished at once, so a slow camera adds no latency. A
        queued frame waits at most one backend call. Every part begun is
        finished before it returns; returns how many parts it finished.
        """
        done = 0
        part: PartInFlight | None = None
        while True:
            beat()
            if part is None:
                if stopping():
                    return done
                frame = next_frame(0.25)
                if frame is not None:
                    part = self.begin(frame)
                continue
            following: PartInFlight | None = None
            if not stopping():
                frame = next_frame(0.0)
                if frame is not None:
                    following = self.begin(frame)  # queued behind ``part`` on the backend
            self.finish(part)
            done += 1
            part = following

    def _finish(self, pending: _Pending, t0: float, timings: dict[str, float]) -> Verdict:
        with self._finish_lock:
            return self._commit_and_report(pending, t0, timings)

    def _commit_and_report(
        self, pending: _Pending, t0: float, timings: dict[str, float]
    ) -> Verdict:
        verdict = pending.verdict
        now = time.perf_counter()
        timings["pipeline"] = (now - t0) * 1000.0
        if verdict.capture_time > 0:
            timings["total"] = max(0.0, (time.monotonic() - verdict.capture_time) * 1000.0)
        else:
            timings["total"] = timings["pipeline"]
        verdict = dataclasses.replace(
            verdict,
            inspection_id=self.store.next_inspection_id(),
            timings_ms=timings,
            decided_unix=time.time(),
        )
        stored = True
        try:
            self.store.commit(verdict)
        except StoreError as exc:
            stored = False
            self._not_stored += 1
            verdict = dataclasses.replace(
                verdict, code=VerdictCode.ERROR, error=f"result store failed: {exc}"
            )
        self._commit.add((time.perf_counter() - now) * 1000.0)
        self._counts[verdict.code] += 1
        self._last_id = verdict.inspection_id
        self._total.add(timings["total"])
        # -- reported only after the commit ---------------------------------------
        for sink in self.sinks:
            try:
                sink.on_verdict(verdict)
            except Exception:
                log.exception("verdict sink %r failed", sink)
        image, amap = pending.image, pending.anomaly_map
        result = InspectionResult(verdict, image, amap, pending.pixel_threshold, stored)
        for fn in self.listeners:
            try:
                fn(result)
            except Exception:
                log.exception("result listener %r failed", fn)
        if stored and image is not None and self.store.wants_images(verdict.code):
            self.store.submit_images(
                ImageJob(
                    verdict.inspection_id,
                    verdict.code,
                    image,
                    amap,
                    verdict.regions,
                    pending.pixel_threshold,
                )
            )
        return verdict

    def report_error(
        self, *, reason: str, source_id: str, trigger_id: int | None, capture_time: float = 0.0
    ) -> Verdict:
        """An ERROR verdict for a part that has no frame (capture failed on a trigger)."""
        with self._inspect_lock:
            t0 = time.perf_counter()
            state = self._state
            verdict = Verdict(
                inspection_id=0,  # reserved at the commit
                frame_sequence=-1,
                source_id=source_id,
                trigger_id=trigger_id,
                code=VerdictCode.ERROR,
                score=float("nan"),
                threshold=state.settings.image_threshold if state else float("nan"),
                model_name=state.name if state else "",
                model_version=state.version if state else "",
                error=reason,
                capture_time=capture_time,
            )
            return self._finish(_Pending(verdict, None, None, 1.0), t0, {})

    # -- status ---------------------------------------------------------------------
    def stats(self) -> PipelineStats:
        """Counts since start and recent latency percentiles."""
        t50, t99 = self._total.percentiles(50, 99)
        i50, i99 = self._infer.percentiles(50, 99)
        c50, c99 = self._commit.percentiles(50, 99)
        return PipelineStats(
            ok=self._counts[VerdictCode.OK],
            ng=self._counts[VerdictCode.NG],
            error=self._counts[VerdictCode.ERROR],
            not_stored=self._not_stored,
            total_ms_p50=t50,
            total_ms_p99=t99,
            infer_ms_p50=i50,
            infer_ms_p99=i99,
            commit_ms_p50=c50,
            commit_ms_p99=c99,
            last_inspection_id=self._last_id,
        )

    def emit_status(
        self, kind: str, message: str, severity: Severity = Severity.INFO, **data: Any
    ) -> None:
        """Publish a pipeline status event."""
        self.events.emit(kind, "pipeline", message, severity, **data)
