"""`model.package` is the station's initial model: it becomes a slot, and what the fleet or
the panel activates afterwards survives a restart (real packages, real ONNX Runtime)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cloud_sync.slots import CONFIG_MARKER, SlotStore
from edge.app import Appliance, ApplianceError
from edge.config import LineInspectConfig
from edge.types import StatusEvent
from models.toy_package import build_toy_package


def _cfg(tmp: Path, pkg: Path) -> LineInspectConfig:
    return LineInspectConfig.model_validate(
        {
            "camera": {
                "mode": "triggered",
                "source": {"type": "synthetic", "parts_per_minute": 1200, "size_px": 64},
            },
            "model": {"package": str(pkg)},
            "store": {"path": str(tmp / "results")},
            "panel": {"enabled": False},
            "uplink": {"updates": {"slots_dir": str(tmp / "slots")}},
            "backend": {"primary": {"type": "onnxruntime", "intra_op_threads": 1}},
        }
    )


def _run(cfg: LineInspectConfig, seen: list[StatusEvent] | None = None) -> Appliance:
    app = Appliance(cfg)
    if seen is not None:
        app.events.subscribe(seen.append)
    app.start()
    return app


def _version(app: Appliance) -> str:
    state = app.pipeline.model
    assert state is not None
    return str(state.package.manifest.version)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slot-pkgs")
    return {v: build_toy_package(root / v, version=v) for v in ("1.0.0", "1.1.0", "2.0.0")}


def test_activation_survives_a_restart_and_rolls_back_to_the_config_package(
    tmp_path: Path, packages: dict[str, Path]
) -> None:
    cfg = _cfg(tmp_path, packages["1.0.0"])
    app = _run(cfg)
    try:
        ptr = SlotStore(tmp_path / "slots").read()
        assert ptr.active is not None
        assert ptr.versions[ptr.active] == "1.0.0"
        assert ptr.previous is None
        app.stage_model(packages["1.1.0"])
        assert app.activate_staged().version == "1.1.0"
    finally:
        app.stop()
    # a restart keeps what was activated: model.package is not a pin
    app = _run(cfg)
    try:
        assert _version(app) == "1.1.0"
        assert app.trigger(1).model_version == "1.1.0"
        assert app.rollback().version == "1.0.0"
        assert app.trigger(2).model_version == "1.0.0"
    finally:
        app.stop()


def test_a_new_model_package_in_the_config_is_installed_over_the_active_slot(
    tmp_path: Path, packages: dict[str, Path]
) -> None:
    app = _run(_cfg(tmp_path, packages["1.0.0"]))
    app.stop()
    app = _run(_cfg(tmp_path, packages["2.0.0"]))
    try:
        assert _version(app) == "2.0.0"
        ptr = SlotStore(tmp_path / "slots").read()
        assert ptr.previous is not None
        assert ptr.versions[ptr.previous] == "1.0.0"
        marker = json.loads((tmp_path / "slots" / CONFIG_MARKER).read_text())
        assert marker["slot"] == ptr.active
    finally:
        app.stop()


def test_a_refused_config_package_falls_back_to_the_active_slot_with_an_event(
    tmp_path: Path, packages: dict[str, Path]
) -> None:
    app = _run(_cfg(tmp_path, packages["1.0.0"]))
    app.stop()
    tampered = tmp_path / "tampered"
    shutil.copytree(packages["2.0.0"], tampered)
    onnx = next(tampered.glob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:-8] + b"tampered")
    seen: list[StatusEvent] = []
    app = _run(_cfg(tmp_path, tampered), seen)
    try:
        assert _version(app) == "1.0.0"
        refused = [e for e in seen if e.kind == "model.config_refused"]
        assert refused
        assert "sha256" in refused[0].message or "hash" in refused[0].message
    finally:
        app.stop()


def test_a_refused_config_package_with_no_slot_to_fall_back_on_is_a_start_error(
    tmp_path: Path, packages: dict[str, Path]
) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(packages["1.0.0"], tampered)
    onnx = next(tampered.glob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:-8] + b"tampered")
    app = Appliance(_cfg(tmp_path, tampered))
    with pytest.raises(ApplianceError, match=r"model\.package"):
        app.start()
