"""Shared pieces for the PLC tests: an inspector thread playing the pipeline, a PLC client.

The inspector is a test double of the *pipeline* only (it answers triggers with
Verdicts after a chosen delay); every Modbus exchange in these tests is real
pymodbus / mbpoll traffic on a loopback port of its own.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from edge.events import EventBus
from edge.types import Region, StatusEvent, Verdict, VerdictCode
from plc.config import PlcConfig
from plc.registers import (
    ControlBit,
    ResultBlock,
    StatusBit,
    StatusBlock,
    decode,
    split_u32,
)
from plc.service import PlcService
from tests.conftest import free_tcp_port


@dataclass
class Inspector:
    """Answers each trigger with a Verdict after ``delay_s`` (pipeline double)."""

    delay_s: float = 0.002
    code_for: Callable[[int], VerdictCode] = lambda pid: (
        VerdictCode.NG if pid % 5 == 0 else VerdictCode.OK
    )
    wedged: threading.Event = field(default_factory=threading.Event)
    """Set: stop answering and stop heartbeat_ok (a wedged pipeline)."""
    silent_parts: set[int] = field(default_factory=set)
    """Part ids that get no verdict at all (deadline tests)."""
    late_parts: dict[int, float] = field(default_factory=dict)
    """Part id -> delay in s for that part only (late verdict tests)."""
    service: PlcService | None = None
    triggers: list[int] = field(default_factory=list)
    _q: queue.SimpleQueue[tuple[int, float]] = field(default_factory=queue.SimpleQueue)
    _stop: threading.Event = field(default_factory=threading.Event)
    _next_id: int = 0

    def on_trigger(self, part_id: int) -> None:
        self.triggers.append(part_id)
        self._q.put((part_id, time.monotonic()))

    def run(self) -> None:
        assert self.service is not None
        last_beat = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if not self.wedged.is_set() and now - last_beat > 0.02:
                self.service.heartbeat_ok()
                last_beat = now
            try:
                part_id, captured = self._q.get(timeout=0.01)
            except queue.Empty:
                continue
            if self.wedged.is_set() or part_id in self.silent_parts:
                continue
            time.sleep(self.late_parts.get(part_id, self.delay_s))
            self._next_id += 1
            code = self.code_for(part_id)
            regions = (Region(10, 10, 5, 5, 21, 0.9),) if code is VerdictCode.NG else ()
            self.service.on_verdict(
                Verdict(
                    inspection_id=self._next_id,
                    frame_sequence=self._next_id,
                    source_id="test",
                    trigger_id=part_id,
                    code=code,
                    score=0.8 if code is VerdictCode.NG else 0.1,
                    threshold=0.5,
                    regions=regions,
                    defect_class="anomaly" if code is VerdictCode.NG else "",
                    model_version="1.2.3",
                    capture_time=captured,
                    error="backend failed" if code is VerdictCode.ERROR else "",
                )
            )

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Appliance:
    service: PlcService
    inspector: Inspector
    bus: EventBus
    cfg: PlcConfig
    events: list[StatusEvent]

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def wait_event(self, kind: str, timeout_s: float = 5.0) -> StatusEvent:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for e in list(self.events):
                if e.kind == kind:
                    return e
            time.sleep(0.01)
        raise AssertionError(f"no {kind} event; got {self.kinds()}")


def _make_appliance_fixture() -> Iterator[Callable[..., Appliance]]:
    """Start PlcService + inspector thread on a fresh port; stopped at test end."""
    started: list[Appliance] = []
    threads: list[threading.Thread] = []

    def make(
        *,
        inspector: Inspector | None = None,
        recipe: Callable[..., object] | None = None,
        wait_ready: bool = True,
        **overrides: object,
    ) -> Appliance:
        settings: dict[str, object] = {"enabled": True, "port": free_tcp_port()}
        settings.update(overrides)
        cfg = PlcConfig.model_validate(settings)
        bus = EventBus()
        events: list[StatusEvent] = []
        bus.subscribe(events.append)
        insp = inspector or Inspector()
        svc = PlcService(cfg, bus, insp.on_trigger, recipe)  # type: ignore[arg-type]
        insp.service = svc
        svc.start()
        t = threading.Thread(target=insp.run, daemon=True)
        t.start()
        threads.append(t)
        app = Appliance(svc, insp, bus, cfg, events)
        started.append(app)
        if wait_ready:
            end = time.monotonic() + 5
            while not svc.status()["ready"]:
                assert time.monotonic() < end, svc.status()
                time.sleep(0.01)
        return app

    yield make
    for app in started:
        app.inspector.stop()
        app.service.stop()
    for t in threads:
        t.join(2)


class PlcClient:
    """A sync pymodbus client playing the PLC step by step (server-mode tests)."""

    def __init__(self, port: int, *, order: str = "high_first", base: int = 0) -> None:
        from pymodbus.client import ModbusTcpClient

        self.client = ModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
        assert self.client.connect(), f"cannot connect to 127.0.0.1:{port}"
        self.order = order
        self.base = base
        self.ctrl = 0

    def close(self) -> None:
        self.client.close()

    def read(self, offset: int, count: int) -> list[int]:
        rr = self.client.read_holding_registers(self.base + offset, count=count, device_id=1)
        assert not rr.isError(), rr
        return list(rr.registers)

    def status(self) -> StatusBlock:
        return decode(StatusBlock, self.read(StatusBlock.START, StatusBlock.SIZE), self.order)  # type: ignore[arg-type]

    def result(self) -> ResultBlock:
        return decode(ResultBlock, self.read(ResultBlock.START, ResultBlock.SIZE), self.order)  # type: ignore[arg-type]

    def write_ctrl(self, word: int) -> None:
        self.ctrl = word
        wr = self.client.write_register(self.base, word, device_id=1)
        assert not wr.isError(), wr

    def wait(self, pred: Callable[[StatusBlock], bool], timeout_s: float = 3.0) -> StatusBlock:
        end = time.monotonic() + timeout_s
        while True:
            st = self.status()
            if pred(st):
                return st
            assert time.monotonic() < end, f"timed out; status word 0x{st.status:04X} {st}"
            time.sleep(0.005)

    def trigger(self, part_id: int) -> None:
        """TRIGGER with PART_ID in one write, wait for TRIGGER_ACK, drop TRIGGER."""
        hi, lo = split_u32(part_id, self.order)  # type: ignore[arg-type]
        self.ctrl |= ControlBit.TRIGGER
        wr = self.client.write_registers(self.base, [self.ctrl, hi, lo], device_id=1)
        assert not wr.isError(), wr
        self.wait(lambda s: bool(s.status & StatusBit.TRIGGER_ACK) and s.trigger_part_id == part_id)
        self.write_ctrl(self.ctrl & ~ControlBit.TRIGGER)

    def take_result(self, timeout_s: float = 3.0) -> ResultBlock:
        """Wait for RESULT_VALID, read the result, ACK, wait !VALID, drop ACK."""
        self.wait(lambda s: bool(s.status & StatusBit.RESULT_VALID), timeout_s)
        res = self.result()
        self.write_ctrl(self.ctrl | ControlBit.RESULT_ACK)
        self.wait(lambda s: not s.status & StatusBit.RESULT_VALID)
        self.write_ctrl(self.ctrl & ~ControlBit.RESULT_ACK)
        return res


def _plc_client_fixture() -> Iterator[Callable[..., PlcClient]]:
    made: list[PlcClient] = []

    def make(port: int, **kw: str | int) -> PlcClient:
        c = PlcClient(port, **kw)  # type: ignore[arg-type]
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
