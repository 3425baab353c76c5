"""Client mode: the appliance is the Modbus master and the PLC holds the registers.

The same map lives in the PLC's holding registers at ``plc.base_address``.
Every ``client_poll_interval_ms`` the link reads the PLC's control block,
feeds it to the :class:`Handshake` (edges are found by comparing with the
previous read) and, when the status/result words changed, writes them back
in one request. When the PLC goes away the link reports it, keeps the
handshake running (results stay buffered, deadlines still apply) and
reconnects with a doubling delay (``reconnect_delay_s`` up to 5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from plc.config import PlcConfig
from plc.handshake import Effects, Handshake
from plc.registers import ControlBlock, StatusBlock

log = logging.getLogger(__name__)

MAX_RECONNECT_DELAY_S = 5.0


class PlcUnavailableError(Exception):
    """The PLC did not answer or answered with a Modbus exception."""


class ModbusClientLink:
    """Polls the PLC's control block and mirrors status/result into it."""

    def __init__(
        self,
        cfg: PlcConfig,
        core: Handshake,
        apply: Callable[[Effects], None],
        on_connection: Callable[[str, str, str], None],
    ) -> None:
        self._cfg = cfg
        self._core = core
        self._apply = apply
        self._on_connection = on_connection
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._connected = False
        self.reconnects = 0
        """Connections made after the first one."""

    @property
    def endpoint(self) -> str:
        """The PLC's ``host:port`` or ``rtu:/dev/tty...``."""
        if self._cfg.transport == "rtu":
            return f"rtu:{self._cfg.serial_port}"
        return f"{self._cfg.host}:{self._cfg.port}"

    def start(self) -> None:
        """Start polling in the background (a PLC that is not there yet is not an error)."""
        self._thread = threading.Thread(target=self._run, name="plc-modbus-client", daemon=True)
        self._thread.start()
        self._ready.wait(5.0)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop polling, close the connection, join the thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def peers(self) -> list[str]:
        """The PLC's address while connected, else empty."""
        return [self.endpoint] if self._connected else []

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    def _make_client(self) -> Any:
        cfg = self._cfg
        if cfg.transport == "rtu":
            return AsyncModbusSerialClient(
                cfg.serial_port,
                baudrate=cfg.baudrate,
                parity=cfg.parity,
                stopbits=cfg.stopbits,
                timeout=cfg.client_timeout_s,
                retries=0,
                reconnect_delay=0,
            )
        return AsyncModbusTcpClient(
            cfg.host, port=cfg.port, timeout=cfg.client_timeout_s, retries=0, reconnect_delay=0
        )

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._ready.set()
        delay = self._cfg.reconnect_delay_s
        ever_connected = False
        while not self._stop.is_set():
            client = self._make_client()
            try:
                if not await client.connect():
                    raise PlcUnavailableError(f"cannot connect to the PLC at {self.endpoint}")
                if ever_connected:
                    self.reconnects += 1
                ever_connected = True
                self._connected = True
                delay = self._cfg.reconnect_delay_s
                self._on_connection("connected", self.endpoint, "")
                await self._poll(client)
            except (PlcUnavailableError, ModbusException, OSError, TimeoutError) as exc:
                if self._connected:
                    self._on_connection("disconnected", self.endpoint, str(exc))
                else:
                    log.debug("PLC at %s unavailable: %s", self.endpoint, exc)
            finally:
                self._connected = False
                client.close()
            if self._stop.is_set():
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, MAX_RECONNECT_DELAY_S)
        if self._connected:
            self._on_connection("disconnected", self.endpoint, "stopped")

    async def _poll(self, client: Any) -> None:
        assert self._stop is not None
        cfg = self._cfg
        unit = cfg.unit_id
        base = cfg.base_address
        written = -1
        interval = cfg.client_poll_interval_ms / 1000
        while not self._stop.is_set():
            rr = await client.read_holding_registers(
                base + ControlBlock.START, count=ControlBlock.SIZE, device_id=unit
            )
            if rr.isError():
                raise PlcUnavailableError(f"PLC answered {rr} reading the control block")
            self._apply(self._core.apply_control_image(list(rr.registers), self.endpoint))
            version, words = self._core.snapshot()
            if version != written:
                wr = await client.write_registers(base + StatusBlock.START, words, device_id=unit)
                if wr.isError():
                    raise PlcUnavailableError(f"PLC answered {wr} writing status/result")
                written = version
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)
