"""Outside tools against PlcService: Debian's mbpoll over TCP, RTU through a socat pty pair."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pymodbus.client import ModbusSerialClient
from pymodbus.exceptions import ModbusException

from edge.types import VerdictCode
from plc.registers import MAP_VERSION, ControlBit, ResultBlock, StatusBit, StatusBlock, decode
from tests.conftest import require_tool
from tests.plc.plc_helpers import Appliance

MakeApp = Callable[..., Appliance]


def _mbpoll(port: int, *args: str, write: str | None = None) -> str:
    tool = require_tool("mbpoll")
    cmd = [tool, "-m", "tcp", "-p", str(port), "-a", "1", "-1", "-o", "2", *args, "127.0.0.1"]
    if write is not None:
        cmd.append(write)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _mbpoll_values(out: str) -> dict[int, int]:
    values: dict[int, int] = {}
    for raw in out.splitlines():
        line = raw.strip()
        if line.startswith("[") and "]:" in line:
            ref, value = line[1:].split("]:", 1)
            values[int(ref)] = int(value.strip())
    return values


def test_mbpoll_reads_status_and_triggers_a_part(make_appliance: MakeApp) -> None:
    app = make_appliance()
    port = app.cfg.port
    # mbpoll counts references from 1: status offset 16 is reference 17
    status = _mbpoll_values(_mbpoll(port, "-t", "4", "-r", "17", "-c", "16"))
    assert set(status) == set(range(17, 33))
    word = status[17]
    assert word & StatusBit.ONLINE
    assert word & StatusBit.READY
    assert status[31] == MAP_VERSION
    # write the 32-bit part id (big-endian word order = plc.word_order high_first) ...
    _mbpoll(port, "-t", "4:int", "-B", "-r", "2", write="123456")
    # ... then raise TRIGGER
    _mbpoll(port, "-t", "4", "-r", "1", write=str(int(ControlBit.TRIGGER)))
    end = time.monotonic() + 3
    while not app.inspector.triggers:
        assert time.monotonic() < end, "the trigger written by mbpoll never reached the app"
        time.sleep(0.01)
    assert app.inspector.triggers == [123456]
    # the result is valid and echoes the part id (read as one 32-bit value)
    time.sleep(0.1)
    status = _mbpoll_values(_mbpoll(port, "-t", "4", "-r", "17", "-c", "1"))
    assert status[17] & StatusBit.RESULT_VALID
    assert status[17] & StatusBit.TRIGGER_ACK
    echo = _mbpoll_values(_mbpoll(port, "-t", "4:int", "-B", "-r", "35", "-c", "1"))
    assert echo == {35: 123456}
    # and mbpoll cannot write into the status block
    tool = require_tool("mbpoll")
    proc = subprocess.run(
        [
            tool,
            "-m",
            "tcp",
            "-p",
            str(port),
            "-1",
            "-o",
            "2",
            "-t",
            "4",
            "-r",
            "17",
            "127.0.0.1",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert proc.returncode != 0
    assert "Illegal data address" in proc.stdout + proc.stderr


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two linked pseudo-terminals made by socat: (appliance side, PLC side)."""
    socat = require_tool("socat")
    app_end, plc_end = tmp_path / "ttyAPP", tmp_path / "ttyPLC"
    proc = subprocess.Popen(
        [socat, f"pty,raw,echo=0,link={app_end}", f"pty,raw,echo=0,link={plc_end}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        end = time.monotonic() + 5
        while not (app_end.exists() and plc_end.exists()):
            assert proc.poll() is None, "socat exited"
            assert time.monotonic() < end, "socat made no pty pair"
            time.sleep(0.02)
        yield str(app_end), str(plc_end)
    finally:
        proc.terminate()
        proc.wait(5)


def test_rtu_over_a_serial_pty_pair(make_appliance: MakeApp, pty_pair: tuple[str, str]) -> None:
    app_end, plc_end = pty_pair
    app = make_appliance(
        transport="rtu", serial_port=app_end, baudrate=115200, parity="N", unit_id=3
    )
    assert app.service.status()["endpoint"] == f"rtu:{app_end}"
    client = ModbusSerialClient(plc_end, baudrate=115200, parity="N", timeout=0.5, retries=0)
    assert client.connect()
    try:

        def status() -> StatusBlock:
            rr = client.read_holding_registers(16, count=16, device_id=3)
            assert not rr.isError(), rr
            return decode(StatusBlock, rr.registers, "high_first")

        st = status()
        assert st.map_version == MAP_VERSION
        assert st.status & StatusBit.READY
        assert not client.write_registers(
            0, [int(ControlBit.TRIGGER), 0, 77], device_id=3
        ).isError()
        end = time.monotonic() + 3
        while not status().status & StatusBit.RESULT_VALID:
            assert time.monotonic() < end
            time.sleep(0.01)
        rr = client.read_holding_registers(32, count=ResultBlock.SIZE, device_id=3)
        res = decode(ResultBlock, rr.registers, "high_first")
        assert res.part_id == 77
        assert res.verdict == VerdictCode.OK
        # illegal write over RTU: exception code 2 on the wire
        wr = client.write_register(20, 1, device_id=3)
        assert wr.isError()
        assert wr.exception_code == 2
        # another slave address on the same line: the appliance stays silent
        with pytest.raises(ModbusException):
            client.read_holding_registers(16, count=1, device_id=9)
    finally:
        client.close()


class SerialPlcMemory:
    """A PLC's holding registers served over RTU by pymodbus (the appliance is master)."""

    def __init__(self, port: str, unit_id: int) -> None:
        import asyncio
        import threading

        from pymodbus.server import ModbusSerialServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        self.unit_id = unit_id
        self.loop = asyncio.new_event_loop()
        device = SimDevice(
            id=unit_id,
            simdata=[SimData(address=0, count=64, values=0, datatype=DataType.REGISTERS)],
        )

        async def make() -> ModbusSerialServer:
            server = ModbusSerialServer(device, port=port, baudrate=115200, parity="N", timeout=0.5)
            await server.serve_forever(background=True)
            return server

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(make(), self.loop).result(5)

    def read(self, addr: int, count: int) -> list[int]:
        import asyncio

        fut = asyncio.run_coroutine_threadsafe(
            self.server.async_getValues(self.unit_id, 3, addr, count), self.loop
        )
        return list(fut.result(5))

    def write(self, addr: int, values: list[int]) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(
            self.server.async_setValues(self.unit_id, 16, addr, values), self.loop
        ).result(5)

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_client_mode_over_rtu(make_appliance: MakeApp, pty_pair: tuple[str, str]) -> None:
    app_end, plc_end = pty_pair
    plc = SerialPlcMemory(plc_end, unit_id=2)
    try:
        app = make_appliance(
            mode="client",
            transport="rtu",
            serial_port=app_end,
            baudrate=115200,
            parity="N",
            unit_id=2,
            client_poll_interval_ms=5,
            wait_ready=False,
        )

        def status() -> StatusBlock:
            return decode(StatusBlock, plc.read(16, 16), "high_first")

        end = time.monotonic() + 5
        while not status().status & StatusBit.READY:
            assert time.monotonic() < end, f"appliance never wrote READY: {status()}"
            time.sleep(0.02)
        assert status().map_version == MAP_VERSION
        app.wait_event("plc.connected")
        plc.write(0, [int(ControlBit.TRIGGER), 0, 4242])  # the PLC program sets its own regs
        end = time.monotonic() + 5
        while not status().status & StatusBit.RESULT_VALID:
            assert time.monotonic() < end, f"no result: {status()}"
            time.sleep(0.02)
        res = decode(ResultBlock, plc.read(32, ResultBlock.SIZE), "high_first")
        assert res.part_id == 4242
        assert res.verdict == VerdictCode.OK
        assert status().trigger_part_id == 4242
        assert app.inspector.triggers == [4242]
    finally:
        plc.close()
