"""The appliance: start every part in order, run the line, stop in reverse order.

Boot order (one log line each): result store, model + backend, pipeline,
capture, then PLC, panel and uplink when configured; the inspection loop
last. ``stop()`` (SIGTERM / SIGINT) first stops taking new parts, lets the
parts in flight finish (their verdicts are committed and reported), then
stops the parts in reverse order.

Acquisition modes:

- ``free_run``: an inspection thread takes the latest frame
  (:meth:`edge.capture.loop.CaptureLoop.latest`) and inspects it; frames
  replaced before being taken are counted as drops by the capture loop.
  Parts overlap (:meth:`edge.pipeline.Pipeline.run_overlapped`): part N is
  decided, committed and reported while the backend runs part N+1.
- ``triggered``: each PLC trigger (or :meth:`Appliance.trigger`) takes
  exactly one frame for its part id and inspects it; a trigger without a
  frame gets an ERROR verdict with the capture error as reason.

The appliance also implements :class:`edge.web.backend.PanelBackend` for the
web panel and hands the result store to the uplink agent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import yaml

from edge.config import LineInspectConfig
from edge.events import EventBus
from edge.pipeline import (
    InspectionResult,
    ModelState,
    PartInFlight,
    Pipeline,
    decision_settings,
    load_model,
)
from edge.store import ResultStore, StoredVerdict
from edge.types import Frame, Severity, StatusEvent, Verdict, VerdictCode, VerdictSink
from edge.watchdog import SystemdNotifier
from edge.web.backend import (
    ApplyResult,
    HealthSnapshot,
    LiveResult,
    ModelSlot,
    PartFileKind,
    PartPage,
    PartQuery,
    PartRecord,
    SlotName,
    Stats,
    StatsBucket,
)

if TYPE_CHECKING:
    from edge.capture.loop import CaptureLoop
    from edge.capture.sources import FrameSource

log = logging.getLogger("lineinspect")

SOURCE = "appliance"


class ApplianceError(Exception):
    """The appliance cannot start (no model, bad package, no backend...)."""


def _part_record(s: StoredVerdict, kinds: set[str]) -> PartRecord:
    return PartRecord.from_verdict(
        s.to_verdict(), has_image="image" in kinds, has_heatmap="heatmap" in kinds
    )


class PrintVerdicts:
    """A verdict sink that prints one line per verdict (after it was committed)."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write

    def on_verdict(self, verdict: Verdict) -> None:
        score = "nan" if math.isnan(verdict.score) else f"{verdict.score:.3f}"
        trig = "" if verdict.trigger_id is None else f" part={verdict.trigger_id}"
        err = f" error={verdict.error!r}" if verdict.error else ""
        self.write(
            f"verdict id={verdict.inspection_id}{trig} {verdict.code.name} "
            f"score={score} total_ms={verdict.timings_ms.get('total', 0.0):.1f}{err}"
        )


class _Panel:
    """The web panel served by uvicorn on a thread (a Component)."""

    name = "panel"

    def __init__(self, appliance: Appliance, data_dir: Path) -> None:
        import uvicorn

        from edge.web.server import create_app

        cfg = appliance.config().panel
        app = create_app(appliance, cfg, data_dir)
        self.url = f"http://{cfg.host}:{cfg.port}/"
        self._server = uvicorn.Server(
            uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
        )
        self._thread = threading.Thread(target=self._server.run, name="panel", daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10.0
        while not self._server.started:
            if not self._thread.is_alive():
                raise ApplianceError(f"the panel could not start on {self.url} (port in use?)")
            if time.monotonic() > deadline:
                raise ApplianceError(f"the panel did not start on {self.url} within 10 s")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5.0)


class Appliance:
    """One inspection station: store, model, pipeline, capture, PLC, panel, uplink."""

    def __init__(
        self,
        cfg: LineInspectConfig,
        *,
        config_path: Path | None = None,
        events: EventBus | None = None,
        sinks: Sequence[VerdictSink] = (),
        source: FrameSource | None = None,
        panel_data_dir: Path | None = None,
        drain_timeout_s: float = 10.0,
        stats_interval_s: float = 0.0,
        stats_printer: Callable[[str], None] | None = None,
        uplink_in_process: bool = True,
    ) -> None:
        self._cfg = cfg
        self.config_path = config_path
        self.events = events or EventBus()
        self.extra_sinks = list(sinks)
        self._source = source
        self.panel_data_dir = panel_data_dir or Path(cfg.store.path).parent / "panel"
        self.drain_timeout_s = drain_timeout_s
        self.stats_interval_s = stats_interval_s
        self.stats_printer = stats_printer or print
        self.store = ResultStore(cfg.store, self.events)
        self.pipeline = Pipeline(
            self.store, self.events, sinks=self.extra_sinks, listeners=[self._on_result]
        )
        self.capture: CaptureLoop | None = None
        self.plc: Any = None
        self.panel: _Panel | None = None
        self.uplink: Any = None
        self.notifier = SystemdNotifier()
        self._stopped_parts: list[tuple[str, Callable[[], None]]] = []
        self._stopping = threading.Event()
        self._model_lock = threading.RLock()
        # serialises slot changes made here (panel) with _follow_slots: a swap and the
        # pointer write that records it must not be split by a follow-up swap
        self._slots_lock = threading.RLock()
        self._threshold: float | None = cfg.pipeline.threshold
        self._latest: LiveResult | None = None
        self._loop_thread: threading.Thread | None = None
        self._supervisor: threading.Thread | None = None
        self._inflight = 0
        self._inflight_cv = threading.Condition()
        self._loop_beat = time.monotonic()
        self._health: tuple[bool, int] = (True, 0)
        self._started_unix = 0.0
        self.uplink_in_process = uplink_in_process
        self._model_path: Path | None = None
        self._slot_followed: Path | None = None
        """The active slot last seen by _follow_slots: only a move of it is followed."""
        self._next_slot_check = 0.0
        self.running = False

    # ======================================================================= boot
    def start(self) -> None:
        """Start every part in order; on a failure, stop what started and raise."""
        cfg = self._cfg
        self._started_unix = time.time()
        switch = sys.getswitchinterval()
        sys.setswitchinterval(cfg.pipeline.python_switch_interval_ms / 1000.0)
        self._stopped_parts.append(("switch interval", lambda: sys.setswitchinterval(switch)))
        try:
            self.store.start()
            self._started(
                "store",
                self.store.stop,
                "%s (next inspection id %d)",
                self.store.db_path,
                self.store.next_id,
            )
            self._model_path = self._slot_followed = self._package_path()
            state = self._load(self._model_path)
            self.pipeline.set_model(state)
            self._started(
                "backend",
                self._stop_model,
                "%s running %s (%s graph)",
                state.package.model_id,
                state.runner.active_label,
                state.runner.describe().get("graph"),
            )
            self.pipeline.start()
            self._started(
                "pipeline",
                self.pipeline.stop,
                "threshold %.3f, pixel threshold %.3f, deadline %.0f ms",
                state.settings.image_threshold,
                state.settings.pixel_threshold,
                cfg.backend.deadline_ms,
            )
            from edge.capture.loop import CaptureLoop

            self.capture = CaptureLoop(cfg.camera, self.events, source=self._source)
            self.capture.start()
            self._started(
                "capture",
                self.capture.stop,
                "%s in %s mode (%s)",
                cfg.camera.id,
                cfg.camera.mode,
                self.capture.source.describe(),
            )
            # supervision (PLC heartbeat and health, systemd watchdog) before the PLC listens
            self._supervisor = threading.Thread(
                target=self._supervise, name="supervisor", daemon=True
            )
            self._supervisor.start()
            if cfg.plc.enabled:
                from plc.service import PlcService

                self.plc = PlcService(cfg.plc, self.events, on_trigger=self._on_plc_trigger)
                self.pipeline.sinks.append(self.plc)
                self.plc.start()
                self._started(
                    "plc",
                    self.plc.stop,
                    "Modbus %s %s on %s",
                    cfg.plc.transport,
                    cfg.plc.mode,
                    self.plc.endpoint,
                )
            if cfg.panel.enabled:
                self.panel = _Panel(self, self.panel_data_dir)
                self.panel.start()
                self._started("panel", self.panel.stop, "%s", self.panel.url)
            if cfg.uplink.enabled and self.uplink_in_process:
                from cloud_sync.agent import agent_from_config

                capture = self.capture
                self.uplink = agent_from_config(
                    cfg,
                    source=self.store,
                    activate=self.swap_model,
                    bus=self.events,
                    dropped_frames=lambda: capture.stats().drops,
                )
                self.uplink.start()
                self._started(
                    "uplink",
                    self.uplink.stop,
                    "MQTT %s:%d as %s",
                    cfg.uplink.host,
                    cfg.uplink.port,
                    cfg.station.device_id,
                )
            self.running = True
            if cfg.camera.mode == "free_run":
                self._loop_thread = threading.Thread(
                    target=self._free_run_loop, name="inspection", daemon=True
                )
                self._loop_thread.start()
        except BaseException:
            self._stopping.set()
            self._stop_parts()
            raise
        self.notifier.notify("READY=1", f"STATUS=inspecting ({cfg.camera.mode})")
        log.info("appliance: ready (%s mode)", cfg.camera.mode)
        self.events.emit("appliance.started", SOURCE, f"inspecting in {cfg.camera.mode} mode")

    def _started(self, name: str, stop: Callable[[], None], fmt: str, *args: object) -> None:
        self._stopped_parts.append((name, stop))
        log.info("%s: " + fmt, name, *args)

    def stop(self) -> None:
        """Stop taking parts, finish the ones in flight, stop every part in reverse order."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.notifier.notify("STOPPING=1")
        log.info("appliance: stopping, draining parts in flight")
        if self.plc is not None:
            with contextlib.suppress(Exception):
                self.plc.set_health(ready=False, message="appliance stopping")
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=self.drain_timeout_s)
        with self._inflight_cv:
            self._inflight_cv.wait_for(lambda: self._inflight == 0, self.drain_timeout_s)
        if self._supervisor is not None:
            self._supervisor.join(timeout=2.0)
        self.running = False
        self._stop_parts()
        log.info("appliance: stopped")

    def _stop_parts(self) -> None:
        while self._stopped_parts:
            name, stop = self._stopped_parts.pop()
            try:
                stop()
                log.info("%s: stopped", name)
            except Exception:
                log.exception("%s: failed to stop cleanly", name)

    def run_forever(
        self,
        *,
        on_started: Callable[[], None] | None = None,
        before_stop: Callable[[], object] | None = None,
    ) -> int:
        """Start, then run until SIGTERM / SIGINT; returns the exit code.

        ``on_started`` runs once everything is up; ``before_stop`` runs first
        thing on the way down (the demo stops its line simulator there).
        """
        done = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("appliance: %s received", signal.Signals(signum).name)
            done.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            if on_started is not None:
                on_started()
            while not done.wait(0.5):
                pass
        finally:
            if before_stop is not None:
                try:
                    before_stop()
                except Exception:
                    log.exception("stopping helper failed")
            self.stop()
            for s, h in old.items():
                signal.signal(s, h)
        return 0

    # ======================================================================= model
    def _package_path(self) -> Path:
        cfg = self._cfg
        from cloud_sync.slots import active_package_path

        if cfg.model.package is not None:
            return self._install_config_package(Path(cfg.model.package))

        active = active_package_path(Path(cfg.uplink.updates.slots_dir))
        if active is not None:
            return active
        raise ApplianceError(
            "no model package: set model.package in the configuration, "
            "install one with the uplink, or run `lineinspect demo`"
        )

    def _install_config_package(self, package: Path) -> Path:
        """``model.package`` is the initial model: it becomes a slot (see cloud_sync.slots)."""
        from cloud_sync.slots import SlotError, active_package_path, install_config_package
        from models.package import PackageError

        slots_dir = Path(self._cfg.uplink.updates.slots_dir)
        try:
            path, installed = install_config_package(slots_dir, package, self._trusted_keys())
        except (PackageError, SlotError, OSError) as exc:
            active = None
            try:
                active = active_package_path(slots_dir)
            except Exception:  # a corrupt pointer: nothing to fall back on
                log.debug("no usable slot to fall back on", exc_info=True)
            if active is None:
                raise ApplianceError(f"model.package {package}: {exc}") from exc
            msg = f"model.package {package} refused ({exc}); running the active slot {active}"
            log.error(msg)
            self.events.emit("model.config_refused", SOURCE, msg, Severity.ERROR)
            return active
        if installed:
            log.info("model.package %s installed as the active model slot (%s)", package, path)
        else:
            log.info("model slots: running the active slot %s (model.package %s)", path, package)
        return path

    def _trusted_keys(self) -> list[Any] | None:
        paths = self._cfg.model.trusted_keys
        if not paths:
            return None
        from models.signing import load_public_key

        return [load_public_key(Path(p)) for p in paths]

    def _load(self, path: Path) -> ModelState:
        from models.package import PackageError, load_package

        try:
            package = load_package(path, self._trusted_keys())
        except PackageError as exc:
            raise ApplianceError(f"model package {path} refused: {exc}") from exc
        except OSError as exc:
            raise ApplianceError(f"model package {path}: {exc}") from exc
        from edge.backends import BackendError

        try:
            return load_model(
                package,
                self._cfg.backend,
                self._cfg.pipeline,
                self.events,
                verify=self._cfg.model.verify_reference,
                threshold=self._threshold,
            )
        except BackendError as exc:
            package.close()
            raise ApplianceError(str(exc)) from exc

    def _stop_model(self) -> None:
        state = self.pipeline.model
        if state is not None:
            state.runner.stop()
            state.package.close()

    def swap_model(self, package_path: Path) -> None:
        """Load ``package_path`` next to the running model, then swap it in between parts.

        Verifies the package (hashes, signature with trusted keys), loads it on
        the configured backend and checks its reference scores before the
        swap; on any failure the running model stays and ApplianceError says why.
        """
        with self._model_lock:
            new = self._load(Path(package_path))
            self._model_path = Path(package_path)
            old = self.pipeline.set_model(new)
            if old is not None:
                old.runner.stop()
                old.package.close()
        self.events.emit(
            "model.swapped",
            SOURCE,
            f"now running {new.package.model_id} on {new.runner.active_label}",
            model=new.package.model_id,
        )

    def set_threshold(self, threshold: float | None) -> None:
        """Set the image threshold for the next parts (None: the model's own)."""
        if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be a positive number, got {threshold}")
        with self._model_lock:
            state = self.pipeline.model
            if state is None:
                raise ValueError("no model is loaded")
            self._threshold = threshold
            self.pipeline.set_settings(
                decision_settings(state.package, self._cfg.pipeline, threshold=threshold)
            )
        self.events.emit(
            "pipeline.threshold", SOURCE, f"image threshold set to {self.current_threshold():.3f}"
        )

    def current_threshold(self) -> float:
        state = self.pipeline.model
        return state.settings.image_threshold if state else float("nan")

    # ======================================================================= inspection
    def _free_run_loop(self) -> None:
        capture = self.capture
        assert capture is not None
        # overlapped: part N is committed and reported while the backend runs part N+1
        self.pipeline.run_overlapped(
            lambda timeout_s: capture.latest(timeout_s=timeout_s),
            self._stopping.is_set,
            self._loop_alive,
        )

    def _loop_alive(self) -> None:
        self._loop_beat = time.monotonic()

    def _on_plc_trigger(self, part_id: int) -> _PartStep:
        """PLC worker: grab the part's frame now; the PLC's inspection thread runs the
        returned step, so the next part's frame is grabbed while this one is inspected
        (and, when parts queue up, its inference starts before this one is reported)."""
        with self._inflight_cv:
            self._inflight += 1
        try:
            grabbed = self._grab(part_id)
        except BaseException:
            self._part_done()
            raise
        return _PartStep(self, grabbed)

    def trigger(self, part_id: int) -> Verdict:
        """Triggered mode: take one frame for ``part_id`` and inspect it (returns when done)."""
        return self._on_plc_trigger(part_id)()

    def _grab(self, part_id: int) -> Frame | Verdict:
        """The part's frame, or its ERROR verdict (already reported) when there is none."""
        from edge.capture.loop import CaptureError

        source_id = self._cfg.camera.id
        if self._stopping.is_set() or self.capture is None:
            return self.pipeline.report_error(
                reason="appliance stopping", source_id=source_id, trigger_id=part_id
            )
        t0 = time.monotonic()
        try:
            return self.capture.trigger(part_id)
        except CaptureError as exc:
            return self.pipeline.report_error(
                reason=f"capture: {exc}",
                source_id=source_id,
                trigger_id=part_id,
                capture_time=t0,
            )

    def _part_done(self) -> None:
        with self._inflight_cv:
            self._inflight -= 1
            self._inflight_cv.notify_all()

    def _on_result(self, result: InspectionResult) -> None:
        if result.image is None:
            return
        self._latest = LiveResult(result.verdict, result.image, result.anomaly_map)

    # ======================================================================= supervision
    def _evaluate_health(self) -> tuple[bool, int, str]:
        from plc.registers import FaultCode

        state = self.pipeline.model
        if self.capture is not None and self.capture.state in ("reconnecting", "ended"):
            return False, int(FaultCode.CAMERA_LOST), "camera unavailable"
        if state is None or not state.runner.ready:
            return False, int(FaultCode.BACKEND_FAILED), "backend recovering"
        if self.store.writer_stats().degraded and self.store.commit_failures:
            return False, int(FaultCode.STORE_FAILED), "result store failing"
        return True, 0, ""

    def _supervise(self) -> None:
        next_stats = time.monotonic() + self.stats_interval_s
        last_counts = (0, 0)
        interval = self.notifier.watchdog_interval_s
        next_ping = 0.0
        free_run = self._cfg.camera.mode == "free_run"
        while not self._stopping.wait(0.1):
            ready, fault, why = self._evaluate_health()
            if self.plc is not None:
                if (ready, fault) != self._health:
                    self.plc.set_health(ready=ready, fault_code=fault, message=why)
                if ready:
                    self.plc.heartbeat_ok()
            if (ready, fault) != self._health:
                self._health = (ready, fault)
            now = time.monotonic()
            loop_alive = not free_run or now - self._loop_beat < 10.0
            if interval is not None and now >= next_ping and loop_alive:
                self.notifier.notify("WATCHDOG=1")
                next_ping = now + interval
            if now >= self._next_slot_check:
                self._next_slot_check = now + 2.0
                self._follow_slots()
            if self.stats_interval_s > 0 and now >= next_stats:
                last_counts = self._print_stats(
                    now - next_stats + self.stats_interval_s, last_counts
                )
                next_stats = now + self.stats_interval_s

    def _follow_slots(self) -> None:
        """Swap in the slots' active package when another process (the uplink unit) moved it."""
        if self._stopping.is_set() or self.uplink is not None:
            return  # an in-process uplink swaps through swap_model itself
        with self._slots_lock:
            self._follow_slots_locked()

    def _follow_slots_locked(self) -> None:
        from cloud_sync.slots import active_package_path

        try:
            active = active_package_path(Path(self._cfg.uplink.updates.slots_dir))
        except Exception as exc:
            log.warning("cannot read the model slots: %s", exc)
            return
        if active is None or active in (self._model_path, self._slot_followed):
            return  # a direct swap_model (not through the slots) is not undone
        self._slot_followed = active
        log.info("model slots: active package changed to %s; swapping", active)
        try:
            self.swap_model(active)
        except ApplianceError as exc:
            self._model_path = active  # do not retry the same broken package every 2 s
            self.events.emit("model.swap_failed", SOURCE, f"{active}: {exc}", Severity.ERROR)

    def _print_stats(self, window_s: float, last: tuple[int, int]) -> tuple[int, int]:
        st = self.pipeline.stats()
        done = st.ok + st.ng + st.error
        cap = self.capture.stats() if self.capture else None
        frames = cap.frames if cap else 0
        fps = (done - last[0]) / max(window_s, 1e-3)
        p99 = f"{st.total_ms_p99:.1f}" if st.total_ms_p99 is not None else "-"
        self.stats_printer(
            f"[{time.strftime('%H:%M:%S')}] {fps:5.1f} parts/s | camera {cap.fps if cap else 0:.1f}"
            f" fps, drops {cap.drops if cap else 0} | OK {st.ok}  NG {st.ng}  ERROR {st.error}"
            f" | frame-to-verdict p99 {p99} ms | backend {self.backend_label()}"
        )
        return done, frames

    def backend_label(self) -> str:
        state = self.pipeline.model
        return state.runner.active_label if state else "none"

    # ======================================================================= panel backend
    def latest(self) -> LiveResult | None:
        return self._latest

    def stats(self, since_unix: float, bucket_s: float) -> Stats:
        buckets = self.store.buckets(since_unix, bucket_s)
        c = self.store.counts(since_unix=since_unix)
        return Stats(
            since_unix=since_unix,
            bucket_s=bucket_s,
            ok=c.ok,
            ng=c.ng,
            error=c.error,
            buckets=tuple(
                StatsBucket(b.start_unix, b.ok, b.ng, b.error, b.latency_ms_p50, b.latency_ms_max)
                for b in buckets
            ),
        )

    def query_parts(self, query: PartQuery) -> PartPage:
        rows, total = self.store.query(
            code=query.code,
            defect_class=query.defect_class,
            since_unix=query.since_unix,
            until_unix=query.until_unix,
            limit=query.limit,
            offset=query.offset,
        )
        kinds = self.store.image_kinds([r.inspection_id for r in rows])
        return PartPage(
            tuple(_part_record(r, kinds.get(r.inspection_id, set())) for r in rows), total
        )

    def part(self, inspection_id: int) -> PartRecord | None:
        row = self.store.get(inspection_id)
        if row is None:
            return None
        return _part_record(row, self.store.image_kinds([inspection_id]).get(inspection_id, set()))

    def part_file(self, inspection_id: int, kind: PartFileKind) -> Path | None:
        return self.store.image_path(inspection_id, kind)

    def defect_classes(self) -> Sequence[str]:
        return self.store.defect_classes()

    def config(self) -> LineInspectConfig:
        return self._cfg

    def apply_config(self, new: LineInspectConfig) -> ApplyResult:
        old = self._cfg
        changed = [k for k in type(new).model_fields if getattr(new, k) != getattr(old, k)]
        live = {"pipeline"}
        restart = [k for k in changed if k not in live]
        if restart and self.config_path is None:
            raise ValueError(
                "these settings need a restart but there is no configuration "
                f"file to save them to: {', '.join(restart)}"
            )
        applied: list[str] = []
        if "pipeline" in changed:
            with self._model_lock:
                state = self.pipeline.model
                if state is None:
                    raise ValueError("no model is loaded")
                self._threshold = new.pipeline.threshold
                self.pipeline.set_settings(
                    decision_settings(state.package, new.pipeline, threshold=self._threshold)
                )
            applied = [
                f"pipeline.{k}"
                for k in type(new.pipeline).model_fields
                if getattr(new.pipeline, k) != getattr(old.pipeline, k)
            ]
        if self.config_path is not None and changed:
            self._save_config(new)
        self._cfg = new if not restart else old.model_copy(update={"pipeline": new.pipeline})
        return ApplyResult(applied=tuple(applied), restart_required=tuple(restart))

    def _save_config(self, new: LineInspectConfig) -> None:
        assert self.config_path is not None
        data = new.model_dump(mode="json")  # whole: a defaulted union tag must stay
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        folder = self.config_path.parent
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".config-", suffix=".yaml")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, self.config_path)

    # -- model slots (shared with the uplink's update manager) --------------------------
    def _slots(self) -> Any:
        from cloud_sync.slots import SlotStore

        return SlotStore(Path(self._cfg.uplink.updates.slots_dir))

    def _slot_info(self, role: SlotName, slot: str | None, slots: Any) -> ModelSlot:
        if slot is None:
            return ModelSlot(role)
        path = slots.package_path(slot)
        try:
            from models.package import load_package

            with load_package(path) as pkg:
                m = pkg.manifest
                import hashlib

                return ModelSlot(
                    role,
                    m.name,
                    m.version,
                    m.model_dump(mode="json")["created"],
                    m.threshold.image,
                    dict(m.metrics),
                    path,
                    hashlib.sha256(pkg.manifest_bytes).hexdigest(),
                )
        except Exception as exc:
            log.warning("slot %s unreadable: %s", slot, exc)
            return ModelSlot(role, slot, "", path=path)

    def model_slots(self) -> Sequence[ModelSlot]:
        slots = self._slots()
        ptr = slots.read()
        out = [
            self._slot_info(SlotName.ACTIVE, ptr.active, slots),
            self._slot_info(SlotName.STAGED, ptr.staged, slots),
            self._slot_info(SlotName.PREVIOUS, ptr.previous, slots),
        ]
        if ptr.active is None and self.pipeline.model is not None:
            pkg = self.pipeline.model.package
            m = pkg.manifest
            import hashlib

            out[0] = ModelSlot(
                SlotName.ACTIVE,
                m.name,
                m.version,
                m.model_dump(mode="json")["created"],
                m.threshold.image,
                dict(m.metrics),
                pkg.source,
                hashlib.sha256(pkg.manifest_bytes).hexdigest(),
            )
        return out

    def stage_model(self, package: Path) -> ModelSlot:
        import hashlib

        from cloud_sync.slots import slot_name_for
        from models.package import PackageError, load_package, pack_tar

        try:
            with load_package(Path(package), self._trusted_keys()) as pkg:
                m = pkg.manifest
                digest = hashlib.sha256(pkg.manifest_bytes).hexdigest()
                slots = self._slots()
                slot = slot_name_for(m.name, m.version, digest)
                with tempfile.TemporaryDirectory(dir=slots.incoming) as tmp:
                    tar = pack_tar(pkg.root, Path(tmp) / "package.tar")
                    slots.add_package(tar, slot, move=True)
                slots.stage(slot, m.version)
        except PackageError as exc:
            raise ValueError(f"package refused: {exc}") from exc
        return self._slot_info(SlotName.STAGED, slot, slots)

    def activate_staged(self) -> ModelSlot:
        with self._slots_lock:
            return self._activate_staged()

    def _activate_staged(self) -> ModelSlot:
        slots = self._slots()
        ptr = slots.read()
        if ptr.staged is None:
            raise ValueError("no staged model to activate")
        try:
            self.swap_model(slots.package_path(ptr.staged))
        except ApplianceError as exc:
            raise ValueError(f"activation failed, the running model stays: {exc}") from exc
        ptr = slots.activate_staged()
        return self._slot_info(SlotName.ACTIVE, ptr.active, slots)

    def rollback(self) -> ModelSlot:
        with self._slots_lock:
            return self._rollback()

    def _rollback(self) -> ModelSlot:
        slots = self._slots()
        ptr = slots.read()
        if ptr.previous is None:
            raise ValueError("no previous model to roll back to")
        try:
            self.swap_model(slots.package_path(ptr.previous))
        except ApplianceError as exc:
            raise ValueError(f"rollback failed, the running model stays: {exc}") from exc
        ptr = slots.rollback()
        return self._slot_info(SlotName.ACTIVE, ptr.active, slots)

    # -- health ---------------------------------------------------------------------------
    def health(self) -> HealthSnapshot:
        cap = self.capture.stats() if self.capture else None
        state = self.pipeline.model
        p50, p99 = state.runner.latency_ms() if state else (None, None)
        plc_status = self.plc.status() if self.plc is not None else None
        uplink_state = "disabled"
        depth: int | None = None
        if self.uplink is not None:
            uplink_state = "connected" if self.uplink.link.connected else "disconnected"
            with contextlib.suppress(Exception):
                depth = int(self.uplink.outbox.depth())
        st = self.pipeline.stats()
        ws = self.store.writer_stats()
        extra: dict[str, float] = {
            "verdicts_ok_total": float(st.ok),
            "verdicts_ng_total": float(st.ng),
            "verdicts_error_total": float(st.error),
            "verdicts_not_stored_total": float(st.not_stored),
            "store_images_bytes": float(ws.bytes_used),
            "store_images_skipped_total": float(ws.skipped_no_space + ws.skipped_queue_full),
            "store_degraded": float(ws.degraded),
        }
        if st.total_ms_p99 is not None:
            extra["pipeline_latency_ms_p99"] = st.total_ms_p99
        if state is not None:
            extra["backend_hangs_total"] = float(state.runner.hangs)
            extra["backend_errors_total"] = float(state.runner.errors)
        return HealthSnapshot(
            camera_connected=bool(cap and cap.state == "running"),
            camera_fps=cap.fps if cap else None,
            camera_dropped_frames=(cap.drops + cap.trigger_failures) if cap else 0,
            backend_name=self.backend_label(),
            backend_latency_ms_p50=p50,
            backend_latency_ms_p99=p99,
            pipeline_running=self.running and bool(state and state.runner.ready),
            threshold=self.current_threshold(),
            plc_connected=bool(plc_status.get("connected")) if plc_status else None,
            uplink_state=uplink_state,
            uplink_outbox_depth=depth,
            store_path=Path(self._cfg.store.path),
            extra=extra,
        )

    def recent_events(self, limit: int) -> Sequence[StatusEvent]:
        return self.events.history()[-max(0, limit) :] if limit > 0 else []


def verdict_counts(pipeline: Pipeline) -> dict[str, int]:
    """OK / NG / ERROR counts since start (for logs and the demo)."""
    st = pipeline.stats()
    return {
        VerdictCode.OK.name: st.ok,
        VerdictCode.NG.name: st.ng,
        VerdictCode.ERROR.name: st.error,
    }


class _PartStep:
    """One triggered part's inspection in two halves (a :class:`plc.service.TwoPhaseStep`).

    ``begin`` preprocesses the grabbed frame and starts (or queues) its
    inference; ``finish`` waits for it, decides, commits and reports (or
    returns the verdict the backend's thread already committed and reported,
    see :meth:`edge.pipeline.Pipeline.finish`). The PLC's
    inspection thread begins the next waiting part before finishing this one;
    calling the step runs both halves in order.
    """

    def __init__(self, app: Appliance, grabbed: Frame | Verdict) -> None:
        self._app = app
        self._grabbed = grabbed
        self._part: PartInFlight | None = None
        self._done = False

    def begin(self) -> None:
        if isinstance(self._grabbed, Frame) and self._part is None:
            self._part = self._app.pipeline.begin(self._grabbed)

    def finish(self) -> Verdict:
        try:
            if isinstance(self._grabbed, Verdict):  # no frame: already an ERROR, reported
                return self._grabbed
            if self._part is None:
                self.begin()
            assert self._part is not None
            return self._app.pipeline.finish(self._part)
        finally:
            if not self._done:
                self._done = True
                self._app._part_done()

    def __call__(self) -> Verdict:
        self.begin()
        return self.finish()
