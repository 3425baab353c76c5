"""PLC (Modbus) configuration: the ``plc:`` section of the one config file.

The register layout itself is not configurable (see :mod:`plc.registers`);
only where it sits (``base_address``), the 32-bit word order and the limits
that the handshake enforces are.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edge.config_base import StrictModel


class PlcConfig(StrictModel):
    """Modbus link to the line's PLC (server, client, TCP or RTU)."""

    enabled: bool = Field(False, title="Enabled", description="Serve / talk Modbus to a PLC.")
    host: str = Field(
        "127.0.0.1",
        title="Address",
        description="Server mode: address the Modbus TCP server listens on. "
        "Client mode: address of the PLC to connect to.",
    )
    port: int = Field(
        5020,
        ge=1,
        le=65535,
        title="TCP port",
        description="Server mode: port to listen on (502 needs root). "
        "Client mode: the PLC's Modbus TCP port.",
    )
    mode: Literal["server", "client"] = Field(
        "server",
        title="Mode",
        description="server: the PLC polls this appliance (the vision-system convention). "
        "client: this appliance writes its blocks into the PLC's holding registers and "
        "polls the PLC's control block.",
    )
    transport: Literal["tcp", "rtu"] = Field(
        "tcp",
        title="Transport",
        description="Modbus TCP, or Modbus RTU over the serial line in serial_port.",
    )
    allowed_clients: list[str] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        title="Allowed clients",
        description="Server mode over TCP: IP addresses or networks (CIDR) allowed to "
        "connect; any other connection is refused and logged. Empty list = allow any.",
    )
    unit_id: int = Field(
        1,
        ge=1,
        le=247,
        title="Unit id",
        description="Modbus device (slave) id. RTU: requests for other "
        "ids are ignored. TCP server: any unit id is answered. Client "
        "mode: the PLC's unit id.",
    )
    base_address: int = Field(
        0,
        ge=0,
        le=65535,
        title="Base address",
        description="Zero-based protocol address where the register "
        "map starts (server and client mode alike).",
    )
    word_order: Literal["high_first", "low_first"] = Field(
        "high_first",
        title="32-bit word order",
        description="high_first: the high 16 bits are in the lower address (Modbus "
        "big-endian, 'ABCD'). low_first: low word first ('CDAB', e.g. some Siemens/Delta "
        "setups).",
    )
    result_buffer_depth: int = Field(
        8,
        ge=1,
        le=256,
        title="Result buffer depth",
        description="Results kept until the PLC acknowledges "
        "them; a result that does not fit sets OVERRUN.",
    )
    verdict_deadline_ms: int = Field(
        500,
        ge=10,
        le=60000,
        title="Verdict deadline (ms)",
        description="A trigger without a verdict after this "
        "long gets an ERROR result; a later verdict is "
        "dropped.",
    )
    max_parts_in_flight: int = Field(
        4,
        ge=1,
        le=64,
        title="Parts in flight",
        description="Triggers accepted before the previous "
        "verdicts arrived; READY drops at this count.",
    )
    heartbeat_period_ms: int = Field(
        100,
        ge=10,
        le=10000,
        title="Heartbeat period (ms)",
        description="The heartbeat register advances by one "
        "per period while the pipeline is healthy.",
    )
    heartbeat_timeout_ms: int = Field(
        1000,
        ge=50,
        le=60000,
        title="Pipeline watchdog (ms)",
        description="No sign of a healthy pipeline for this "
        "long: heartbeat stops, FAULT is set and READY drops.",
    )
    score_scale: int = Field(
        1000,
        ge=1,
        le=10000,
        title="Score scale",
        description="Score and threshold registers hold "
        "round(value * score_scale), saturated to 0..65534 "
        "(65535 = no score).",
    )
    defect_classes: list[str] = Field(
        default_factory=lambda: ["anomaly"],
        title="Defect classes",
        description="Defect class codes: the n-th name is code n (1-based); "
        "0 = none, 65535 = a class not in this list.",
    )
    recipe_id_max: int = Field(
        999,
        ge=1,
        le=65535,
        title="Highest recipe id",
        description="Recipe ids 1..recipe_id_max may be written; "
        "anything else is ILLEGAL DATA VALUE.",
    )
    recipe_timeout_ms: int = Field(
        30000,
        ge=100,
        le=600000,
        title="Recipe timeout (ms)",
        description="A recipe handler that has not returned this long after it was "
        "called fails the change (CMD_FAILED, COMMAND_RESULT = 7 TIMEOUT); the old "
        "recipe stays active and parts are accepted again.",
    )
    trigger_events: bool = Field(
        True,
        title="Per-part events",
        description="Publish a plc.trigger status event per "
        "trigger (turn off at very high part rates).",
    )
    client_poll_interval_ms: int = Field(
        10,
        ge=1,
        le=5000,
        title="Client poll interval (ms)",
        description="Client mode: how often the PLC's control block is read.",
    )
    client_timeout_s: float = Field(
        1.0,
        gt=0,
        le=60,
        title="Client timeout (s)",
        description="Client mode: connect / response timeout.",
    )
    reconnect_delay_s: float = Field(
        0.5,
        gt=0,
        le=60,
        title="Reconnect delay (s)",
        description="Client mode: first delay before "
        "reconnecting to a PLC that went away (doubles to 5 s).",
    )
    serial_port: str = Field(
        "/dev/ttyUSB0", title="Serial port", description="RTU: the serial device."
    )
    baudrate: int = Field(
        19200, ge=1200, le=921600, title="Baud rate", description="RTU: line speed."
    )
    parity: Literal["N", "E", "O"] = Field(
        "E", title="Parity", description="RTU: N, E (Modbus default) or O."
    )
    stopbits: Literal[1, 2] = Field(1, title="Stop bits", description="RTU: 1 or 2.")

    @field_validator("allowed_clients")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
        return value

    @field_validator("defect_classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        if len(value) > 1000:
            raise ValueError("at most 1000 defect classes")
        if len(set(value)) != len(value) or any(not v for v in value):
            raise ValueError("defect class names must be unique and non-empty")
        return value

    @model_validator(mode="after")
    def _fits(self) -> PlcConfig:
        from plc.registers import MAP_SIZE

        if self.base_address + MAP_SIZE > 65536:
            raise ValueError(f"base_address + {MAP_SIZE} registers must fit below 65536")
        return self
