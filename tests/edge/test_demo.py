"""`lineinspect demo`: cached model reuse, its configuration, and a short real run."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge.demo import DemoOptions, _cache_key, demo_config, ensure_demo_model
from tests.conftest import free_tcp_port

ROOT = Path(__file__).resolve().parents[2]


def _seed_cache(cache: Path, toy_package_dir: Path) -> Path:
    target = cache / f"demo-model-{_cache_key()}"
    shutil.copytree(toy_package_dir, target)
    return target


def test_cached_model_is_reused_without_teaching(tmp_path: Path, toy_package_dir: Path) -> None:
    target = _seed_cache(tmp_path, toy_package_dir)
    said: list[str] = []
    assert ensure_demo_model(DemoOptions(cache_dir=tmp_path), progress=said.append) == target
    assert said == []


def test_demo_config_is_valid() -> None:
    cfg = demo_config(DemoOptions(plc_port=5999, panel_port=8999), Path("/x/pkg"))
    assert cfg.camera.mode == "triggered"
    assert cfg.plc.enabled
    assert cfg.plc.port == 5999
    assert cfg.plc.host == "127.0.0.1"
    assert cfg.panel.host == "127.0.0.1"
    assert not cfg.uplink.enabled
    free = demo_config(DemoOptions(plc=False, panel=False), Path("/x/pkg"))
    assert free.camera.mode == "free_run"
    assert not free.plc.enabled


@pytest.mark.slow
def test_demo_runs_the_line_with_plc_simulator_and_panel(
    tmp_path: Path, toy_package_dir: Path
) -> None:
    _seed_cache(tmp_path / "cache", toy_package_dir)
    plc_port, panel_port = free_tcp_port(), free_tcp_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge.cli",
            "demo",
            "--cache",
            str(tmp_path / "cache"),
            "--workdir",
            str(tmp_path / "work"),
            "--plc-port",
            str(plc_port),
            "--panel-port",
            str(panel_port),
            "--ppm",
            "300",
            "--stats-interval",
            "1",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ},
    )
    lines: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        lines.extend(line.rstrip() for line in proc.stdout)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = [x for x in lines if "parts/s" in x]
            if stats and " OK 0  NG 0  ERROR 0" not in stats[-1]:
                break
            time.sleep(0.2)
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{panel_port}/login", timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    t.join(5)
    text = "\n".join(lines)
    assert proc.returncode == 0, text
    assert "line simulator" in text
    stats = [x for x in lines if "parts/s" in x]
    assert stats, text
    assert " OK 0  NG 0  ERROR 0" not in stats[-1], text
    assert (tmp_path / "work" / "results" / "results.sqlite").exists()


def test_demo_runs_fp32_when_int8_rejects_good_parts(tmp_path: Path, toy_package_dir: Path) -> None:
    from edge.demo import demo_graph
    from models.toy_package import build_toy_package

    assert demo_graph(toy_package_dir) == "auto"  # no hold-out metrics: the default
    bad = build_toy_package(
        tmp_path / "bad",
        metrics={
            "holdout_good": {"fp32": {"false_reject_rate": 0.0}, "int8": {"false_reject_rate": 1.0}}
        },
    )
    assert demo_graph(bad) == "fp32"
    assert demo_config(DemoOptions(), bad, graph="fp32").backend.primary.graph == "fp32"  # type: ignore[union-attr]
    fine = build_toy_package(
        tmp_path / "fine",
        metrics={
            "holdout_good": {
                "fp32": {"false_reject_rate": 0.0},
                "int8": {"false_reject_rate": 0.05},
            }
        },
    )
    assert demo_graph(fine) == "auto"
