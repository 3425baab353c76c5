"""PlcService: the component the app starts; wires the handshake to Modbus and the app.

Threads (all daemons, all stopped by :meth:`PlcService.stop`):

* ``plc-modbus-server`` / ``plc-modbus-client``: the pymodbus asyncio loop;
  it only touches the in-memory handshake, never app code;
* ``plc-worker``: calls the app's ``on_trigger(part_id)`` in trigger order;
  it should only grab the part's frame. When it returns a callable (the rest
  of the work: inspect that frame), ``plc-inspect`` runs it, in trigger
  order, so the next trigger's frame is grabbed while this part is inspected.
  A step that is a :class:`TwoPhaseStep` (``begin()`` starts the inference,
  ``finish()`` decides and reports) is overlapped when parts queue up: the
  next waiting step is begun (its inference queued behind this one's) before
  this one is finished, so deciding, storing and reporting a part never hold
  up the next part's inference;
* ``plc-recipe``: calls the app's ``on_recipe(recipe_id)`` (model loads take
  seconds; a handler that never returns fails the change at
  ``plc.recipe_timeout_ms`` and wedges nothing else);
* ``plc-timer``: deadlines, heartbeat, pipeline watchdog;
* ``plc-events``: publishes status events on the EventBus.

Integration contract (see docs/plc.md)::

    svc = PlcService(cfg.plc, bus, on_trigger=grab_frame_for, on_recipe=switch_recipe)
    svc.start()
    svc.heartbeat_ok()              # repeatedly, while the pipeline is healthy
    svc.on_verdict(verdict)         # after the verdict is stored; trigger_id = part id
    svc.set_health(ready=False, fault_code=FaultCode.CAMERA_LOST, message="...")
    svc.status()                    # plain dict for the panel / telemetry
    svc.stop()
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, cast, runtime_checkable

from edge.events import EventBus
from edge.types import Severity, StatusEvent, Verdict
from plc.config import PlcConfig
from plc.handshake import Effects, EventSpec, Handshake, RecipeResult
from plc.registers import CommandResult, FaultCode

__all__ = ["FaultCode", "PlcService", "RecipeResult", "TwoPhaseStep"]

log = logging.getLogger(__name__)

SOURCE = "plc"
"""``source`` of every status event this package publishes."""

_STOP = object()

TriggerHandler = Callable[[int], Callable[[], object] | None]
"""``on_trigger(part_id)``: grab the part's frame; may return the rest of the work."""


@runtime_checkable
class TwoPhaseStep(Protocol):
    """The rest of a part's work in two halves (``step()`` is both, in order)."""

    def __call__(self) -> object: ...

    def begin(self) -> None:
        """Start the part's inference (returns while it runs)."""

    def finish(self) -> object:
        """Wait for it, decide, store and report the part."""


class PlcService:
    """The appliance's Modbus side: a :class:`edge.types.Component`."""

    name = "plc"

    def __init__(
        self,
        cfg: PlcConfig,
        events: EventBus,
        on_trigger: TriggerHandler,
        on_recipe: Callable[[int], RecipeResult] | None = None,
    ) -> None:
        self.cfg = cfg
        self._events = events
        self._on_trigger = on_trigger
        self._on_recipe = on_recipe
        self.core = Handshake(cfg, recipes_supported=on_recipe is not None)
        self._work: queue.SimpleQueue[int | object] = queue.SimpleQueue()
        self._inspect: queue.SimpleQueue[Callable[[], object] | object] = queue.SimpleQueue()
        self._recipes: queue.SimpleQueue[int | object] = queue.SimpleQueue()
        self._event_q: queue.SimpleQueue[EventSpec | object] = queue.SimpleQueue()
        self._timer_cv = threading.Condition()
        self._timer_dirty = False
        self._running = False
        self._threads: list[threading.Thread] = []
        self._link: Any = None
        self._conn_lock = threading.Lock()
        self._connections = 0
        self._refused = 0

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Open the Modbus side; raises OSError if the port/serial line cannot be used."""
        if self._running:
            return
        self._running = True
        for target, name in (
            (self._worker, "plc-worker"),
            (self._inspector, "plc-inspect"),
            (self._recipe_worker, "plc-recipe"),
            (self._timer, "plc-timer"),
            (self._publisher, "plc-events"),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if self.cfg.mode == "server":
            from plc.server import ModbusServerLink

            self._link = ModbusServerLink(self.cfg, self.core, self._apply, self._connection)
        else:
            from plc.client import ModbusClientLink

            self._link = ModbusClientLink(self.cfg, self.core, self._apply, self._connection)
        try:
            self._link.start()
        except BaseException:
            self.stop()
            raise
        self._apply(self.core.start())
        self._emit(
            EventSpec(
                "started",
                f"Modbus {self.cfg.transport.upper()} {self.cfg.mode} on {self._link.endpoint}",
                data={
                    "mode": self.cfg.mode,
                    "transport": self.cfg.transport,
                    "endpoint": self._link.endpoint,
                },
            )
        )

    def stop(self) -> None:
        """Stop Modbus and the threads (ONLINE drops first)."""
        if not self._running:
            return
        self.core.stop()
        if self._link is not None:
            self._link.stop()
        self._running = False
        self._work.put(_STOP)
        self._recipes.put(_STOP)
        with self._timer_cv:
            self._timer_cv.notify_all()
        self._emit(EventSpec("stopped", "Modbus link stopped"))
        self._event_q.put(_STOP)
        for t in self._threads:
            t.join(5.0)
        self._threads.clear()

    # ---------------------------------------------------------------- app API
    def on_verdict(self, verdict: Verdict) -> None:
        """A stored verdict; ``verdict.trigger_id`` is the part id (None = free-run, ignored)."""
        self._apply(self.core.add_verdict(verdict))

    def set_health(self, *, ready: bool, fault_code: int = 0, message: str = "") -> None:
        """The app's health: a non-zero fault_code sets FAULT; ready=False drops READY."""
        self._apply(self.core.set_health(ready=ready, fault_code=int(fault_code), message=message))

    def heartbeat_ok(self) -> None:
        """The pipeline is healthy now; the heartbeat register advances while these arrive."""
        self._apply(self.core.heartbeat_ok())

    def status(self) -> dict[str, Any]:
        """Plain data for the panel and telemetry (JSON-serialisable)."""
        st = self.core.status()
        with self._conn_lock:
            refused = self._refused
        st.update(
            {
                "enabled": True,
                "running": self._running,
                "mode": self.cfg.mode,
                "transport": self.cfg.transport,
                "endpoint": self._link.endpoint if self._link is not None else "",
                "connected": bool(self._link.peers()) if self._link is not None else False,
                "clients": self._link.peers() if self._link is not None else [],
                "refused_connections": refused,
            }
        )
        return st

    @property
    def endpoint(self) -> str:
        """Where Modbus is served / which PLC is polled ("" before start)."""
        return str(self._link.endpoint) if self._link is not None else ""

    # -------------------------------------------------------------- internals
    def _apply(self, fx: Effects) -> None:
        for part_id in fx.triggers:
            self._work.put(part_id)
        if fx.recipe is not None:
            self._recipes.put(fx.recipe)
        for ev in fx.events:
            self._emit(ev)
        if fx.wake_timer:
            with self._timer_cv:
                self._timer_dirty = True
                self._timer_cv.notify()

    def _emit(self, ev: EventSpec) -> None:
        self._event_q.put(ev)

    def _connection(self, what: str, peer: str, reason: str) -> None:
        if what == "refused":
            with self._conn_lock:
                self._refused += 1
            self._emit(
                EventSpec(
                    "refused",
                    f"connection from {peer} refused: {reason}",
                    Severity.WARNING,
                    {"client": peer},
                )
            )
            logging.getLogger("plc.audit").warning("REFUSED connection from %s: %s", peer, reason)
            return
        sev = Severity.INFO if what == "connected" else Severity.WARNING
        msg = f"{peer} {what}" + (f": {reason}" if reason else "")
        self._emit(EventSpec(what, msg, sev, {"client": peer, "mode": self.cfg.mode}))
        logging.getLogger("plc.audit").info("%s %s %s", peer, what, reason)

    def _worker(self) -> None:
        """Trigger order: on_trigger (grab); the step it returns goes to plc-inspect."""
        try:
            while True:
                item = self._work.get()
                if item is _STOP:
                    return
                part_id = cast(int, item)
                try:
                    rest = self._on_trigger(part_id)
                except Exception:
                    log.exception(
                        "on_trigger(%d) failed; the part will get an ERROR result at its deadline",
                        part_id,
                    )
                    continue
                if rest is not None:
                    self._inspect.put(rest)
        finally:
            self._inspect.put(_STOP)  # after every step already queued

    def _inspector(self) -> None:
        """Run the steps in trigger order; overlap two-phase steps when parts queue up."""
        begun: TwoPhaseStep | None = None  # begun, not yet finished
        while True:
            step = self._inspect.get() if begun is None else self._next_waiting()
            if step is _STOP:
                if begun is not None:
                    self._run(begun.finish)
                return
            if step is None:  # nothing waiting: finish the begun part at once
                assert begun is not None
                self._run(begun.finish)
                begun = None
                continue
            if not isinstance(step, TwoPhaseStep):
                if begun is not None:
                    self._run(begun.finish)
                    begun = None
                self._run(cast(Callable[[], object], step))
                continue
            started = self._run(step.begin)
            if begun is not None:
                self._run(begun.finish)  # while ``step``'s inference runs
                begun = None
            if started:
                begun = step
            else:  # its finish reports what it can (or the deadline gives an ERROR)
                self._run(step.finish)

    def _next_waiting(self) -> object:
        try:
            return self._inspect.get_nowait()
        except queue.Empty:
            return None

    @staticmethod
    def _run(fn: Callable[[], object]) -> bool:
        try:
            fn()
        except Exception:
            log.exception("inspection step failed; the part gets an ERROR at its deadline")
            return False
        return True

    def _recipe_worker(self) -> None:
        while True:
            item = self._recipes.get()
            if item is _STOP:
                return
            self._run_recipe(cast(int, item))

    def _run_recipe(self, recipe_id: int) -> None:
        assert self._on_recipe is not None
        try:
            returned: object = self._on_recipe(recipe_id)
            if isinstance(returned, RecipeResult):
                result = returned
            else:
                result = RecipeResult(
                    False,
                    CommandResult.INTERNAL_ERROR,
                    f"on_recipe returned {type(returned).__name__}, not RecipeResult",
                )
        except Exception as exc:
            log.exception("on_recipe(%d) failed", recipe_id)
            result = RecipeResult(False, CommandResult.INTERNAL_ERROR, str(exc))
        self._apply(self.core.recipe_finished(recipe_id, result))

    def _timer(self) -> None:
        while self._running:
            self._apply(self.core.tick())
            wait_s = min(max(self.core.next_wakeup() - time.monotonic(), 0.0005), 0.05)
            with self._timer_cv:
                if self._running and not self._timer_dirty:
                    self._timer_cv.wait(wait_s)
                self._timer_dirty = False

    def _publisher(self) -> None:
        while True:
            ev = self._event_q.get()
            if not isinstance(ev, EventSpec):
                return
            try:
                self._events.publish(
                    StatusEvent(
                        kind=f"plc.{ev.kind}",
                        source=SOURCE,
                        severity=ev.severity,
                        message=ev.message,
                        data=dict(ev.data),
                    )
                )
            except Exception:
                log.exception("publishing %s failed", ev.kind)
