"""Fixtures of the PLC tests (helpers live in plc_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.plc.plc_helpers import (
    Appliance,
    PlcClient,
    _make_appliance_fixture,
    _plc_client_fixture,
)


@pytest.fixture
def make_appliance() -> Iterator[Callable[..., Appliance]]:
    """Start PlcService + inspector thread on a fresh port; stopped at test end."""
    yield from _make_appliance_fixture()


@pytest.fixture
def plc_client() -> Iterator[Callable[..., PlcClient]]:
    """Sync pymodbus clients playing the PLC; closed at test end."""
    yield from _plc_client_fixture()
