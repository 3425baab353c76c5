"""Server mode over Modbus TCP: real pymodbus clients against PlcService."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable

import pytest
from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException

from edge.types import StatusEvent, Verdict, VerdictCode
from plc.config import PlcConfig
from plc.registers import (
    MAP_SIZE,
    MAP_VERSION,
    CommandResult,
    ControlBit,
    FaultCode,
    ResultError,
    StatusBit,
)
from plc.service import PlcService, RecipeResult, TwoPhaseStep
from tests.conftest import free_tcp_port
from tests.plc.plc_helpers import Appliance, Inspector, PlcClient

MakeApp = Callable[..., Appliance]
MakeClient = Callable[..., PlcClient]


def test_full_handshake_echoes_part_id_and_verdict(
    make_appliance: MakeApp, plc_client: MakeClient
) -> None:
    app = make_appliance()
    plc = plc_client(app.cfg.port)
    st = plc.status()
    assert st.map_version == MAP_VERSION
    assert st.status & StatusBit.ONLINE
    assert st.status & StatusBit.READY
    assert st.status & StatusBit.PIPELINE_OK
    assert not st.status & StatusBit.FAULT

    plc.trigger(70000)  # > 16 bits: checks the 32-bit word handling
    res = plc.take_result()
    assert res.part_id == 70000
    assert res.verdict == VerdictCode.NG  # the inspector double: NG for multiples of 5
    assert res.defect_class == 1
    assert res.defect_count == 1
    assert res.largest_defect_area_px == 21
    assert res.score == 800
    assert res.threshold == 500
    assert (res.model_version_major, res.model_version_minor, res.model_version_patch) == (1, 2, 3)
    assert res.inspection_id == 1
    assert res.error_code == ResultError.NONE
    assert res.latency_ms < 1000

    plc.trigger(70001)
    res = plc.take_result()
    assert (res.part_id, res.verdict, res.defect_class, res.score) == (70001, 1, 0, 100)
    st = plc.status()
    assert st.results_queued == 0
    assert not st.status & StatusBit.RESULT_VALID
    # after ACK the result block is cleared, so a stale result is never re-read
    assert plc.result().part_id == 0
    assert plc.result().verdict == 0
    assert app.inspector.triggers == [70000, 70001]
    status = json.loads(json.dumps(app.service.status()))  # plain data for panel / MQTT
    assert status["counters"]["acknowledged"] == 2
    assert status["counters"]["results"] == 2
    assert status["last_trigger"]["part_id"] == 70001
    assert status["connected"] is True
    assert status["clients"][0].startswith("127.0.0.1:")
    assert status["endpoint"] == f"127.0.0.1:{app.cfg.port}"
    app.wait_event("plc.trigger")
    app.wait_event("plc.connected")


def test_low_first_word_order_and_base_address(
    make_appliance: MakeApp, plc_client: MakeClient
) -> None:
    app = make_appliance(word_order="low_first", base_address=100)
    plc = plc_client(app.cfg.port, order="low_first", base=100)
    plc.trigger(0x00010002)
    res = plc.take_result()
    assert res.part_id == 0x00010002
    raw = plc.read(34, 2)  # result part id words, low word first
    assert raw == [0, 0]  # cleared after ack
    plc.trigger(0x00030004)
    plc.wait(lambda s: bool(s.status & StatusBit.RESULT_VALID))
    assert plc.read(34, 2) == [0x0004, 0x0003]
    # the map really starts at 100: address 0 is outside it
    rr = plc.client.read_holding_registers(0, count=1, device_id=1)
    assert rr.isError()
    assert rr.exception_code == 2


def test_illegal_accesses_get_modbus_exception_codes(
    make_appliance: MakeApp, plc_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_appliance(recipe_id_max=50)
    plc = plc_client(app.cfg.port)
    c = plc.client
    caplog.set_level(logging.INFO, logger="plc.audit")
    # writes outside the control block: ILLEGAL DATA ADDRESS (2)
    for addr in (16, 4, 40, MAP_SIZE + 5):
        rr = c.write_register(addr, 1, device_id=1)
        assert rr.isError(), (addr, rr)
        assert rr.exception_code == 2, (addr, rr)
    rr = c.write_registers(3, [1, 1], device_id=1)  # straddles the end of the block
    assert rr.isError()
    assert rr.exception_code == 2
    # out-of-range values: ILLEGAL DATA VALUE (3)
    rr = c.write_register(0, 0x0100, device_id=1)  # reserved control bit
    assert rr.isError()
    assert rr.exception_code == 3
    rr = c.write_register(3, 51, device_id=1)  # recipe id above recipe_id_max
    assert rr.isError()
    assert rr.exception_code == 3
    # reads beyond the map: ILLEGAL DATA ADDRESS; bit functions: ILLEGAL FUNCTION
    rr = c.read_holding_registers(MAP_SIZE - 1, count=2, device_id=1)
    assert rr.isError()
    assert rr.exception_code == 2
    rr = c.read_coils(0, count=1, device_id=1)
    assert rr.isError()
    assert rr.exception_code == 1
    # device identification (function 43/14) names the appliance
    assert c.read_device_information(device_id=1).information[0] == b"LineInspect"
    # the read-only blocks are mirrored as input registers
    ir = c.read_input_registers(16, count=16, device_id=1)
    assert not ir.isError()
    assert ir.registers[14] == MAP_VERSION
    # nothing illegal changed the state, the legal write went through and was audited
    assert c.write_register(3, 50, device_id=1).isError() is False
    assert plc.read(0, 4) == [0, 0, 0, 50]
    assert app.service.status()["counters"]["illegal_writes"] == 7
    audit = [r.getMessage() for r in caplog.records if r.name == "plc.audit"]
    assert any("control write from 127.0.0.1:" in m and "[50]" in m for m in audit)
    assert any(m.startswith("REFUSED write from 127.0.0.1:") for m in audit)
    ev = app.wait_event("plc.illegal_write")
    assert ev.data["client"].startswith("127.0.0.1:")


def test_allow_list_refuses_other_clients(make_appliance: MakeApp) -> None:
    app = make_appliance(allowed_clients=["10.99.0.0/16"], wait_ready=False)
    client = ModbusTcpClient("127.0.0.1", port=app.cfg.port, timeout=1, retries=0)
    try:
        client.connect()
        # closed by the server: pymodbus reports it as a Modbus or a socket error
        with pytest.raises((ModbusException, OSError)):
            client.read_holding_registers(16, count=1, device_id=1)
    finally:
        client.close()
    ev = app.wait_event("plc.refused")
    assert ev.data["client"].startswith("127.0.0.1:")
    assert app.service.status()["refused_connections"] >= 1
    assert app.service.status()["counters"]["control_writes"] == 0


def test_result_buffer_overrun_is_latched_and_counted(
    make_appliance: MakeApp, plc_client: MakeClient
) -> None:
    app = make_appliance(result_buffer_depth=2, max_parts_in_flight=8)
    plc = plc_client(app.cfg.port)
    for n, pid in enumerate((11, 12), start=1):
        plc.trigger(pid)
        plc.wait(lambda s, n=n: s.results_queued == n)  # its verdict is in the buffer
    st = plc.status()
    assert not st.status & StatusBit.READY  # no free slot left for another part
    for pid in (13, 14):  # a PLC ignoring READY: ERROR results that do not fit
        plc.trigger(pid)
    st = plc.wait(lambda s: s.overrun_count == 2)
    assert st.status & StatusBit.OVERRUN
    assert st.results_queued == 2
    # the buffered results are the oldest ones, in order; the newest were dropped
    assert plc.take_result().part_id == 11
    assert plc.take_result().part_id == 12
    st = plc.status()
    assert not st.status & StatusBit.RESULT_VALID
    assert st.status & StatusBit.OVERRUN
    plc.write_ctrl(ControlBit.FAULT_RESET)
    plc.write_ctrl(0)
    st = plc.status()
    assert not st.status & StatusBit.OVERRUN
    assert st.overrun_count == 2
    ev = app.wait_event("plc.overrun")
    assert ev.data["part_id"] in (13, 14)


def test_deadline_miss_gives_error_and_late_verdict_is_dropped(
    make_appliance: MakeApp, plc_client: MakeClient
) -> None:
    insp = Inspector(late_parts={501: 0.4})
    app = make_appliance(inspector=insp, verdict_deadline_ms=150)
    plc = plc_client(app.cfg.port)
    plc.trigger(501)
    res = plc.take_result()
    assert res.part_id == 501
    assert res.verdict == VerdictCode.ERROR
    assert res.error_code == ResultError.DEADLINE
    assert res.score == 0xFFFF
    assert 150 <= res.latency_ms < 1000
    # the late verdict for 501 arrives and is dropped, never shown for any part
    end = time.monotonic() + 2
    while app.service.status()["counters"]["late_verdicts"] < 1:
        assert time.monotonic() < end
        time.sleep(0.01)
    assert not plc.status().status & StatusBit.RESULT_VALID
    plc.trigger(502)
    res = plc.take_result()
    assert res.part_id == 502
    assert res.verdict == VerdictCode.OK
    st = plc.status()
    assert st.deadline_misses == 1
    assert not st.status & StatusBit.RESULT_VALID
    assert app.wait_event("plc.deadline_miss").data["part_id"] == 501
    assert app.wait_event("plc.late_verdict").data["part_id"] == 501


def test_wedged_pipeline_stops_heartbeat_and_faults(
    make_appliance: MakeApp, plc_client: MakeClient
) -> None:
    app = make_appliance(heartbeat_period_ms=20, heartbeat_timeout_ms=200)
    plc = plc_client(app.cfg.port)
    h1 = plc.status().heartbeat
    time.sleep(0.3)
    h2 = plc.status().heartbeat
    assert h2 - h1 >= 3  # advancing (~15 expected at 50 Hz)
    app.inspector.wedged.set()
    st = plc.wait(lambda s: bool(s.status & StatusBit.FAULT), timeout_s=2)
    assert st.fault_code == FaultCode.PIPELINE_STALLED
    assert not st.status & StatusBit.READY
    assert not st.status & StatusBit.PIPELINE_OK
    frozen = plc.status().heartbeat
    time.sleep(0.2)
    assert plc.status().heartbeat == frozen
    # a trigger now is answered with ERROR (not ready), never silently ignored
    plc.trigger(900)
    res = plc.take_result()
    assert (res.part_id, res.verdict, res.error_code) == (900, 3, ResultError.NOT_READY)
    assert plc.status().missed_triggers == 1
    app.inspector.wedged.clear()
    st = plc.wait(lambda s: bool(s.status & StatusBit.READY), timeout_s=2)
    assert st.fault_code == 0
    time.sleep(0.1)
    assert plc.status().heartbeat != frozen
    app.wait_event("plc.fault")
    app.wait_event("plc.fault_cleared")


def test_app_fault_drops_ready(make_appliance: MakeApp, plc_client: MakeClient) -> None:
    app = make_appliance()
    plc = plc_client(app.cfg.port)
    app.service.set_health(ready=False, fault_code=FaultCode.CAMERA_LOST, message="camera0 lost")
    st = plc.status()
    assert st.status & StatusBit.FAULT
    assert st.fault_code == FaultCode.CAMERA_LOST
    assert not st.status & StatusBit.READY
    assert app.wait_event("plc.fault").data["message"] == "camera0 lost"
    assert app.service.status()["fault_message"] == "camera0 lost"
    app.service.set_health(ready=True)
    st = plc.status()
    assert st.status & StatusBit.READY
    assert st.fault_code == 0


def test_offline_and_duplicate_part_ids_get_error_results(
    make_appliance: MakeApp, plc_client: MakeClient
) -> None:
    insp = Inspector(late_parts={7: 0.3})
    app = make_appliance(inspector=insp)
    plc = plc_client(app.cfg.port)
    plc.trigger(7)  # in flight for 0.3 s
    plc.trigger(7)  # same id again while in flight
    res = plc.take_result()
    assert (res.part_id, res.verdict, res.error_code) == (7, 3, ResultError.DUPLICATE_PART_ID)
    assert plc.take_result().part_id == 7  # the real verdict for the first trigger
    plc.write_ctrl(ControlBit.SET_OFFLINE)
    st = plc.status()
    assert not st.status & StatusBit.ONLINE
    assert not st.status & StatusBit.READY
    plc.trigger(8)
    res = plc.take_result()
    assert (res.part_id, res.error_code) == (8, ResultError.NOT_READY)
    plc.write_ctrl(0)
    assert plc.status().status & StatusBit.READY
    app.wait_event("plc.offline")


def test_recipe_change_waits_for_the_part_in_flight(
    make_appliance: MakeApp, plc_client: MakeClient
) -> None:
    calls: list[tuple[int, int]] = []
    holder: dict[str, PlcService] = {}

    def on_recipe(recipe_id: int) -> RecipeResult:
        calls.append((recipe_id, holder["svc"].status()["in_flight"]))
        time.sleep(0.05)
        if recipe_id == 13:
            return RecipeResult(False, CommandResult.UNKNOWN_RECIPE, "no recipe 13")
        return RecipeResult(True, message="model v2")

    insp = Inspector(late_parts={1: 0.3})
    app = make_appliance(inspector=insp, recipe=on_recipe)
    holder["svc"] = app.service
    plc = plc_client(app.cfg.port)
    plc.trigger(1)
    assert plc.client.write_register(3, 12, device_id=1).isError() is False
    plc.write_ctrl(ControlBit.RECIPE_EXECUTE)
    st = plc.status()
    assert st.status & StatusBit.CMD_BUSY
    assert not st.status & StatusBit.READY
    assert st.status & StatusBit.BUSY  # part 1 still in flight: no switch yet
    assert calls == []
    st = plc.wait(lambda s: bool(s.status & StatusBit.CMD_DONE), timeout_s=3)
    assert st.active_recipe_id == 12
    assert st.command_result == CommandResult.OK
    assert st.status & StatusBit.READY
    assert not st.status & StatusBit.CMD_BUSY
    assert calls == [(12, 0)]  # called once, with no part in flight
    res = plc.take_result()
    assert res.part_id == 1
    assert res.verdict == VerdictCode.OK
    assert res.recipe_id == 0
    plc.trigger(2)
    assert plc.take_result().recipe_id == 12
    # a failing recipe: CMD_FAILED with the reason, the old recipe stays
    plc.client.write_register(3, 13, device_id=1)
    plc.write_ctrl(0)
    plc.write_ctrl(ControlBit.RECIPE_EXECUTE)
    st = plc.wait(lambda s: bool(s.status & StatusBit.CMD_FAILED), timeout_s=3)
    assert st.command_result == CommandResult.UNKNOWN_RECIPE
    assert st.active_recipe_id == 12
    assert not st.status & StatusBit.CMD_DONE
    states = [e.data.get("state") for e in app.events if e.kind == "plc.recipe"]
    assert states == ["busy", "completed", "busy", "failed"]


def _wait_recipe_event(app: Appliance, state: str, timeout_s: float = 10.0) -> StatusEvent:
    """The first plc.recipe event with this state (events are published by a thread)."""
    end = time.monotonic() + timeout_s
    while True:
        for e in list(app.events):
            if e.kind == "plc.recipe" and e.data.get("state") == state:
                return e
        assert time.monotonic() < end, [e.data for e in app.events if e.kind == "plc.recipe"]
        time.sleep(0.01)


def test_recipe_that_never_returns_times_out_without_wedging_the_station(
    make_appliance: MakeApp, plc_client: MakeClient
) -> None:
    release = threading.Event()
    calls: list[int] = []

    def on_recipe(recipe_id: int) -> RecipeResult:
        calls.append(recipe_id)
        if recipe_id == 5:
            release.wait(60)  # a model load that hangs (until the test lets it go)
        return RecipeResult(True, message=f"recipe {recipe_id}")

    app = make_appliance(recipe=on_recipe, recipe_timeout_ms=300)
    plc = plc_client(app.cfg.port)
    try:
        plc.client.write_register(3, 5, device_id=1)
        plc.write_ctrl(ControlBit.RECIPE_EXECUTE)
        st = plc.wait(lambda s: bool(s.status & StatusBit.CMD_FAILED), timeout_s=10)
        assert st.command_result == CommandResult.TIMEOUT
        assert st.active_recipe_id == 0
        assert not st.status & StatusBit.CMD_BUSY
        plc.wait(lambda s: bool(s.status & StatusBit.READY), timeout_s=10)
        # the handler is still stuck, yet parts are inspected and reported
        plc.write_ctrl(0)
        plc.trigger(77)
        res = plc.take_result(timeout_s=10)
        assert (res.part_id, res.verdict, res.recipe_id) == (77, VerdictCode.OK, 0)
        # another change while the stuck handler runs is refused, not queued
        plc.client.write_register(3, 6, device_id=1)
        plc.write_ctrl(ControlBit.RECIPE_EXECUTE)
        st = plc.status()
        assert st.status & StatusBit.CMD_FAILED
        assert st.command_result == CommandResult.REJECTED_BUSY
        assert calls == [5]
        failed = _wait_recipe_event(app, "failed")
        assert failed.data["reason"] == CommandResult.TIMEOUT
    finally:
        release.set()
    # the late success is reported and ACTIVE_RECIPE_ID tells the truth
    plc.wait(lambda s: s.active_recipe_id == 5, timeout_s=10)
    assert _wait_recipe_event(app, "late_completed").data["recipe_id"] == 5
    # and the next change runs normally
    plc.write_ctrl(0)
    plc.write_ctrl(ControlBit.RECIPE_EXECUTE)
    st = plc.wait(lambda s: bool(s.status & StatusBit.CMD_DONE), timeout_s=10)
    assert (st.active_recipe_id, st.command_result) == (6, CommandResult.OK)
    assert calls == [5, 6]


def test_recipe_without_handler_fails_not_supported(
    make_appliance: MakeApp, plc_client: MakeClient
) -> None:
    app = make_appliance()
    plc = plc_client(app.cfg.port)
    plc.client.write_register(3, 4, device_id=1)
    plc.write_ctrl(ControlBit.RECIPE_EXECUTE)
    st = plc.status()
    assert st.status & StatusBit.CMD_FAILED
    assert st.command_result == CommandResult.NOT_SUPPORTED
    assert st.status & StatusBit.READY


def test_port_in_use_is_a_clear_error() -> None:
    port = free_tcp_port()
    from edge.events import EventBus

    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        svc = PlcService(PlcConfig(enabled=True, port=port), EventBus(), lambda pid: None)
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            svc.start()
    assert not svc.status()["running"]


def test_verdict_without_trigger_is_dropped(
    make_appliance: MakeApp, plc_client: MakeClient
) -> None:

    app = make_appliance()
    plc = plc_client(app.cfg.port)
    app.service.on_verdict(
        Verdict(
            inspection_id=5,
            frame_sequence=5,
            source_id="x",
            trigger_id=4242,
            code=VerdictCode.OK,
            score=0.1,
            threshold=0.5,
        )
    )
    app.service.on_verdict(
        Verdict(
            inspection_id=6,
            frame_sequence=6,
            source_id="x",
            trigger_id=None,
            code=VerdictCode.OK,
            score=math.nan,
            threshold=0.5,
        )
    )
    st = plc.status()
    assert not st.status & StatusBit.RESULT_VALID
    assert st.results_queued == 0
    assert app.service.status()["counters"]["late_verdicts"] == 1


def _ok_verdict(part_id: int) -> Verdict:
    """An OK verdict for ``part_id`` (the stand-in inspections below report these)."""
    return Verdict(
        inspection_id=part_id,
        frame_sequence=part_id,
        source_id="t",
        trigger_id=part_id,
        code=VerdictCode.OK,
        score=0.1,
        threshold=0.5,
    )


def test_next_frame_is_grabbed_while_the_previous_part_is_inspected(
    plc_client: MakeClient,
) -> None:
    """on_trigger grabs; the step it returns inspects on another thread, in trigger order."""
    from edge.events import EventBus

    grabbed: list[int] = []
    inspected: list[int] = []
    first_may_finish = threading.Event()
    holder: dict[str, PlcService] = {}

    def on_trigger(part_id: int) -> Callable[[], object]:
        grabbed.append(part_id)

        def inspect() -> None:
            if part_id == 1:
                first_may_finish.wait(30)
            inspected.append(part_id)
            holder["svc"].on_verdict(_ok_verdict(part_id))

        return inspect

    cfg = PlcConfig(enabled=True, port=free_tcp_port(), heartbeat_timeout_ms=60000)
    svc = PlcService(cfg, EventBus(), on_trigger)
    holder["svc"] = svc
    svc.start()
    try:
        svc.heartbeat_ok()
        plc = plc_client(cfg.port)
        plc.wait(lambda s: bool(s.status & StatusBit.READY), timeout_s=10)
        plc.trigger(1)
        plc.trigger(2)  # accepted (READY) while part 1 is still being inspected
        end = time.monotonic() + 10
        while grabbed != [1, 2]:
            assert time.monotonic() < end, grabbed
            time.sleep(0.005)
        assert inspected == []  # part 2's frame was grabbed during part 1's inspection
        assert plc.status().in_flight == 2
        first_may_finish.set()
        assert plc.take_result(timeout_s=10).part_id == 1
        assert plc.take_result(timeout_s=10).part_id == 2
        assert inspected == [1, 2]
    finally:
        first_may_finish.set()
        svc.stop()


def test_queued_parts_overlap_the_next_inference_with_reporting_the_previous(
    plc_client: MakeClient,
) -> None:
    """Two-phase steps: with parts waiting, N+1 is begun before N is finished, in order."""
    from edge.events import EventBus

    order: list[str] = []
    first_may_begin = threading.Event()
    holder: dict[str, PlcService] = {}

    class Step:
        def __init__(self, part_id: int) -> None:
            self.part_id = part_id

        def begin(self) -> None:
            if self.part_id == 1:
                first_may_begin.wait(30)  # parts 2 and 3 queue up meanwhile
            order.append(f"begin {self.part_id}")

        def finish(self) -> object:
            order.append(f"finish {self.part_id}")
            verdict = _ok_verdict(self.part_id)
            holder["svc"].on_verdict(verdict)
            return verdict

        def __call__(self) -> object:
            self.begin()
            return self.finish()

    assert isinstance(Step(0), TwoPhaseStep)
    cfg = PlcConfig(enabled=True, port=free_tcp_port(), heartbeat_timeout_ms=60000)
    svc = PlcService(cfg, EventBus(), Step)
    holder["svc"] = svc
    svc.start()
    try:
        svc.heartbeat_ok()
        plc = plc_client(cfg.port)
        plc.wait(lambda s: bool(s.status & StatusBit.READY), timeout_s=10)
        for part in (1, 2, 3):
            plc.trigger(part)
        plc.wait(lambda s: s.in_flight == 3, timeout_s=10)
        # IN_FLIGHT counts a part when the trigger is accepted; its step reaches the
        # inspector's queue a moment later (trigger worker thread). Wait for both
        # waiting steps to be queued, or a slow machine sees "finish 2" before "begin 3".
        deadline = time.monotonic() + 10
        while svc._inspect.qsize() < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert svc._inspect.qsize() == 2
        first_may_begin.set()
        assert [plc.take_result(timeout_s=10).part_id for _ in range(3)] == [1, 2, 3]
        # each waiting part's inference starts before the previous part is reported
        assert order == ["begin 1", "begin 2", "finish 1", "begin 3", "finish 2", "finish 3"]
    finally:
        first_may_begin.set()
        svc.stop()
