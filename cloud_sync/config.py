"""Uplink (MQTT device agent) configuration.

Secrets (the MQTT password, a client key's pass phrase) come from a
:class:`~edge.config_base.SecretRef` (environment variable or file), never
from YAML. Paths are plain paths; the agent checks that they exist on start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from edge.config_base import SecretRef, StrictModel


class TlsConfig(StrictModel):
    """TLS towards the broker; a client certificate makes it mutual TLS."""

    enabled: bool = Field(False, title="TLS", description="Connect over TLS.")
    ca_file: Path | None = Field(
        None,
        title="CA certificate",
        description="PEM file of the CA that signed the broker's "
        "certificate; None uses the system trust store.",
    )
    cert_file: Path | None = Field(
        None, title="Client certificate", description="PEM client certificate for mutual TLS."
    )
    key_file: Path | None = Field(
        None, title="Client key", description="PEM private key of the client certificate."
    )
    key_password: SecretRef | None = Field(
        None,
        title="Client key pass phrase",
        description="Where the key's pass phrase comes from (environment variable or file).",
    )
    server_hostname_check: bool = Field(
        True,
        title="Check host name",
        description="Check that the broker's certificate "
        "names the host; only turn off on a test bench.",
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS needs both)")
        return self


class OutboxConfig(StrictModel):
    """The durable store-and-forward queue of verdict logs."""

    path: Path = Field(
        Path("var/uplink/outbox.sqlite"),
        title="Outbox file",
        description="SQLite file of the outbox.",
    )
    quota_mb: float = Field(
        256.0,
        gt=0,
        title="Disk quota (MB)",
        description="Largest size of queued records; past it the oldest "
        "OK records go first, then ERROR, NG last (counted).",
    )
    batch_size: int = Field(
        200, ge=1, le=10_000, title="Batch size", description="Records per MQTT message."
    )
    max_inflight_batches: int = Field(
        4,
        ge=1,
        le=100,
        title="Batches in flight",
        description="Batches sent and not yet acknowledged by the fleet's ingest.",
    )
    ack_timeout_s: float = Field(
        15.0,
        gt=0,
        title="Ack timeout (s)",
        description="Resend unacknowledged batches after this long.",
    )
    ack_mode: Literal["ingest", "broker"] = Field(
        "ingest",
        title="Delivery acknowledgement",
        description="'ingest': records leave the outbox only when the fleet's ingest "
        "acknowledged storing them (survives a broker crash); 'broker': the broker's PUBACK "
        "is enough (no ingest acks, e.g. a third-party consumer).",
    )
    historical_after_s: float = Field(
        60.0,
        gt=0,
        title="Historical after (s)",
        description="Records sent later than this after their "
        "verdict, or queued while offline, are marked historical.",
    )
    include_regions: bool = Field(
        True, title="Include regions", description="Send defect regions with each record."
    )


class TelemetryConfig(StrictModel):
    interval_s: float = Field(
        30.0,
        ge=0.2,
        title="Telemetry interval (s)",
        description="How often the agent publishes telemetry.",
    )


class HealthWatchConfig(StrictModel):
    """Automatic rollback after activating a new model."""

    window_s: float = Field(
        600.0,
        ge=0,
        title="Watch window (s)",
        description="How long after activation the new model is watched.",
    )
    min_verdicts: int = Field(
        20,
        ge=1,
        title="Minimum verdicts",
        description="Verdicts needed before judging the new model.",
    )
    max_error_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        title="Max ERROR share",
        description="Roll back when the share of ERROR verdicts "
        "passes this (and the old model's share plus 0.02).",
    )
    max_latency_ratio: float = Field(
        2.0,
        gt=1,
        title="Max latency ratio",
        description="Roll back when the p95 latency grows past "
        "this multiple of the old model's p95.",
    )


class UpdatesConfig(StrictModel):
    """Signed model updates received from the fleet."""

    enabled: bool = Field(
        True, title="Accept updates", description="Receive and install signed model releases."
    )
    slots_dir: Path = Field(
        Path("var/models"),
        title="Model slots folder",
        description="Folder holding the active, staged and previous "
        "model packages and the slot pointer file.",
    )
    trusted_keys: list[Path] = Field(
        default_factory=list,
        title="Trusted release keys",
        description="Ed25519 public keys (PEM) allowed to sign "
        "releases and packages; empty uses model.trusted_keys.",
    )
    group: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        title="Fleet group",
        description="Rollout group this device belongs to.",
    )
    max_package_mb: float = Field(
        512.0,
        gt=0,
        title="Largest package (MB)",
        description="Releases announcing a larger package are refused.",
    )
    chunk_window: int = Field(
        8, ge=1, le=256, title="Chunks in flight", description="Chunks requested ahead over MQTT."
    )
    chunk_timeout_s: float = Field(
        10.0, gt=0, title="Chunk timeout (s)", description="Request chunks again after this long."
    )
    health: HealthWatchConfig = Field(
        default_factory=HealthWatchConfig,
        title="Health watch",
        description="Rollback after a bad activation.",
    )


class UplinkConfig(StrictModel):
    """MQTT device agent: telemetry, verdict logs and model updates."""

    enabled: bool = Field(False, title="Enabled", description="Run the MQTT device agent.")
    host: str = Field("127.0.0.1", title="Broker host", description="MQTT broker host name.")
    port: int = Field(1883, ge=1, le=65535, title="Broker port", description="MQTT broker port.")
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        "auto",
        title="MQTT version",
        description="'auto' tries MQTT 5 and falls back to 3.1.1 when the broker refuses it.",
    )
    topic_prefix: str = Field(
        "lineinspect/v1",
        pattern=r"^[A-Za-z0-9_./-]{1,64}$",
        title="Topic prefix",
        description="Root of every topic.",
    )
    client_id: str | None = Field(
        None, title="Client id", description="MQTT client id; None uses the station's device id."
    )
    username: str | None = Field(
        None,
        title="User name",
        description="MQTT user name; None uses the device id when a password is set.",
    )
    password: SecretRef | None = Field(
        None, title="Password", description="Where the MQTT password comes from."
    )
    tls: TlsConfig = Field(
        default_factory=TlsConfig, title="TLS", description="TLS and mutual TLS settings."
    )
    keepalive_s: int = Field(
        30, ge=5, le=3600, title="Keep-alive (s)", description="MQTT keep-alive interval."
    )
    session_expiry_s: int = Field(
        3600,
        ge=0,
        title="Session expiry (s)",
        description="How long the broker keeps this device's session (MQTT 5) while it is away.",
    )
    reconnect_min_s: float = Field(
        0.5,
        gt=0,
        title="First retry (s)",
        description="First reconnect delay; doubles per failure.",
    )
    reconnect_max_s: float = Field(
        60.0, gt=0, title="Longest retry (s)", description="Upper bound of the reconnect delay."
    )
    max_incoming_bytes: int = Field(
        2_000_000,
        ge=1024,
        title="Largest incoming message",
        description="Incoming messages larger than this are rejected and counted.",
    )
    outbox: OutboxConfig = Field(
        default_factory=OutboxConfig, title="Outbox", description="Durable queue of verdict logs."
    )
    telemetry: TelemetryConfig = Field(
        default_factory=TelemetryConfig, title="Telemetry", description="Periodic device metrics."
    )
    updates: UpdatesConfig = Field(
        default_factory=UpdatesConfig,
        title="Model updates",
        description="Signed model releases from the fleet.",
    )
