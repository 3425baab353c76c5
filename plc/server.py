"""Server mode: a pymodbus 3.x async server (TCP or RTU) in its own thread and loop.

pymodbus has no per-client hook in its datastore API, so the request handler
is subclassed: each connection checks the peer against the allow-list when it
is made, and every request is answered from the :class:`Handshake` through a
small per-peer context (the object pymodbus PDUs call ``async_getValues`` /
``async_setValues`` on). That is where writes outside the control block get
ILLEGAL DATA ADDRESS, bad values ILLEGAL DATA VALUE, and where each control
write is logged with the client address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import SimData, SimDevice

from plc.config import PlcConfig
from plc.handshake import Effects, Handshake

log = logging.getLogger(__name__)

REGISTER_FUNCTIONS = frozenset({3, 4, 6, 16, 22, 23})
"""Read holding/input, write single/multiple, mask write, read/write multiple."""
PASS_THROUGH_FUNCTIONS = frozenset({0x2B})
"""Read device identification: answered by pymodbus itself."""


class _PeerContext:
    """What a pymodbus PDU sees as the datastore, bound to one client."""

    def __init__(self, gate: _Gate, peer: str) -> None:
        self._gate = gate
        self._peer = peer

    async def async_getValues(  # noqa: N802 (pymodbus API)
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | ExcCodes:
        _ = device_id, func_code
        res = self._gate.core.read(address - self._gate.base, count)
        return ExcCodes(res) if isinstance(res, int) else res

    async def async_setValues(  # noqa: N802 (pymodbus API)
        self, device_id: int, func_code: int, address: int, values: Sequence[int]
    ) -> ExcCodes | None:
        _ = device_id, func_code
        code, fx = self._gate.core.write(address - self._gate.base, list(values), self._peer)
        self._gate.apply(fx)
        return ExcCodes(code) if code is not None else None

    def device_ids(self) -> list[int]:
        return [0]


class _Gate:
    """Shared by all handlers of one server: allow-list, handshake, connection list."""

    def __init__(
        self,
        cfg: PlcConfig,
        core: Handshake,
        apply: Callable[[Effects], None],
        on_connection: Callable[[str, str, str], None],
    ) -> None:
        self.core = core
        self.apply = apply
        self.base = cfg.base_address
        self.rtu = cfg.transport == "rtu"
        self.unit_id = cfg.unit_id
        self._nets = [ipaddress.ip_network(n, strict=False) for n in cfg.allowed_clients]
        self._on_connection = on_connection
        self._lock = threading.Lock()
        self.clients: dict[int, str] = {}

    def allowed(self, host: str) -> bool:
        if not self._nets:
            return True
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._nets)

    def connected(self, key: int, peer: str) -> None:
        with self._lock:
            self.clients[key] = peer
        self._on_connection("connected", peer, "")

    def disconnected(self, key: int, reason: str) -> None:
        with self._lock:
            peer = self.clients.pop(key, None)
        if peer is not None:
            self._on_connection("disconnected", peer, reason)

    def refused(self, peer: str) -> None:
        self._on_connection("refused", peer, "not in plc.allowed_clients")

    def peers(self) -> list[str]:
        with self._lock:
            return sorted(self.clients.values())


def _peer_name(transport: Any, fallback: str) -> tuple[str, str]:
    """(host, 'host:port') of a connection; serial lines have no peer address."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return host, f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return "", fallback


class _GuardedHandler(ServerRequestHandler):
    """One client connection: allow-list at connect, every request via the gate."""

    gate: _Gate
    peer = ""
    refused = False

    def callback_connected(self) -> None:
        super().callback_connected()
        host, self.peer = _peer_name(self.transport, self.gate_serial_name())
        if host and not self.gate.rtu and not self.gate.allowed(host):
            self.refused = True
            self.gate.refused(self.peer)
            self.transport.close()
            return
        self.gate.connected(id(self), self.peer)

    def gate_serial_name(self) -> str:
        return f"serial:{self.server.comm_params.source_address[0]}"

    def callback_disconnected(self, exc: Exception | None) -> None:
        super().callback_disconnected(exc)
        self.gate.disconnected(id(self), str(exc) if exc else "closed")

    async def handle_request(self) -> None:
        pdu = self.last_pdu
        addr = self.last_addr
        if pdu is None or self.refused:
            return
        if self.gate.rtu and pdu.dev_id not in (self.gate.unit_id, 0):
            return  # another slave on the same RS-485 line
        fc = pdu.function_code
        if fc in REGISTER_FUNCTIONS:
            try:
                context = cast(Any, _PeerContext(self.gate, self.peer))
                response = await pdu.datastore_update(context, pdu.dev_id)
            except Exception:
                log.exception("Modbus request %s from %s failed", pdu, self.peer)
                response = ExceptionResponse(fc, ExcCodes.DEVICE_FAILURE)
        elif fc in PASS_THROUGH_FUNCTIONS:
            await cast(Any, super()).handle_request()
            return
        else:
            response = ExceptionResponse(fc, ExcCodes.ILLEGAL_FUNCTION)
        response.transaction_id = pdu.transaction_id
        response.dev_id = pdu.dev_id
        cast(Any, self).server_send(response, addr)


def _new_handler(server: Any, gate: _Gate) -> _GuardedHandler:
    factory: Any = _GuardedHandler
    handler: _GuardedHandler = factory(
        server, server.trace_packet, server.trace_pdu, server.trace_connect
    )
    handler.gate = gate
    return handler


class _TcpServer(ModbusTcpServer):
    gate: _Gate

    def callback_new_connection(self) -> _GuardedHandler:
        return _new_handler(self, self.gate)


class _SerialServer(ModbusSerialServer):
    gate: _Gate

    def callback_new_connection(self) -> _GuardedHandler:
        return _new_handler(self, self.gate)


def _identity() -> Any:
    """What function 43/14 (read device identification) reports."""
    from pymodbus import ModbusDeviceIdentification

    from edge import __version__
    from plc.registers import MAP_VERSION

    factory: Any = ModbusDeviceIdentification
    return factory(
        info_name={
            "VendorName": "LineInspect",
            "ProductCode": "LINEINSPECT",
            "MajorMinorRevision": __version__,
            "ProductName": "LineInspect inspection appliance",
            "ModelName": f"register map v{MAP_VERSION}",
        }
    )


def _placeholder_device() -> SimDevice:
    """pymodbus wants a datastore; every request is answered by the gate instead."""
    return SimDevice(id=0, simdata=[SimData(address=0, count=1)])


class ModbusServerLink:
    """Runs the Modbus server in a daemon thread with its own asyncio loop."""

    def __init__(
        self,
        cfg: PlcConfig,
        core: Handshake,
        apply: Callable[[Effects], None],
        on_connection: Callable[[str, str, str], None],
    ) -> None:
        self._cfg = cfg
        self._gate = _Gate(cfg, core, apply, on_connection)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` or ``rtu:/dev/tty...`` served."""
        if self._cfg.transport == "rtu":
            return f"rtu:{self._cfg.serial_port}"
        return f"{self._cfg.host}:{self._cfg.port}"

    def start(self, timeout_s: float = 5.0) -> None:
        """Start listening; raises OSError when the port / serial line cannot be opened."""
        self._thread = threading.Thread(target=self._run, name="plc-modbus-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"Modbus server on {self.endpoint} did not start in {timeout_s} s")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._started.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        cfg = self._cfg
        self._stop = asyncio.Event()
        server: Any
        if cfg.transport == "rtu":
            server = _SerialServer(
                _placeholder_device(),
                port=cfg.serial_port,
                baudrate=cfg.baudrate,
                parity=cfg.parity,
                stopbits=cfg.stopbits,
                bytesize=8,
                identity=_identity(),
            )
        else:
            server = _TcpServer(
                _placeholder_device(), address=(cfg.host, cfg.port), identity=_identity()
            )
        server.gate = self._gate
        self._server = server
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            raise OSError(
                f"cannot open Modbus {cfg.transport.upper()} server on "
                f"{self.endpoint}: {exc} (port in use, no permission for "
                "ports < 1024, or missing serial device)"
            ) from None
        log.info("Modbus %s server listening on %s", cfg.transport.upper(), self.endpoint)
        self._started.set()
        await self._stop.wait()
        await server.shutdown()
        await asyncio.sleep(0.02)  # let requests already scheduled by pymodbus finish

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the listener and every connection; join the thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def peers(self) -> list[str]:
        """Connected clients as ``host:port``."""
        return self._gate.peers()
