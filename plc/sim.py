"""Line simulator: plays the PLC against a running appliance.

It triggers parts at a set rate with unique part ids, follows the handshake
exactly as docs/plc.md describes it (one Modbus read of status+result per
scan, at most one write), checks every echoed part id and measures
trigger-to-RESULT_VALID latency.

* ``mode="server"``: the appliance is the Modbus server; the simulator
  connects to ``host:port`` as the PLC would.
* ``mode="client"``: the appliance is the Modbus client; the simulator runs a
  Modbus server on ``host:port`` holding the PLC's registers and waits for the
  appliance to connect.

Library use (the demo runs it in-process)::

    report = run_line(SimSettings(port=5020, ppm=600, parts=200))
    print(report.table())

or in the background: ``sim = LineSimulator(settings); sim.start(); ...;
report = sim.join()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from plc.registers import (
    MAP_SIZE,
    MAP_VERSION,
    ControlBit,
    ControlBlock,
    ResultBlock,
    ResultError,
    StatusBit,
    StatusBlock,
    WordOrder,
    decode,
    split_u32,
)


@dataclass(frozen=True, slots=True)
class SimSettings:
    """How the simulated line behaves."""

    host: str = "127.0.0.1"
    port: int = 5020
    mode: Literal["server", "client"] = "server"
    """Which mode the *appliance* runs in (see module docstring)."""
    ppm: float = 600.0
    """Parts per minute the line delivers. Triggers follow this schedule but never come
    closer than 0.9 periods (a conveyor does not deliver a burst after a stall)."""
    parts: int = 100
    poll_interval_ms: float = 2.0
    """PLC scan time: one status+result read (and at most one write) per scan."""
    word_order: WordOrder = "high_first"
    base_address: int = 0
    unit_id: int = 1
    first_part_id: int = 1
    late_ms: float = 500.0
    """A result observed later than this after its trigger counts as late."""
    result_timeout_s: float = 5.0
    """After the last trigger, how long to wait for outstanding results (then: lost)."""
    connect_timeout_s: float = 10.0
    """How long to wait for the appliance (connection, first status, READY)."""
    respect_ready: bool = False
    """True: hold a due trigger until READY=1 (a PLC that stops the line). False: trigger on
    schedule like a moving conveyor; triggers while not ready come back as ERROR results."""


@dataclass(frozen=True, slots=True)
class SimReport:
    """What the simulator saw. Latencies are trigger write -> RESULT_VALID observed."""

    mode: str
    ppm_target: float
    parts: int
    """Triggers issued."""
    results: int
    """Results received for parts this run triggered (first one per part)."""
    ok: int
    ng: int
    error_results: int
    missed: int
    """ERROR results for triggers the appliance could not accept (not ready / duplicate)."""
    deadline_errors: int
    """ERROR results because the appliance's verdict deadline passed."""
    lost: int
    """Triggered parts that never got a result."""
    late: int
    """Results observed more than late_ms after their trigger."""
    mismatched: int
    """Results whose echoed part id this run never triggered."""
    duplicated: int
    """Second results for a part that already had one."""
    unacked_triggers: int
    """Triggers whose TRIGGER_ACK (with the right part id) never came."""
    parts_per_s: float
    duration_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    appliance_overruns: int
    """Increase of the appliance's OVERRUN_COUNT during the run."""
    appliance_missed_triggers: int
    """Increase of the appliance's MISSED_TRIGGERS during the run."""
    comm_errors: int = 0
    """Requests that got no answer (timeout, closed socket); the simulator reconnected."""
    stale_results_drained: int = 0
    """Results left from an earlier run, acknowledged before the first trigger."""
    appliance_p99_ms: float = math.nan
    """p99 of the appliance's own trigger -> verdict time (result LATENCY_MS register)."""
    handshake_p50_ms: float = math.nan
    """p50 of (observed latency - appliance LATENCY_MS): Modbus, polling and result queueing."""
    handshake_p99_ms: float = math.nan
    scans: int = 0
    """PLC scans (one status+result read each) made during the run."""
    scan_mean_ms: float = math.nan
    """The simulator's own scan period, start to start: mean (compare with poll_ms) ..."""
    scan_p50_ms: float = math.nan
    """... and its spread (poll jitter; asyncio sleeps have 1 ms granularity on Linux)."""
    scan_p99_ms: float = math.nan
    scan_max_ms: float = math.nan
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, *, with_latencies: bool = False) -> dict[str, Any]:
        """Plain data (JSON); every single latency only when asked."""
        data = asdict(self)
        if not with_latencies:
            data.pop("latencies_ms")
        return data

    @property
    def clean(self) -> bool:
        """No lost, mismatched, duplicated or ERROR results."""
        return not (self.lost or self.mismatched or self.duplicated or self.error_results)

    def table(self) -> str:
        """The report as an aligned two-column text table."""
        rows = [
            ("mode", self.mode),
            ("parts triggered", self.parts),
            (
                "rate (target / actual)",
                f"{self.ppm_target / 60:.1f} / {self.parts_per_s:.1f} parts/s",
            ),
            ("results OK / NG / ERROR", f"{self.ok} / {self.ng} / {self.error_results}"),
            ("missed (not ready)", self.missed),
            ("deadline ERRORs", self.deadline_errors),
            ("lost", self.lost),
            ("late", self.late),
            ("mismatched ids", self.mismatched),
            ("duplicated", self.duplicated),
            ("unacknowledged triggers", self.unacked_triggers),
            (
                "latency p50 / p95 / p99 / max",
                f"{self.p50_ms:.1f} / {self.p95_ms:.1f} / {self.p99_ms:.1f} / {self.max_ms:.1f} ms",
            ),
            ("appliance trigger->verdict p99", f"{self.appliance_p99_ms:.1f} ms"),
            (
                "handshake overhead p50 / p99",
                f"{self.handshake_p50_ms:.1f} / {self.handshake_p99_ms:.1f} ms",
            ),
            (
                "simulator scan mean / p50 / p99 / max",
                f"{self.scan_mean_ms:.2f} / {self.scan_p50_ms:.2f} / {self.scan_p99_ms:.2f} / "
                f"{self.scan_max_ms:.2f} ms ({self.scans} scans)",
            ),
            ("appliance overruns", self.appliance_overruns),
            ("communication errors", self.comm_errors),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class SimulatorError(Exception):
    """The simulator could not reach / serve the appliance."""


def _comm_errors() -> tuple[type[BaseException], ...]:
    from pymodbus.exceptions import ConnectionException, ModbusIOException

    return (ModbusIOException, ConnectionException, OSError, TimeoutError)


COMM_ERRORS = _comm_errors()
"""Errors a PLC survives by reconnecting (no answer, connection lost)."""


class _Io(Protocol):
    async def open(self) -> None: ...
    async def read(self, offset: int, count: int) -> list[int]: ...
    async def write(self, offset: int, values: list[int]) -> None: ...
    async def close(self) -> None: ...
    async def reopen(self) -> None: ...


class _AsClient:
    """The appliance is the server: talk to it as a Modbus TCP client."""

    def __init__(self, s: SimSettings) -> None:
        from pymodbus.client import AsyncModbusTcpClient

        self._s = s
        self._client = AsyncModbusTcpClient(
            s.host, port=s.port, timeout=2.0, retries=0, reconnect_delay=0
        )

    async def open(self) -> None:
        give_up = time.monotonic() + self._s.connect_timeout_s
        while not await self._client.connect():
            if time.monotonic() >= give_up:
                raise SimulatorError(
                    f"cannot connect to the appliance at {self._s.host}:"
                    f"{self._s.port} (is `lineinspect run/demo` serving Modbus?)"
                )
            self._client.close()
            await asyncio.sleep(0.2)

    async def read(self, offset: int, count: int) -> list[int]:
        rr = await self._client.read_holding_registers(
            self._s.base_address + offset, count=count, device_id=self._s.unit_id
        )
        if rr.isError():
            raise SimulatorError(f"read at {offset} refused: {rr}")
        return list(rr.registers)

    async def write(self, offset: int, values: list[int]) -> None:
        addr = self._s.base_address + offset
        if len(values) == 1:
            wr = await self._client.write_register(addr, values[0], device_id=self._s.unit_id)
        else:
            wr = await self._client.write_registers(addr, values, device_id=self._s.unit_id)
        if wr.isError():
            raise SimulatorError(f"write at {offset} refused: {wr}")

    async def close(self) -> None:
        self._client.close()

    async def reopen(self) -> None:
        self._client.close()
        await self.open()


class _AsServer:
    """The appliance is the client: hold the PLC's registers in a Modbus TCP server."""

    def __init__(self, s: SimSettings) -> None:
        self._s = s
        self._server: Any = None

    async def open(self) -> None:
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        device = SimDevice(
            id=0,
            simdata=[
                SimData(
                    address=self._s.base_address,
                    count=MAP_SIZE,
                    values=0,
                    datatype=DataType.REGISTERS,
                )
            ],
        )
        self._server = ModbusTcpServer(device, address=(self._s.host, self._s.port))
        try:
            await self._server.serve_forever(background=True)
        except RuntimeError as exc:
            raise SimulatorError(f"cannot listen on {self._s.host}:{self._s.port}: {exc}") from None

    async def read(self, offset: int, count: int) -> list[int]:
        res = await self._server.async_getValues(0, 3, self._s.base_address + offset, count)
        return [int(v) for v in res]

    async def write(self, offset: int, values: list[int]) -> None:
        await self._server.async_setValues(0, 16, self._s.base_address + offset, values)

    async def close(self) -> None:
        await self._server.shutdown()

    async def reopen(self) -> None:
        """Our own server: nothing to reconnect."""


async def run_line_async(settings: SimSettings, stop: asyncio.Event | None = None) -> SimReport:
    """Run one simulated line against the appliance; returns the report."""
    s = settings
    io: _Io = _AsClient(s) if s.mode == "server" else _AsServer(s)
    await io.open()
    try:
        return await _Line(s, io, stop).run()
    finally:
        await io.close()


def run_line(settings: SimSettings) -> SimReport:
    """Blocking :func:`run_line_async` in a fresh event loop."""
    return asyncio.run(run_line_async(settings))


class LineSimulator:
    """Run the simulator in a background thread (in-process demo, tests)."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._report: SimReport | None = None
        self._error: BaseException | None = None
        self._started = threading.Event()

    def start(self) -> None:
        """Start the run in a daemon thread (returns at once)."""
        self._thread = threading.Thread(target=self._run, name="plc-line-sim", daemon=True)
        self._thread.start()
        self._started.wait(5.0)

    def _run(self) -> None:
        async def main() -> SimReport:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._started.set()
            return await run_line_async(self.settings, self._stop)

        try:
            self._report = asyncio.run(main())
        except BaseException as exc:
            self._error = exc
        finally:
            self._started.set()

    def stop(self) -> None:
        """Stop triggering; outstanding parts still get result_timeout_s."""
        loop, ev = self._loop, self._stop
        if loop is not None and ev is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ev.set)

    def join(self, timeout_s: float | None = None) -> SimReport:
        """Wait for the run to end; re-raises its error."""
        assert self._thread is not None, "start() first"
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError("line simulator still running")
        if self._error is not None:
            raise self._error
        assert self._report is not None
        return self._report


_SR_COUNT = MAP_SIZE - StatusBlock.START


class _Line:
    def __init__(self, s: SimSettings, io: _Io, stop: asyncio.Event | None) -> None:
        self.s = s
        self.io = io
        self.stop = stop
        self.ctrl = 0
        self.outstanding: dict[int, float] = {}
        self.answered: set[int] = set()
        self.latencies: list[float] = []
        self.appliance_ms: list[float] = []
        self.handshake_ms: list[float] = []
        self.counts = {
            "ok": 0,
            "ng": 0,
            "error": 0,
            "missed": 0,
            "deadline": 0,
            "late": 0,
            "mismatched": 0,
            "duplicated": 0,
            "unacked": 0,
        }
        self.current_trigger: int | None = None
        self.current_trigger_t = 0.0
        self.stale_drained = 0
        self.comm_errors = 0
        self.first_comm_error = 0.0
        self.scan_ms: list[float] = []

    async def _read(self) -> tuple[StatusBlock, ResultBlock]:
        words = await self.io.read(StatusBlock.START, _SR_COUNT)
        status = decode(StatusBlock, words, self.s.word_order)
        result = decode(
            ResultBlock, words[ResultBlock.START - StatusBlock.START :], self.s.word_order
        )
        return status, result

    async def _wait_appliance(self) -> StatusBlock:
        deadline = time.monotonic() + self.s.connect_timeout_s
        status, _ = await self._read()
        while time.monotonic() < deadline:
            if status.map_version == MAP_VERSION and status.status & StatusBit.RESULT_VALID:
                # results left from an earlier run: acknowledge them before starting
                self.stale_drained += 1
                await self.io.write(ControlBlock.START, [int(ControlBit.RESULT_ACK)])
                while time.monotonic() < deadline:
                    status, _ = await self._read()
                    if not status.status & StatusBit.RESULT_VALID:
                        break
                    await asyncio.sleep(0.005)
                await self.io.write(ControlBlock.START, [0])
            elif status.map_version == MAP_VERSION and status.status & StatusBit.READY:
                return status
            await asyncio.sleep(0.02)
            status, _ = await self._read()
        if status.map_version != MAP_VERSION:
            raise SimulatorError(
                "the appliance never published its status block (map "
                f"version {status.map_version}, expected {MAP_VERSION})"
            )
        return status

    async def run(self) -> SimReport:
        s = self.s
        # Start from a clean control block (a PLC after power-up).
        await self.io.write(ControlBlock.START, [0, 0, 0])
        first = await self._wait_appliance()
        period = 60.0 / s.ppm
        interval = s.poll_interval_ms / 1000
        t0 = time.monotonic()
        next_idx = 0
        first_trigger = last_trigger = 0.0
        stopping = False
        end_by = math.inf
        status = first
        next_scan = time.monotonic()
        last_scan = 0.0
        while True:
            now = time.monotonic()
            if last_scan:
                self.scan_ms.append((now - last_scan) * 1000)
            last_scan = now
            if self.stop is not None and self.stop.is_set() and not stopping:
                stopping = True
            if (next_idx >= s.parts or stopping) and end_by == math.inf:
                end_by = now + s.result_timeout_s
            if now > end_by or (
                end_by != math.inf and not self.outstanding and self.current_trigger is None
            ):
                break
            try:
                status, result = await self._read()
            except COMM_ERRORS as exc:
                await self._recover(exc)
                continue
            seen = time.monotonic()
            ctrl = self.ctrl
            write_part: int | None = None
            # --- results (4-phase: VALID -> ACK -> !VALID -> !ACK)
            if status.status & StatusBit.RESULT_VALID and not ctrl & ControlBit.RESULT_ACK:
                self._record(result, seen)
                ctrl |= ControlBit.RESULT_ACK
            elif ctrl & ControlBit.RESULT_ACK and not status.status & StatusBit.RESULT_VALID:
                ctrl &= ~ControlBit.RESULT_ACK
            # --- trigger (TRIGGER -> TRIGGER_ACK -> !TRIGGER -> !TRIGGER_ACK)
            if ctrl & ControlBit.TRIGGER:
                if (
                    status.status & StatusBit.TRIGGER_ACK
                    and status.trigger_part_id == self.current_trigger
                ):
                    ctrl &= ~ControlBit.TRIGGER
                    self.current_trigger = None
                elif seen - self.current_trigger_t > 2.0:
                    self.counts["unacked"] += 1
                    ctrl &= ~ControlBit.TRIGGER
                    self.current_trigger = None
            elif s.respect_ready and not status.status & StatusBit.READY:
                # the line waits for the appliance: restart the schedule when it is back
                t0 = min(t0, seen) if next_idx == 0 else seen - (next_idx - 1) * period
            elif (
                not stopping
                and next_idx < s.parts
                and not status.status & StatusBit.TRIGGER_ACK
                and seen >= max(t0 + next_idx * period, last_trigger + period * 0.9)
                and (not s.respect_ready or status.status & StatusBit.READY)
            ):
                write_part = (s.first_part_id + next_idx) & 0xFFFFFFFF
                ctrl |= ControlBit.TRIGGER
                next_idx += 1
            hi = lo = 0
            if write_part is not None:
                hi, lo = split_u32(write_part, s.word_order)
                t_trig = time.monotonic()
                self.outstanding[write_part] = t_trig
                self.current_trigger, self.current_trigger_t = write_part, t_trig
                first_trigger = first_trigger or t_trig
                last_trigger = t_trig
            try:
                if write_part is not None:
                    await self.io.write(ControlBlock.START, [int(ctrl), hi, lo])
                elif ctrl != self.ctrl:
                    await self.io.write(ControlBlock.START, [int(ctrl)])
            except COMM_ERRORS as exc:
                await self._recover(exc)
                continue
            self.ctrl = int(ctrl)
            # fixed scan period, start to start (like a PLC task), never a busy loop
            next_scan = max(next_scan + interval, time.monotonic() + interval / 4)
            await asyncio.sleep(max(0.0, next_scan - time.monotonic()))
        # leave the control block clean
        with contextlib.suppress(Exception):
            await self.io.write(ControlBlock.START, [0])
        final = status
        duration = max(last_trigger - first_trigger, 1e-9)
        parts = next_idx
        lat = self.latencies
        c = self.counts
        return SimReport(
            mode=s.mode,
            ppm_target=s.ppm,
            parts=parts,
            results=c["ok"] + c["ng"] + c["error"],
            ok=c["ok"],
            ng=c["ng"],
            error_results=c["error"],
            missed=c["missed"],
            deadline_errors=c["deadline"],
            lost=len(self.outstanding),
            late=c["late"],
            mismatched=c["mismatched"],
            duplicated=c["duplicated"],
            unacked_triggers=c["unacked"],
            parts_per_s=round((parts - 1) / duration, 3) if parts > 1 else 0.0,
            duration_s=round(time.monotonic() - t0, 3),
            p50_ms=round(percentile(lat, 50), 3),
            p95_ms=round(percentile(lat, 95), 3),
            p99_ms=round(percentile(lat, 99), 3),
            max_ms=round(max(lat), 3) if lat else math.nan,
            mean_ms=round(sum(lat) / len(lat), 3) if lat else math.nan,
            appliance_overruns=(final.overrun_count - first.overrun_count) & 0xFFFFFFFF,
            appliance_missed_triggers=(final.missed_triggers - first.missed_triggers) & 0xFFFFFFFF,
            stale_results_drained=self.stale_drained,
            comm_errors=self.comm_errors,
            appliance_p99_ms=percentile(self.appliance_ms, 99),
            handshake_p50_ms=round(percentile(self.handshake_ms, 50), 3),
            handshake_p99_ms=round(percentile(self.handshake_ms, 99), 3),
            scans=len(self.scan_ms) + 1,
            scan_mean_ms=round(sum(self.scan_ms) / len(self.scan_ms), 3)
            if self.scan_ms
            else math.nan,
            scan_p50_ms=round(percentile(self.scan_ms, 50), 3),
            scan_p99_ms=round(percentile(self.scan_ms, 99), 3),
            scan_max_ms=round(max(self.scan_ms), 3) if self.scan_ms else math.nan,
            latencies_ms=[round(x, 3) for x in lat],
        )

    async def _recover(self, exc: BaseException) -> None:
        """A lost answer or connection: reconnect, then drop TRIGGER (resynchronise)."""
        self.comm_errors += 1
        if self.first_comm_error == 0.0:
            self.first_comm_error = time.monotonic()
        elif (
            time.monotonic() - self.first_comm_error > self.s.connect_timeout_s
            and self.comm_errors > 50
        ):
            raise SimulatorError(f"lost the appliance: {exc}") from exc
        await self.io.reopen()
        self.ctrl &= ~int(ControlBit.TRIGGER)
        self.current_trigger = None
        with contextlib.suppress(*COMM_ERRORS):
            await self.io.write(ControlBlock.START, [self.ctrl])

    def _record(self, r: ResultBlock, seen: float) -> None:
        pid = r.part_id
        t = self.outstanding.pop(pid, None)
        if t is None:
            key = "duplicated" if pid in self.answered else "mismatched"
            self.counts[key] += 1
            return
        self.answered.add(pid)
        latency = (seen - t) * 1000
        self.latencies.append(latency)
        if r.verdict in (1, 2) or r.error_code in (ResultError.DEADLINE, ResultError.PIPELINE):
            self.appliance_ms.append(float(r.latency_ms))
            self.handshake_ms.append(max(latency - r.latency_ms, 0.0))
        if latency > self.s.late_ms:
            self.counts["late"] += 1
        if r.verdict == 1:
            self.counts["ok"] += 1
        elif r.verdict == 2:
            self.counts["ng"] += 1
        else:
            self.counts["error"] += 1
            if r.error_code in (ResultError.NOT_READY, ResultError.DUPLICATE_PART_ID):
                self.counts["missed"] += 1
            elif r.error_code == ResultError.DEADLINE:
                self.counts["deadline"] += 1


def write_json(report: SimReport, path: Path) -> None:
    """The report as JSON (latencies included) at ``path``."""
    path.write_text(
        json.dumps(report.to_dict(with_latencies=True), indent=2) + "\n", encoding="utf-8"
    )
