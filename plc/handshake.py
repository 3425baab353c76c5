"""The handshake state machine: control edges in, status/result registers out.

Transport-free and synchronous: the Modbus server (server mode) or the PLC
poller (client mode) feed it control words, the app feeds it verdicts and
health, a timer thread calls :meth:`Handshake.tick`. Every method takes the
lock, mutates state, re-renders the register image and returns
:class:`Effects` (triggers to dispatch, a recipe to run, events to publish)
that the caller carries out *after* the lock is released, so nothing slow
ever runs under it or on the Modbus event loop.

Rules enforced here (see docs/plc.md):

* every TRIGGER rising edge yields exactly one result for its part id: the
  verdict, or an ERROR (deadline, not ready, duplicate id); never OK by default;
* a verdict for a part that is no longer waiting (deadline passed, unknown id,
  frame older than the trigger) is dropped and counted, never reported;
* results wait in a FIFO of ``result_buffer_depth``; READY drops while every
  slot is taken by an unacknowledged result or a part in flight, so an
  accepted part always has room for its result; a result that still does not
  fit (an ERROR for a trigger sent while not ready) is dropped, counted and
  latches OVERRUN (never overwrites an older one);
* a recipe change waits until no part is in flight, READY stays 0 meanwhile.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge.types import Severity, Verdict, VerdictCode
from plc.config import PlcConfig
from plc.registers import (
    CONTROL_BITS_MASK,
    MAP_SIZE,
    MAP_VERSION,
    CommandResult,
    ControlBit,
    ControlBlock,
    FaultCode,
    ResultBlock,
    ResultError,
    StatusBit,
    StatusBlock,
    encode,
    join_u32,
    parse_version,
    scale_score,
)

log = logging.getLogger(__name__)
audit = logging.getLogger("plc.audit")
"""Every control write, with the client address (INFO), and refused ones (WARNING)."""

ILLEGAL_ADDRESS = 0x02
"""Modbus exception code ILLEGAL DATA ADDRESS."""
ILLEGAL_VALUE = 0x03
"""Modbus exception code ILLEGAL DATA VALUE."""

# Plain ints for the hot path (IntFlag arithmetic is ~10x slower than int arithmetic).
_TRIGGER = int(ControlBit.TRIGGER)
_RESULT_ACK = int(ControlBit.RESULT_ACK)
_RECIPE_EXECUTE = int(ControlBit.RECIPE_EXECUTE)
_SET_OFFLINE = int(ControlBit.SET_OFFLINE)
_FAULT_RESET = int(ControlBit.FAULT_RESET)
_ONLINE = int(StatusBit.ONLINE)
_READY = int(StatusBit.READY)
_BUSY = int(StatusBit.BUSY)
_TRIGGER_ACK = int(StatusBit.TRIGGER_ACK)
_RESULT_VALID = int(StatusBit.RESULT_VALID)
_FAULT = int(StatusBit.FAULT)
_OVERRUN = int(StatusBit.OVERRUN)
_CMD_BUSY = int(StatusBit.CMD_BUSY)
_CMD_DONE = int(StatusBit.CMD_DONE)
_CMD_FAILED = int(StatusBit.CMD_FAILED)
_PIPELINE_OK = int(StatusBit.PIPELINE_OK)
_EMPTY_RESULT = [0] * ResultBlock.SIZE
_RESERVED = [0] * (StatusBlock.START - ControlBlock.SIZE)


@dataclass(frozen=True, slots=True)
class RecipeResult:
    """What the app's recipe handler reports back for a recipe change."""

    ok: bool
    """True when the new model package / settings are in force."""
    reason: CommandResult = CommandResult.OK
    """Why it failed (UNKNOWN_RECIPE, LOAD_FAILED...); OK when ``ok``."""
    message: str = ""
    """Human detail for the event and the log."""


@dataclass(frozen=True, slots=True)
class EventSpec:
    """A status event to publish (kind without the ``plc.`` prefix added later)."""

    kind: str
    message: str
    severity: Severity = Severity.INFO
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Effects:
    """What the caller must do once the lock is released."""

    triggers: list[int] = field(default_factory=list)
    """Part ids to hand to on_trigger, in order."""
    recipe: int | None = None
    """A recipe id to hand to on_recipe."""
    events: list[EventSpec] = field(default_factory=list)
    wake_timer: bool = False
    """A new deadline exists: the timer should recompute its wake-up."""


@dataclass(slots=True)
class _Pending:
    part_id: int
    trigger_time: float
    deadline: float
    recipe_id: int


@dataclass(slots=True)
class Counters:
    """Monotonic counters since start (exposed by status())."""

    triggers: int = 0
    results: int = 0
    ok: int = 0
    ng: int = 0
    error: int = 0
    acknowledged: int = 0
    missed_triggers: int = 0
    duplicate_part_ids: int = 0
    deadline_misses: int = 0
    late_verdicts: int = 0
    overruns: int = 0
    control_writes: int = 0
    illegal_writes: int = 0
    recipe_changes: int = 0
    recipe_failures: int = 0


class Handshake:
    """State of the PLC handshake and the register image it renders."""

    def __init__(
        self,
        cfg: PlcConfig,
        *,
        recipes_supported: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = cfg
        self._recipes_supported = recipes_supported
        self._clock = clock
        self._lock = threading.Lock()
        self._words = [0] * MAP_SIZE
        self.version = 0
        """+1 each time the status/result words change (client mode writes on change)."""
        self.counters = Counters()
        self._ctrl = [0] * ControlBlock.SIZE
        self._running = False
        self._started_at = 0.0
        self._offline_requested = False
        self._app_ready = True
        self._app_fault = 0
        self._app_fault_message = ""
        self._last_ok: float | None = None
        self._stalled = False
        self._heartbeat = 0
        self._next_beat = 0.0
        self._trigger_ack = False
        self._trigger_part_id = 0
        self._last_trigger: dict[str, Any] | None = None
        self._pending: dict[int, _Pending] = {}
        self._buffer: collections.deque[ResultBlock] = collections.deque()
        self._buffer_words: collections.deque[list[int]] = collections.deque()
        """The encoded words of each buffered result (encoded once, when it is queued)."""
        self._presented = False
        self._overrun = False
        self._active_recipe = 0
        self._cmd_state = "idle"  # idle | waiting | executing
        self._cmd_recipe = 0
        self._cmd_result = CommandResult.NONE
        self._cmd_done = False
        self._cmd_failed = False
        self._recipe_deadline = 0.0
        self._handler_busy = 0
        """Recipe id whose handler has not returned yet (0 = none), even after a timeout."""
        self._fault_reported = 0
        self._render()

    # ------------------------------------------------------------------ life
    def start(self) -> Effects:
        """The service is up: ONLINE (unless the PLC holds SET_OFFLINE)."""
        with self._lock:
            now = self._clock()
            self._running = True
            self._started_at = now
            self._next_beat = now + self._cfg.heartbeat_period_ms / 1000
            fx = Effects()
            self._update_fault(now, fx)
            self._render()
            return fx

    def stop(self) -> None:
        """The service stops: ONLINE and READY drop."""
        with self._lock:
            self._running = False
            self._render()

    # ----------------------------------------------------------- registers
    def read(self, offset: int, count: int) -> list[int] | int:
        """Words ``offset..offset+count`` of the map, or an exception code."""
        if offset < 0 or count < 1 or offset + count > MAP_SIZE:
            return ILLEGAL_ADDRESS
        with self._lock:
            return self._words[offset : offset + count]

    def snapshot(self) -> tuple[int, list[int]]:
        """(version, status+result words) for client mode to write into the PLC."""
        with self._lock:
            return self.version, self._words[StatusBlock.START : MAP_SIZE]

    def write(self, offset: int, values: Sequence[int], client: str) -> tuple[int | None, Effects]:
        """A PLC write to the map (server mode): (exception code or None, effects)."""
        fx = Effects()
        end = offset + len(values)
        if offset < 0 or not values or end > ControlBlock.SIZE:
            with self._lock:
                self.counters.illegal_writes += 1
            audit.warning(
                "REFUSED write from %s at offset %d (%d words): not the control "
                "block (offsets 0-%d) -> ILLEGAL DATA ADDRESS",
                client,
                offset,
                len(values),
                ControlBlock.SIZE - 1,
            )
            fx.events.append(
                EventSpec(
                    "illegal_write",
                    f"write from {client} at offset {offset} refused: read-only address",
                    Severity.WARNING,
                    {
                        "client": client,
                        "offset": offset,
                        "count": len(values),
                        "exception": "ILLEGAL_ADDRESS",
                    },
                )
            )
            return ILLEGAL_ADDRESS, fx
        with self._lock:
            new = list(self._ctrl)
            new[offset:end] = [int(v) for v in values]
            problem = self._validate(new)
            if problem:
                self.counters.illegal_writes += 1
                audit.warning(
                    "REFUSED write from %s at offset %d values %s: %s -> ILLEGAL DATA VALUE",
                    client,
                    offset,
                    list(values),
                    problem,
                )
                fx.events.append(
                    EventSpec(
                        "illegal_write",
                        f"write from {client} refused: {problem}",
                        Severity.WARNING,
                        {
                            "client": client,
                            "offset": offset,
                            "values": list(values),
                            "exception": "ILLEGAL_VALUE",
                        },
                    )
                )
                return ILLEGAL_VALUE, fx
            self.counters.control_writes += 1
            audit.info("control write from %s: offset %d values %s", client, offset, list(values))
            self._apply_control(new, client, fx)
            return None, fx

    def apply_control_image(self, words: Sequence[int], client: str) -> Effects:
        """Client mode: the control block as just read from the PLC."""
        fx = Effects()
        with self._lock:
            new = [int(v) for v in words[: ControlBlock.SIZE]]
            if new == self._ctrl:
                return fx
            problem = self._validate(new)
            if problem:
                self.counters.illegal_writes += 1
                audit.warning("IGNORED control block from %s %s: %s", client, new, problem)
                fx.events.append(
                    EventSpec(
                        "illegal_write",
                        f"control block from {client} ignored: {problem}",
                        Severity.WARNING,
                        {"client": client, "values": new},
                    )
                )
                return fx
            self.counters.control_writes += 1
            audit.info("control block from %s: %s", client, new)
            self._apply_control(new, client, fx)
            return fx

    def _validate(self, ctrl: Sequence[int]) -> str:
        if ctrl[0] & ~CONTROL_BITS_MASK & 0xFFFF:
            return (
                f"control word 0x{ctrl[0]:04X} sets reserved bits (allowed mask "
                f"0x{CONTROL_BITS_MASK:04X})"
            )
        if ctrl[3] > self._cfg.recipe_id_max:
            return f"recipe id {ctrl[3]} above recipe_id_max {self._cfg.recipe_id_max}"
        return ""

    # ------------------------------------------------------------ control
    def _apply_control(self, new: list[int], client: str, fx: Effects) -> None:
        now = self._clock()
        old_word = self._ctrl[0]
        self._ctrl = new
        word = new[0]
        rising = word & ~old_word
        falling = old_word & ~word
        if (rising | falling) & _SET_OFFLINE:
            self._offline_requested = bool(word & _SET_OFFLINE)
            kind = "offline" if self._offline_requested else "online"
            fx.events.append(
                EventSpec(
                    kind,
                    f"PLC {client} set the appliance {kind}",
                    Severity.WARNING if self._offline_requested else Severity.INFO,
                    {"client": client},
                )
            )
        if rising & _FAULT_RESET:
            self._overrun = False
            if self._cmd_state == "idle":
                self._cmd_done = self._cmd_failed = False
            fx.events.append(
                EventSpec(
                    "fault_reset", f"PLC {client} reset latched flags", data={"client": client}
                )
            )
        if falling & _TRIGGER:
            self._trigger_ack = False
        if rising & _TRIGGER:
            part_id = join_u32(new[1], new[2], self._cfg.word_order)
            self._trigger(part_id, now, client, fx)
        if rising & _RESULT_ACK:
            if self._presented and self._buffer:
                self._buffer.popleft()
                self._buffer_words.popleft()
                self._presented = False
                self.counters.acknowledged += 1
            else:
                log.info("RESULT_ACK from %s with no result presented: ignored", client)
        if falling & _RESULT_ACK:
            self._present()
        if rising & _RECIPE_EXECUTE:
            self._recipe_command(new[3], client, fx)
        self._update_fault(now, fx)
        self._render()

    def _ready(self, now: float) -> bool:
        return (
            self._running
            and not self._offline_requested
            and self._fault_code(now) == 0
            and self._app_ready
            and self._pipeline_ok(now)
            and self._cmd_state == "idle"
            and len(self._pending) < self._cfg.max_parts_in_flight
            and len(self._pending) + len(self._buffer) < self._cfg.result_buffer_depth
        )

    def _not_ready_reason(self, now: float) -> str:
        if not self._running:
            return "service stopped"
        if self._offline_requested:
            return "offline (SET_OFFLINE)"
        if self._fault_code(now):
            return f"fault {self._fault_code(now)}"
        if not self._app_ready:
            return "pipeline not ready"
        if not self._pipeline_ok(now):
            return "pipeline heartbeat missing"
        if self._cmd_state != "idle":
            return "recipe change in progress"
        if len(self._pending) >= self._cfg.max_parts_in_flight:
            return f"{len(self._pending)} parts in flight (max {self._cfg.max_parts_in_flight})"
        return (
            f"result buffer full: {len(self._buffer)} unacknowledged + {len(self._pending)} "
            f"in flight (depth {self._cfg.result_buffer_depth})"
        )

    def _trigger(self, part_id: int, now: float, client: str, fx: Effects) -> None:
        self.counters.triggers += 1
        self._trigger_ack = True
        self._trigger_part_id = part_id
        self._last_trigger = {"part_id": part_id, "time_unix": time.time(), "client": client}
        if part_id in self._pending:
            self.counters.duplicate_part_ids += 1
            self.counters.missed_triggers += 1
            fx.events.append(
                EventSpec(
                    "missed_trigger",
                    f"part {part_id} triggered again while still in flight: ERROR result",
                    Severity.WARNING,
                    {"part_id": part_id, "reason": "duplicate part id"},
                )
            )
            self._push(self._error_result(part_id, ResultError.DUPLICATE_PART_ID, 0), fx)
            return
        if not self._ready(now):
            reason = self._not_ready_reason(now)
            self.counters.missed_triggers += 1
            fx.events.append(
                EventSpec(
                    "missed_trigger",
                    f"part {part_id} triggered while not ready ({reason}): ERROR result",
                    Severity.WARNING,
                    {"part_id": part_id, "reason": reason},
                )
            )
            self._push(self._error_result(part_id, ResultError.NOT_READY, 0), fx)
            return
        deadline = now + self._cfg.verdict_deadline_ms / 1000
        self._pending[part_id] = _Pending(part_id, now, deadline, self._active_recipe)
        fx.triggers.append(part_id)
        fx.wake_timer = True
        if self._cfg.trigger_events:
            fx.events.append(
                EventSpec(
                    "trigger",
                    f"part {part_id} triggered",
                    data={"part_id": part_id, "client": client},
                )
            )

    def _recipe_command(self, recipe_id: int, client: str, fx: Effects) -> None:
        if self._cmd_state == "idle" and self._handler_busy:
            # the previous change timed out but its handler still runs: refuse visibly
            self._cmd_recipe = recipe_id
            self._cmd_done, self._cmd_failed = False, True
            self._cmd_result = CommandResult.REJECTED_BUSY
            self.counters.recipe_failures += 1
            fx.events.append(
                EventSpec(
                    "recipe",
                    f"recipe {recipe_id} from {client} rejected: the handler of recipe "
                    f"{self._handler_busy} has still not returned (timed out)",
                    Severity.ERROR,
                    {
                        "recipe_id": recipe_id,
                        "state": "failed",
                        "reason": int(CommandResult.REJECTED_BUSY),
                    },
                )
            )
            return
        if self._cmd_state != "idle":
            fx.events.append(
                EventSpec(
                    "recipe",
                    f"recipe {recipe_id} from {client} rejected: "
                    f"recipe {self._cmd_recipe} still executing",
                    Severity.WARNING,
                    {
                        "recipe_id": recipe_id,
                        "state": "rejected",
                        "reason": int(CommandResult.REJECTED_BUSY),
                    },
                )
            )
            return
        self._cmd_done = self._cmd_failed = False
        self._cmd_recipe = recipe_id
        if not self._recipes_supported or recipe_id == 0:
            reason = (
                CommandResult.NOT_SUPPORTED
                if not self._recipes_supported
                else CommandResult.UNKNOWN_RECIPE
            )
            self._finish_recipe(recipe_id, RecipeResult(False, reason, reason.name.lower()), fx)
            return
        self._cmd_state = "waiting"
        self._cmd_result = CommandResult.NONE
        fx.events.append(
            EventSpec(
                "recipe",
                f"recipe {recipe_id} requested by {client}; "
                f"switching after {len(self._pending)} parts in flight",
                data={"recipe_id": recipe_id, "state": "busy"},
            )
        )
        self._maybe_run_recipe(fx)

    def _maybe_run_recipe(self, fx: Effects) -> None:
        if self._cmd_state == "waiting" and not self._pending:
            self._cmd_state = "executing"
            self._handler_busy = self._cmd_recipe
            self._recipe_deadline = self._clock() + self._cfg.recipe_timeout_ms / 1000
            fx.recipe = self._cmd_recipe
            fx.wake_timer = True

    def recipe_finished(self, recipe_id: int, result: RecipeResult) -> Effects:
        """The app's on_recipe returned (called by the service's recipe thread)."""
        fx = Effects()
        with self._lock:
            if self._handler_busy == recipe_id:
                self._handler_busy = 0
            if self._cmd_state == "executing" and self._cmd_recipe == recipe_id:
                self._finish_recipe(recipe_id, result, fx)
            else:
                self._late_recipe(recipe_id, result, fx)
            self._update_fault(self._clock(), fx)
            self._render()
        return fx

    def _late_recipe(self, recipe_id: int, result: RecipeResult, fx: Effects) -> None:
        """A handler returned after its timeout had already failed the command.

        The command result stays TIMEOUT (the PLC was told), but ACTIVE_RECIPE_ID
        follows the truth: if the handler did switch, the new recipe is in force.
        """
        if result.ok:
            self._active_recipe = recipe_id
            fx.events.append(
                EventSpec(
                    "recipe",
                    f"recipe {recipe_id} completed after its {self._cfg.recipe_timeout_ms} ms "
                    "timeout: it is now active although the command was reported failed",
                    Severity.ERROR,
                    {"recipe_id": recipe_id, "state": "late_completed"},
                )
            )
        else:
            fx.events.append(
                EventSpec(
                    "recipe",
                    f"recipe {recipe_id} handler returned after its timeout: "
                    f"{result.reason.name} ({result.message}); recipe "
                    f"{self._active_recipe} stays active",
                    Severity.WARNING,
                    {"recipe_id": recipe_id, "state": "late_failed", "reason": int(result.reason)},
                )
            )

    def _recipe_timeout(self, now: float, fx: Effects) -> None:
        if self._cmd_state != "executing" or now < self._recipe_deadline:
            return
        recipe_id = self._cmd_recipe
        log.error(
            "recipe %d: handler did not return within %d ms; CMD_FAILED (TIMEOUT), "
            "recipe %d stays active",
            recipe_id,
            self._cfg.recipe_timeout_ms,
            self._active_recipe,
        )
        self._finish_recipe(
            recipe_id,
            RecipeResult(
                False,
                CommandResult.TIMEOUT,
                f"no answer from the recipe handler within {self._cfg.recipe_timeout_ms} ms",
            ),
            fx,
        )

    def _finish_recipe(self, recipe_id: int, result: RecipeResult, fx: Effects) -> None:
        self._cmd_state = "idle"
        if result.ok:
            self._active_recipe = recipe_id
            self._cmd_done, self._cmd_failed = True, False
            self._cmd_result = CommandResult.OK
            self.counters.recipe_changes += 1
            fx.events.append(
                EventSpec(
                    "recipe",
                    f"recipe {recipe_id} active"
                    + (f": {result.message}" if result.message else ""),
                    data={"recipe_id": recipe_id, "state": "completed"},
                )
            )
        else:
            reason = (
                result.reason if result.reason != CommandResult.OK else CommandResult.LOAD_FAILED
            )
            self._cmd_done, self._cmd_failed = False, True
            self._cmd_result = reason
            self.counters.recipe_failures += 1
            fx.events.append(
                EventSpec(
                    "recipe",
                    f"recipe {recipe_id} failed: {reason.name}"
                    + (f" ({result.message})" if result.message else ""),
                    Severity.ERROR,
                    {"recipe_id": recipe_id, "state": "failed", "reason": int(reason)},
                )
            )

    # ------------------------------------------------------------ results
    def add_verdict(self, verdict: Verdict) -> Effects:
        """A verdict from the pipeline; becomes the result of its waiting part."""
        fx = Effects()
        part_id = verdict.trigger_id
        if part_id is None:
            return fx
        with self._lock:
            now = self._clock()
            pending = self._pending.get(part_id)
            stale = (
                pending is not None
                and verdict.capture_time > 0.0
                and verdict.capture_time < pending.trigger_time
            )
            if pending is None or stale:
                self.counters.late_verdicts += 1
                why = (
                    "frame older than the trigger"
                    if stale
                    else "no part waiting with this id (deadline passed or never triggered)"
                )
                fx.events.append(
                    EventSpec(
                        "late_verdict",
                        f"verdict for part {part_id} dropped: {why}",
                        Severity.WARNING,
                        {
                            "part_id": part_id,
                            "inspection_id": verdict.inspection_id,
                            "code": verdict.code.name,
                        },
                    )
                )
                return fx
            del self._pending[part_id]
            self._push(self._verdict_result(verdict, pending, now), fx)
            self._maybe_run_recipe(fx)
            self._render()
        return fx

    def _verdict_result(self, v: Verdict, p: _Pending, now: float) -> ResultBlock:
        major, minor, patch = parse_version(v.model_version)
        regions = v.regions
        if v.code is VerdictCode.NG:
            name = v.defect_class or (regions[0].defect_class if regions else "anomaly")
            classes = self._cfg.defect_classes
            defect_class = classes.index(name) + 1 if name in classes else 0xFFFF
        else:
            defect_class = 0
        return ResultBlock(
            inspection_id=v.inspection_id & 0xFFFFFFFF,
            part_id=p.part_id,
            verdict=int(v.code),
            error_code=int(
                ResultError.PIPELINE if v.code is VerdictCode.ERROR else ResultError.NONE
            ),
            defect_class=defect_class,
            defect_count=min(len(regions), 0xFFFF),
            largest_defect_area_px=min(max((r.area_px for r in regions), default=0), 0xFFFFFFFF),
            score=scale_score(v.score, self._cfg.score_scale),
            threshold=scale_score(v.threshold, self._cfg.score_scale),
            latency_ms=min(round((now - p.trigger_time) * 1000), 0xFFFF),
            recipe_id=p.recipe_id,
            model_version_major=major,
            model_version_minor=minor,
            model_version_patch=patch,
        )

    def _error_result(self, part_id: int, why: ResultError, latency_ms: int) -> ResultBlock:
        return ResultBlock(
            part_id=part_id,
            verdict=int(VerdictCode.ERROR),
            error_code=int(why),
            score=scale_score(None, 1),
            latency_ms=min(latency_ms, 0xFFFF),
            recipe_id=self._active_recipe,
        )

    def _push(self, result: ResultBlock, fx: Effects) -> None:
        code = VerdictCode(result.verdict)
        if len(self._buffer) >= self._cfg.result_buffer_depth:
            self.counters.overruns += 1
            self._overrun = True
            fx.events.append(
                EventSpec(
                    "overrun",
                    f"result buffer full "
                    f"({self._cfg.result_buffer_depth}): result "
                    f"{code.name} for part {result.part_id} dropped",
                    Severity.WARNING,
                    {
                        "part_id": result.part_id,
                        "verdict": code.name,
                        "overrun_count": self.counters.overruns,
                    },
                )
            )
            return
        self.counters.results += 1
        if code is VerdictCode.OK:
            self.counters.ok += 1
        elif code is VerdictCode.NG:
            self.counters.ng += 1
        else:
            self.counters.error += 1
        self._buffer.append(result)
        self._buffer_words.append(encode(result, self._cfg.word_order))
        self._present()

    def _present(self) -> None:
        if not self._presented and self._buffer and not self._ctrl[0] & _RESULT_ACK:
            self._presented = True

    # --------------------------------------------------------------- timer
    def tick(self) -> Effects:
        """Deadlines, heartbeat and watchdog; the service calls this from its timer."""
        fx = Effects()
        with self._lock:
            now = self._clock()
            expired = [p for p in self._pending.values() if p.deadline <= now]
            for p in expired:
                del self._pending[p.part_id]
                self.counters.deadline_misses += 1
                latency = round((now - p.trigger_time) * 1000)
                fx.events.append(
                    EventSpec(
                        "deadline_miss",
                        f"no verdict for part {p.part_id} "
                        f"within {self._cfg.verdict_deadline_ms} ms: ERROR "
                        "result",
                        Severity.WARNING,
                        {"part_id": p.part_id, "latency_ms": latency},
                    )
                )
                self._push(self._error_result(p.part_id, ResultError.DEADLINE, latency), fx)
            if expired:
                self._maybe_run_recipe(fx)
            self._recipe_timeout(now, fx)
            period = self._cfg.heartbeat_period_ms / 1000
            if self._running and now >= self._next_beat:
                if self._pipeline_ok(now):
                    self._heartbeat = (self._heartbeat + 1) & 0xFFFF
                self._next_beat += period
                if self._next_beat <= now:  # we slept through periods: resynchronise
                    self._next_beat = now + period
            self._update_fault(now, fx)
            self._render()
        return fx

    def next_wakeup(self) -> float:
        """Monotonic time of the next deadline or heartbeat."""
        with self._lock:
            nxt = self._next_beat
            for p in self._pending.values():
                nxt = min(nxt, p.deadline)
            if self._cmd_state == "executing":
                nxt = min(nxt, self._recipe_deadline)
            return nxt

    # -------------------------------------------------------------- health
    def heartbeat_ok(self) -> Effects:
        """The pipeline is healthy right now."""
        fx = Effects()
        with self._lock:
            now = self._clock()
            was_ok = self._pipeline_ok(now)
            self._last_ok = now
            if not was_ok:
                self._update_fault(now, fx)
                self._render()
        return fx

    def set_health(self, *, ready: bool, fault_code: int, message: str) -> Effects:
        """The app's view of its own health (camera, backend, store...)."""
        fx = Effects()
        with self._lock:
            self._app_ready = ready
            self._app_fault = int(fault_code) & 0xFFFF
            self._app_fault_message = message
            self._update_fault(self._clock(), fx)
            self._render()
        return fx

    def _pipeline_ok(self, now: float) -> bool:
        return (
            self._last_ok is not None
            and now - self._last_ok <= self._cfg.heartbeat_timeout_ms / 1000
        )

    def _fault_code(self, now: float) -> int:
        if self._app_fault:
            return self._app_fault
        if self._running and self._is_stalled(now):
            return int(FaultCode.PIPELINE_STALLED)
        return 0

    def _is_stalled(self, now: float) -> bool:
        timeout = self._cfg.heartbeat_timeout_ms / 1000
        since = self._last_ok if self._last_ok is not None else self._started_at
        return now - since > timeout

    def _update_fault(self, now: float, fx: Effects) -> None:
        code = self._fault_code(now)
        if code == self._fault_reported:
            return
        if code:
            name = FaultCode(code).name if code in FaultCode._value2member_map_ else str(code)
            why = (
                self._app_fault_message
                if self._app_fault
                else f"no heartbeat_ok() for {self._cfg.heartbeat_timeout_ms} ms"
            )
            fx.events.append(
                EventSpec(
                    "fault",
                    f"fault {code} ({name}): {why}",
                    Severity.ERROR,
                    {"fault_code": code, "message": why},
                )
            )
        else:
            fx.events.append(
                EventSpec(
                    "fault_cleared", f"fault {self._fault_reported} cleared", data={"fault_code": 0}
                )
            )
        self._fault_reported = code

    # -------------------------------------------------------------- render
    def _status_word(self, now: float) -> int:
        bits = 0
        if self._running and not self._offline_requested:
            bits |= _ONLINE
        if self._ready(now):
            bits |= _READY
        if self._pending:
            bits |= _BUSY
        if self._trigger_ack:
            bits |= _TRIGGER_ACK
        if self._presented:
            bits |= _RESULT_VALID
        if self._fault_code(now):
            bits |= _FAULT
        if self._overrun:
            bits |= _OVERRUN
        if self._cmd_state != "idle":
            bits |= _CMD_BUSY
        if self._cmd_done:
            bits |= _CMD_DONE
        if self._cmd_failed:
            bits |= _CMD_FAILED
        if self._pipeline_ok(now):
            bits |= _PIPELINE_OK
        return bits

    def _render(self) -> None:
        """Re-render the register image: the status block, and the presented result's
        words (encoded once when the result was queued, not on every render)."""
        now = self._clock()
        c = self.counters
        status = StatusBlock(
            status=self._status_word(now),
            fault_code=self._fault_code(now),
            heartbeat=self._heartbeat,
            active_recipe_id=self._active_recipe,
            command_result=int(self._cmd_result),
            results_queued=len(self._buffer),
            trigger_part_id=self._trigger_part_id,
            missed_triggers=c.missed_triggers,
            overrun_count=c.overruns,
            deadline_misses=c.deadline_misses,
            map_version=MAP_VERSION,
            in_flight=len(self._pending),
        )
        result = self._buffer_words[0] if self._presented else _EMPTY_RESULT
        words = self._ctrl + _RESERVED + encode(status, self._cfg.word_order) + result
        if words != self._words:
            self._words = words
            self.version += 1

    # -------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        """Plain-data view for the panel and telemetry."""
        with self._lock:
            now = self._clock()
            word = self._status_word(now)
            return {
                "online": bool(word & StatusBit.ONLINE),
                "ready": bool(word & StatusBit.READY),
                "busy": bool(word & StatusBit.BUSY),
                "result_valid": bool(word & StatusBit.RESULT_VALID),
                "fault": bool(word & StatusBit.FAULT),
                "fault_code": self._fault_code(now),
                "fault_message": self._app_fault_message
                if self._app_fault
                else ("pipeline heartbeat missing" if self._fault_code(now) else ""),
                "overrun": self._overrun,
                "pipeline_ok": self._pipeline_ok(now),
                "heartbeat": self._heartbeat,
                "in_flight": len(self._pending),
                "results_queued": len(self._buffer),
                "active_recipe_id": self._active_recipe,
                "recipe_state": self._cmd_state,
                "recipe_handler_running": self._handler_busy,
                "command_result": self._cmd_result.name,
                "last_trigger": dict(self._last_trigger) if self._last_trigger else None,
                "counters": {
                    k: getattr(self.counters, k) for k in self.counters.__dataclass_fields__
                },
            }
