"""The CLI assembles every package's sub-commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge.cli import build_parser, main


def test_help_lists_commands() -> None:
    parser = build_parser()
    text = parser.format_help()
    assert "lineinspect" in text


def test_no_command_prints_help_and_exits_2() -> None:
    assert main([]) == 2


def test_module_entry_point_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edge.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("lineinspect ")


def test_cli_does_not_import_torch() -> None:
    code = "import sys, edge.cli; edge.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_help_lists_foundation_commands() -> None:
    text = build_parser().format_help()
    for command in ("config", "synth", "capture"):
        assert command in text


def test_capture_command_reports_rate_and_drops(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["capture", "--seconds", "1.5", "--consumer-ms", "30", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames"] >= 2
    assert summary["source_id"] == "camera0"
    assert summary["state"] == "stopped"
    for key in ("fps", "drops", "corrupt", "reconnects", "mean_fps"):
        assert key in summary


def test_capture_command_triggered_with_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "camera:\n  mode: triggered\n  source:\n    type: synthetic\n    size_px: 64\n",
        encoding="utf-8",
    )
    snap = tmp_path / "last.png"
    rc = main(
        [
            "capture",
            "--config",
            str(cfg),
            "--seconds",
            "1",
            "--trigger-hz",
            "10",
            "--snapshot",
            str(snap),
            "--json",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mode"] == "triggered"
    assert summary["frames"] == summary["triggers"] - summary["trigger_failures"]
    assert snap.stat().st_size > 0


def test_capture_command_bad_config_and_dead_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("camera:\n  source:\n    type: nope\n", encoding="utf-8")
    assert main(["capture", "--config", str(bad), "--seconds", "1"]) == 2
    assert "camera.source" in capsys.readouterr().err
    dead = tmp_path / "dead.yaml"
    dead.write_text(
        f"camera:\n  source:\n    type: folder\n    path: {tmp_path}/none\n", encoding="utf-8"
    )
    assert main(["capture", "--config", str(dead), "--seconds", "0.5"]) == 1  # no frames
    assert "0 frames" in capsys.readouterr().out
