"""The MQTT topic namespace and the payload schemas (see docs/mqtt.md).

Every topic lives under ``{prefix}/dev/{device}/...`` so one ACL pattern
(``%u`` = device id) confines a device to its own topics. Payloads are UTF-8
JSON validated by the pydantic models below, except model chunks, which are
binary (:func:`encode_chunk`). Every JSON payload carries ``"v": 1``.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z.-]+)?$"
)
SHA256_RE = r"^[0-9a-f]{64}$"


class PayloadError(ValueError):
    """A message that does not match its schema (the reason names the problem)."""


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names of one device under one prefix."""

    prefix: str
    device: str

    def __post_init__(self) -> None:
        if not DEVICE_ID_RE.match(self.device):
            raise ValueError(f"device id {self.device!r} is not allowed in topics")

    @property
    def base(self) -> str:
        return f"{self.prefix}/dev/{self.device}"

    # device -> fleet
    @property
    def state(self) -> str:
        """Retained online/offline state (the Will publishes offline here)."""
        return f"{self.base}/state"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def logs(self) -> str:
        """Batches of verdict log records."""
        return f"{self.base}/logs"

    @property
    def events(self) -> str:
        """Status events (camera lost, update staged...)."""
        return f"{self.base}/events"

    @property
    def update_status(self) -> str:
        """Retained: every state change of the current model update."""
        return f"{self.base}/update/status"

    @property
    def chunk_request(self) -> str:
        return f"{self.base}/update/chunk/req"

    # fleet -> device
    @property
    def logs_ack(self) -> str:
        return f"{self.base}/logs/ack"

    @property
    def release(self) -> str:
        """Retained: the release assigned to this device (or a cancel)."""
        return f"{self.base}/update/release"

    @property
    def chunk(self) -> str:
        return f"{self.base}/update/chunk"


def fleet_filter(prefix: str, leaf: str) -> str:
    """Topic filter matching ``leaf`` of every device, e.g. ``logs``."""
    return f"{prefix}/dev/+/{leaf}"


def device_from_topic(prefix: str, topic: str) -> str | None:
    """The device id in a topic under ``prefix``, or None when it is not one."""
    head = f"{prefix}/dev/"
    if not topic.startswith(head):
        return None
    device = topic[len(head) :].split("/", 1)[0]
    return device if DEVICE_ID_RE.match(device) else None


class Payload(BaseModel):
    """Base of every JSON payload: unknown keys are errors, instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[1] = 1

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode("utf-8")


P = TypeVar("P", bound=Payload)


def parse_payload(model: type[P], data: bytes, max_bytes: int) -> P:
    """Decode and validate one message, or raise :class:`PayloadError` with the reason."""
    if len(data) > max_bytes:
        raise PayloadError(f"payload of {len(data)} bytes is larger than {max_bytes}")
    try:
        obj: Any = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"not UTF-8 JSON: {exc}") from None
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise PayloadError(f"{model.__name__}: {where}: {first['msg']}") from None


class DeviceState(Payload):
    """Retained on ``.../state``; the Will sets ``online`` false."""

    device: str
    online: bool
    group: str = ""
    model_name: str = ""
    model_version: str = ""
    agent_version: str = ""
    protocol: str = ""
    since_unix: float = 0.0
    reason: str = ""


class LatencyStats(Payload):
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None


class CodeCounts(Payload):
    ok: int = 0
    ng: int = 0
    error: int = 0


class Telemetry(Payload):
    """Published every ``telemetry.interval_s`` on ``.../telemetry``."""

    device: str
    time_unix: float
    interval_s: float
    throughput_pps: float = Field(description="Verdicts per second over the interval.")
    latency: LatencyStats
    counts: CodeCounts = Field(description="Verdicts per code over the interval.")
    counts_total: CodeCounts
    dropped_frames: int | None = None
    outbox_depth: int
    outbox_bytes: int
    outbox_dropped: CodeCounts
    rejected_messages: int
    disk_free_mb: float | None = None
    disk_used_pct: float | None = None
    cpu_temp_c: float | None = None
    gpu_temp_c: float | None = None
    cpu_pct: float | None = None
    model_name: str = ""
    model_version: str = ""
    connected_since_unix: float | None = None


class RegionRecord(Payload):
    x: int
    y: int
    w: int
    h: int
    area_px: int
    peak_score: float
    defect_class: str = "anomaly"


class VerdictRecord(Payload):
    """One verdict log record as it travels to the fleet."""

    seq: int = Field(ge=1, lt=2**63, description="Per-device sequence (dedup key).")
    historical: bool = Field(False, description="Sent late (after an outage).")
    store_id: int | None = None
    inspection_id: int
    code: Literal["OK", "NG", "ERROR"]
    score: float | None
    threshold: float
    trigger_id: int | None = None
    source_id: str = ""
    defect_class: str = ""
    regions: list[RegionRecord] = Field(default_factory=list)
    model_name: str = ""
    model_version: str = ""
    timings_ms: dict[str, float] = Field(default_factory=dict)
    error: str = ""
    decided_unix: float


class LogBatch(Payload):
    """Records ``first_seq..last_seq`` (in order, no gaps except dropped ones)."""

    device: str
    first_seq: int
    last_seq: int
    sent_unix: float
    records: list[VerdictRecord] = Field(min_length=1)
    dropped: CodeCounts = Field(
        default_factory=CodeCounts, description="Records dropped by the outbox quota so far."
    )


class LogAck(Payload):
    """Ingest stored ``first_seq..last_seq`` (the device may forget them)."""

    first_seq: int
    last_seq: int


class EventMessage(Payload):
    device: str
    kind: str
    source: str
    severity: str
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)
    time_unix: float


class RolloutSettings(Payload):
    """How the fleet side stages a release; carried in the signed manifest."""

    canary_share: float = Field(0.1, ge=0, le=1, description="Share of the group updated first.")
    failure_threshold: float = Field(
        0.2, ge=0, le=1, description="Pause when this share of a stage fails."
    )
    stage_timeout_s: float = Field(
        1800.0, gt=0, description="A stage device silent this long counts as failed."
    )


class ReleaseManifest(Payload):
    """What is signed: one model package released to a group."""

    release_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,80}$")
    package_name: str = Field(min_length=1, max_length=128)
    version: str = Field(pattern=SEMVER_RE.pattern)
    sha256: str = Field(pattern=SHA256_RE)
    size_bytes: int = Field(gt=0)
    chunk_size: int = Field(gt=0, le=8 * 1024 * 1024)
    chunk_sha256: list[str] = Field(description="sha256 of every chunk, in order.")
    url: str | None = Field(
        None,
        description="HTTP(S) URL of the package (range requests); "
        "None sends it in chunks over MQTT.",
    )
    target_group: str
    rollback: bool = Field(False, description="Explicit, signed downgrade.")
    created_unix: float
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)

    @property
    def chunk_count(self) -> int:
        return (self.size_bytes + self.chunk_size - 1) // self.chunk_size


class SignedRelease(Payload):
    """The manifest with a detached Ed25519 signature over its canonical bytes."""

    manifest: ReleaseManifest
    key_id: str = Field(description="sha256 (hex, first 16) of the raw public key.")
    signature: str = Field(description="Base64 Ed25519 signature.")


class ReleaseCommand(Payload):
    """Retained on ``.../update/release``: install a release, or cancel one."""

    action: Literal["install", "cancel"]
    release_id: str
    release: SignedRelease | None = None


UpdatePhase = Literal[
    "offered",
    "refused",
    "downloading",
    "downloaded",
    "verified",
    "staged",
    "validating",
    "validated",
    "activating",
    "active",
    "watching",
    "done",
    "failed",
    "rolled_back",
    "cancelled",
]


class UpdateStatus(Payload):
    """Retained on ``.../update/status``: every state change of an update."""

    device: str
    release_id: str
    version: str = ""
    phase: UpdatePhase
    ok: bool = True
    message: str = ""
    progress: float | None = None
    active_version: str = ""
    time_unix: float


class ChunkRequest(Payload):
    release_id: str
    indexes: list[int] = Field(min_length=1, max_length=256)


CHUNK_MAGIC = b"LIC1"
_HEAD = struct.Struct(">4sIQI")  # magic, chunk index, reserved, release id length


def encode_chunk(release_id: str, index: int, data: bytes) -> bytes:
    """Binary chunk: magic, u32 index, u64 reserved, u32 id length, id, data."""
    rid = release_id.encode("utf-8")
    return _HEAD.pack(CHUNK_MAGIC, index, 0, len(rid)) + rid + data


def decode_chunk(payload: bytes) -> tuple[str, int, bytes]:
    """(release_id, index, data) of a chunk message, or :class:`PayloadError`."""
    if len(payload) < _HEAD.size:
        raise PayloadError("chunk shorter than its header")
    magic, index, _reserved, rid_len = _HEAD.unpack_from(payload)
    if magic != CHUNK_MAGIC:
        raise PayloadError("chunk with a wrong magic")
    end = _HEAD.size + rid_len
    if rid_len > 80 or len(payload) < end:
        raise PayloadError("chunk with a bad release id length")
    try:
        release_id = payload[_HEAD.size : end].decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("chunk release id is not UTF-8") from None
    return release_id, int(index), payload[end:]


def semver_key(version: str) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
    """Sort key of a semantic version (a pre-release sorts before its release)."""
    m = SEMVER_RE.match(version)
    if not m:
        raise ValueError(f"{version!r} is not a semantic version")
    major, minor, patch, pre = m.group(1), m.group(2), m.group(3), m.group(4)
    pre_key: tuple[tuple[int, int | str], ...] = ()
    if pre:
        pre_key = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return (int(major), int(minor), int(patch), 0 if pre else 1, pre_key)
