"""Fixtures for the web panel: a running synthetic line, the app, a logged-in client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from panel_helpers import setup_admin
from simline import SimLine

from edge.web.config import PanelConfig
from edge.web.server import create_app


@pytest.fixture
def line(tmp_path: Path) -> Iterator[SimLine]:
    sim = SimLine(tmp_path / "line", parts_per_s=20.0)
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def panel_cfg() -> PanelConfig:
    return PanelConfig(
        login_max_failures=3,
        login_window_s=60,
        password_hash_time_cost=1,
        password_hash_memory_kib=8192,
    )


@pytest.fixture
def client(line: SimLine, panel_cfg: PanelConfig, tmp_path: Path) -> TestClient:
    return TestClient(create_app(line, panel_cfg, tmp_path / "panel"))


@pytest.fixture
def admin(client: TestClient) -> tuple[TestClient, str]:
    """A client logged in as the first admin, and its CSRF token."""
    return client, setup_admin(client)
