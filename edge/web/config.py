"""Web panel configuration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edge.config_base import StrictModel


class PanelConfig(StrictModel):
    """The technician web panel: where it listens and how it guards access."""

    enabled: bool = Field(True, title="Enabled", description="Serve the technician web panel.")
    host: str = Field(
        "127.0.0.1",
        title="Bind address",
        description="Address to listen on; never all interfaces unless set here.",
    )
    port: int = Field(8080, ge=1, le=65535, title="HTTP port", description="Panel HTTP port.")
    language: Literal["en", "zh_CN"] = Field(
        "en",
        title="Default language",
        description="Language of the panel until a user picks another one.",
    )
    session_ttl_s: float = Field(
        8 * 3600.0,
        ge=60,
        le=30 * 86400,
        title="Session lifetime (s)",
        description="A login expires after this many seconds.",
    )
    secure_cookies: bool = Field(
        False,
        title="Secure cookies",
        description="Mark cookies Secure (only sent over HTTPS); set when behind a TLS proxy.",
    )
    login_max_failures: int = Field(
        5,
        ge=1,
        le=100,
        title="Login attempts",
        description="Failed logins allowed per client address and per user within the window.",
    )
    login_window_s: float = Field(
        300.0,
        ge=1,
        le=86400,
        title="Login window (s)",
        description="Window for counting failed logins; further attempts are refused until "
        "it passes.",
    )
    password_hash_time_cost: int = Field(
        3,
        ge=1,
        le=20,
        title="Password hash passes",
        description="argon2id time cost (iterations) for password hashes.",
    )
    password_hash_memory_kib: int = Field(
        65536,
        ge=1024,
        le=1048576,
        title="Password hash memory (KiB)",
        description="argon2id memory per password hash; lower only on very small devices.",
    )
    metrics_public: bool = Field(
        False,
        title="Public /metrics",
        description="Serve Prometheus /metrics without a token (otherwise a bearer API token "
        "is required).",
    )
    live_refresh_ms: int = Field(
        1000,
        ge=200,
        le=60000,
        title="Live refresh (ms)",
        description="How often the Live page asks for the latest part.",
    )
