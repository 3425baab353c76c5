"""deploy/jetson: systemd units verify, the example config loads, sd_notify contract."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from edge.config import load_config
from tests.conftest import require_tool

JETSON = Path(__file__).resolve().parents[2] / "deploy" / "jetson"
UNITS = sorted(JETSON.glob("*.service"))


def test_units_exist() -> None:
    assert {u.name for u in UNITS} == {
        "lineinspect.service",
        "lineinspect-uplink.service",
        "lineinspect-engine.service",
    }


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze")
    exe = tmp_path / "lineinspect"
    exe.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    exe.chmod(0o755)
    copies = []
    for unit in UNITS:
        text = unit.read_text(encoding="utf-8").replace(
            "/opt/lineinspect/venv/bin/lineinspect", str(exe)
        )
        copy = tmp_path / unit.name
        copy.write_text(text, encoding="utf-8")
        copies.append(str(copy))
    out = subprocess.run(
        [tool, "verify", "--man=no", *copies],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    problems = [line for line in out.stderr.splitlines() if str(tmp_path) in line]
    assert problems == []


def test_appliance_unit_has_restart_and_watchdog() -> None:
    text = (JETSON / "lineinspect.service").read_text(encoding="utf-8")
    assert "Type=notify" in text
    assert "WatchdogSec=" in text
    assert "Restart=always" in text
    assert "--no-uplink" in text
    uplink = (JETSON / "lineinspect-uplink.service").read_text(encoding="utf-8")
    assert "lineinspect agent" in uplink
    assert "Restart=always" in uplink


def test_example_config_is_valid() -> None:
    cfg = load_config(JETSON / "config.example.yaml")
    assert cfg.backend.primary.type == "tensorrt"
    assert cfg.backend.fallback is not None
    assert cfg.backend.fallback.type == "onnxruntime"


@pytest.mark.parametrize("name", ["Dockerfile", "install.sh", "99-lineinspect-camera.rules"])
def test_recipe_files_present(name: str) -> None:
    assert (JETSON / name).stat().st_size > 100
