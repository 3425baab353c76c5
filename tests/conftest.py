"""Shared fixtures: free loopback ports, required outside tools, scratch dirs.

Outside tools (mosquitto, mbpoll, chromium, socat) are required: with
CI=true a missing one fails the test instead of skipping it, since the test
command installs them.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_port() -> int:
    return free_tcp_port()


def find_tool(name: str) -> str | None:
    for cand in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def require_tool(name: str) -> str:
    """Path of an outside tool; fails under CI, skips elsewhere, when missing."""
    path = find_tool(name)
    if path is None:
        msg = f"'{name}' is not installed (run: bash scripts/setup-system.sh test)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def tool() -> Callable[[str], str]:
    return require_tool


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests need an NVIDIA GPU; without one they are skipped with the reason."""
    has_gpu = Path("/dev/nvidia0").exists() or Path("/dev/nvhost-ctrl").exists()
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="no NVIDIA GPU on this machine (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
