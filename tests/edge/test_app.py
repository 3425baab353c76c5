"""The appliance: boot/stop order, triggered mode, PLC, panel protocol, model swap, CLI."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from edge.app import Appliance, ApplianceError, PrintVerdicts
from edge.config import LineInspectConfig
from edge.store import ResultStore
from edge.types import StatusEvent, VerdictCode
from edge.watchdog import SystemdNotifier
from edge.web.backend import PanelBackend, PartQuery
from tests.conftest import free_tcp_port

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp: Path, pkg: Path, **over: Any) -> LineInspectConfig:
    data: dict[str, Any] = {
        "camera": {
            "mode": "free_run",
            "source": {"type": "synthetic", "parts_per_minute": 1200, "size_px": 64},
        },
        "model": {"package": str(pkg)},
        "store": {"path": str(tmp / "results"), "ok_sample_every": 5},
        "panel": {"enabled": False},
        "uplink": {"updates": {"slots_dir": str(tmp / "slots")}},
        "backend": {"primary": {"type": "onnxruntime", "intra_op_threads": 1}},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v}
    return LineInspectConfig.model_validate(data)


@pytest.fixture
def app_factory(tmp_path: Path) -> Iterator[Any]:
    apps: list[Appliance] = []

    def make(cfg: LineInspectConfig, **kw: Any) -> Appliance:
        a = Appliance(cfg, **kw)
        apps.append(a)
        return a

    yield make
    for a in apps:
        a.stop()


def test_free_run_inspects_and_implements_the_panel_protocol(
    tmp_path: Path, toy_package_dir: Path, app_factory: Any
) -> None:
    lines: list[str] = []
    app = app_factory(_cfg(tmp_path, toy_package_dir), sinks=[PrintVerdicts(lines.append)])
    app.start()
    deadline = time.monotonic() + 20
    while len(lines) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(lines) >= 5
    assert isinstance(app, PanelBackend)
    live = app.latest()
    assert live is not None
    assert live.image.shape[:2] == (64, 64)
    page = app.query_parts(PartQuery(limit=3))
    assert page.total >= 5
    assert len(page.parts) == 3
    part = app.part(page.parts[0].inspection_id)
    assert part is not None
    assert part.model_name == "toy-brightness"
    st = app.stats(0.0, 60.0)
    assert st.total >= 5
    h = app.health()
    assert h.camera_connected
    assert h.backend_name.startswith("primary onnxruntime")
    assert h.plc_connected is None
    assert h.store_path == tmp_path / "results"
    with pytest.raises(ValueError, match="positive"):
        app.set_threshold(-1.0)
    app.set_threshold(50.0)
    assert app.current_threshold() == 50.0
    slots = app.model_slots()
    assert [s.slot.value for s in slots] == ["active", "staged", "previous"]
    assert slots[0].name == "toy-brightness"
    assert any(e.kind == "appliance.started" for e in app.recent_events(50))


def test_triggered_mode_one_verdict_per_trigger(
    tmp_path: Path, toy_package_dir: Path, app_factory: Any
) -> None:
    before = sys.getswitchinterval()
    app = app_factory(
        _cfg(
            tmp_path,
            toy_package_dir,
            camera={"mode": "triggered"},
            pipeline={"python_switch_interval_ms": 0.7},
        )
    )
    app.start()
    assert sys.getswitchinterval() == pytest.approx(0.0007)
    time.sleep(0.2)
    v = app.trigger(41)
    assert v.trigger_id == 41
    assert v.code in (VerdictCode.OK, VerdictCode.NG)
    stored = app.store.get(v.inspection_id)
    assert stored is not None
    assert stored.trigger_id == 41
    app.capture.stop()  # the camera goes away: the next part is an ERROR, never skipped
    v = app.trigger(42)
    assert v.code is VerdictCode.ERROR
    assert "capture" in v.error
    assert app.store.get(v.inspection_id) is not None
    app.stop()
    assert sys.getswitchinterval() == pytest.approx(before)  # the process's own, restored


def test_plc_triggers_get_verdicts_over_modbus(
    tmp_path: Path, toy_package_dir: Path, app_factory: Any
) -> None:
    from plc.sim import SimSettings, run_line

    port = free_tcp_port()
    app = app_factory(
        _cfg(
            tmp_path,
            toy_package_dir,
            camera={"mode": "triggered"},
            plc={"enabled": True, "port": port},
        )
    )
    app.start()
    report = run_line(
        SimSettings(
            port=port, ppm=300, parts=8, respect_ready=True, late_ms=2000, connect_timeout_s=10
        )
    )
    assert report.results == 8, report.table()
    assert report.lost == 0
    assert report.mismatched == 0
    rows, total = app.store.query(limit=100)
    assert total >= 8
    assert {r.trigger_id for r in rows} >= set(range(1, 9))
    assert app.health().plc_connected is not None


def test_model_swap_and_refused_package(
    tmp_path: Path, toy_package_dir: Path, toy_rgb_package_dir: Path, app_factory: Any
) -> None:
    seen: list[StatusEvent] = []
    app = app_factory(_cfg(tmp_path, toy_package_dir, camera={"mode": "triggered"}))
    app.events.subscribe(seen.append)
    app.start()
    assert app.trigger(1).model_name == "toy-brightness"
    app.swap_model(toy_rgb_package_dir)
    assert app.trigger(2).model_name == "toy-rgb"
    assert any(e.kind == "model.swapped" for e in seen)
    app._follow_slots()  # the supervisor's slot check must not undo a direct swap
    assert app.trigger(2).model_name == "toy-rgb"
    with pytest.raises(ApplianceError, match="not_found"):
        app.swap_model(tmp_path / "nope")
    assert app.trigger(3).model_name == "toy-rgb"


def test_stage_activate_rollback_via_slots(
    tmp_path: Path, toy_package_dir: Path, toy_rgb_package_dir: Path, app_factory: Any
) -> None:
    app = app_factory(_cfg(tmp_path, toy_package_dir, camera={"mode": "triggered"}))
    app.start()
    staged = app.stage_model(toy_rgb_package_dir)
    assert staged.name == "toy-rgb"
    active = app.activate_staged()
    assert active.name == "toy-rgb"
    assert app.trigger(1).model_name == "toy-rgb"
    # model.package was installed as a slot at start-up: it is the one to roll back to
    back = app.rollback()
    assert back.name == "toy-brightness"
    assert app.trigger(2).model_name == "toy-brightness"
    with pytest.raises(ValueError, match="no previous"):
        app.rollback()
    with pytest.raises(ValueError, match="no staged"):
        app.activate_staged()
    with pytest.raises(ValueError, match="refused"):
        app.stage_model(tmp_path / "missing")


def test_apply_config_live_and_restart(
    tmp_path: Path, toy_package_dir: Path, app_factory: Any
) -> None:
    path = tmp_path / "cfg.yaml"
    cfg = _cfg(tmp_path, toy_package_dir, camera={"mode": "triggered"})
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    app = app_factory(cfg, config_path=path)
    app.start()
    new = cfg.model_copy(
        update={
            "pipeline": cfg.pipeline.model_copy(update={"threshold": 0.2}),
            "station": cfg.station.model_copy(update={"name": "renamed"}),
        }
    )
    res = app.apply_config(new)
    assert res.applied == ("pipeline.threshold",)
    assert res.restart_required == ("station",)
    assert app.trigger(1).threshold == 0.2
    saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert saved["station"]["name"] == "renamed"
    assert app.config().station.name != "renamed"  # only after a restart


def test_start_failure_stops_what_started(tmp_path: Path, toy_package_dir: Path) -> None:
    cfg = _cfg(
        tmp_path, toy_package_dir, backend={"primary": {"type": "onnxruntime", "provider": "cuda"}}
    )
    app = Appliance(cfg)
    with pytest.raises(ApplianceError, match="CUDAExecutionProvider"):
        app.start()
    # the store was closed again: another store can open the same folder
    s = ResultStore(cfg.store)
    s.start()
    s.stop()
    no_model = Appliance(
        _cfg(
            tmp_path,
            toy_package_dir,
            model={"package": None},
            uplink={"updates": {"slots_dir": str(tmp_path / "empty-slots")}},
        )
    )
    with pytest.raises(ApplianceError, match="no model package"):
        no_model.start()


# ------------------------------------------------------------------ subprocess / CLI


def _write_cfg(tmp: Path, pkg: Path, **over: Any) -> Path:
    cfg = _cfg(tmp, pkg, **over)
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    return path


def _spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _read_verdicts(proc: subprocess.Popen[str], n: int, timeout_s: float) -> list[str]:
    lines: list[str] = []
    got = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("verdict "):
                lines.append(line.strip())
                if len(lines) >= n:
                    got.set()
        got.set()

    threading.Thread(target=reader, daemon=True).start()
    got.wait(timeout_s)
    return lines


@pytest.mark.slow
def test_sigkill_loses_no_reported_verdict(tmp_path: Path, toy_package_dir: Path) -> None:
    cfg = _write_cfg(tmp_path, toy_package_dir)
    proc = _spawn(["run", "--config", str(cfg), "--print-verdicts"])
    try:
        lines = _read_verdicts(proc, 25, 60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    reported = list(lines)  # every line printed before the kill
    assert len(reported) >= 25, proc.stderr.read() if proc.stderr else ""
    store = ResultStore(_cfg(tmp_path, toy_package_dir).store)
    store.start()
    try:
        for line in reported:
            m = re.match(r"verdict id=(\d+) (OK|NG|ERROR) ", line)
            assert m, line
            row = store.get(int(m.group(1)))
            assert row is not None, f"reported but not stored: {line}"
            assert row.code.name == m.group(2)
        last = max(int(re.match(r"verdict id=(\d+)", x).group(1)) for x in reported)  # type: ignore[union-attr]
        assert store.next_id > last
    finally:
        store.stop()


@pytest.mark.slow
def test_sigterm_stops_in_reverse_order_with_sd_notify(
    tmp_path: Path, toy_package_dir: Path
) -> None:
    cfg = _write_cfg(tmp_path, toy_package_dir)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    proc = _spawn(
        ["-v", "run", "--config", str(cfg), "--print-verdicts"],
        env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"},
    )
    try:
        messages: list[str] = []
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert any("READY=1" in m for m in messages)
        _read_verdicts(proc, 3, 30)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        sock.settimeout(2)
        with contextlib.suppress(TimeoutError):
            while True:
                messages.append(sock.recv(4096).decode())
        assert any("STOPPING=1" in m for m in messages)
    finally:
        sock.close()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    started = re.findall(r"lineinspect: (\w+): (?!stopped)", err)
    stopped = [p for p in re.findall(r"lineinspect: (\w+): stopped", err) if p != "appliance"]
    parts = [p for p in started if p in {"store", "backend", "pipeline", "capture"}]
    assert parts == ["store", "backend", "pipeline", "capture"]
    assert stopped == ["capture", "pipeline", "backend", "store"]


def test_sd_notify_is_a_noop_without_systemd() -> None:
    n = SystemdNotifier({})
    assert not n.enabled
    assert not n.notify("READY=1")
    assert n.watchdog_interval_s is None
    assert (
        SystemdNotifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000"}).watchdog_interval_s
        == 1.0
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("camera: [1, 2\n", "fix the YAML syntax"),
        ("camra: {}\n", "camra"),
        ("backend: {primary: {type: openvino}}\n", "backend.primary"),
        ("pipeline: {min_defect_area_px: -3}\n", "pipeline.min_defect_area_px"),
        ("store: {image_quota_mb: 0.5}\n", "image_quota_mb"),
        ("- a list\n", "mapping"),
    ],
)
def test_config_errors_are_named(
    tmp_path: Path, content: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(content, encoding="utf-8")
    assert main(["run", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_run_with_missing_package_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge.cli import main

    cfg = _write_cfg(tmp_path, tmp_path / "no-such-package")
    assert main(["run", "--config", str(cfg)]) == 1
    assert "not_found" in capsys.readouterr().err


def test_doctor_reports_machine_and_choice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from edge.cli import main

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "CPUExecutionProvider" in out
    assert "config gets   primary: onnxruntime:cpu" in out
    path = tmp_path / "trt.yaml"
    path.write_text(
        "backend: {primary: {type: tensorrt}, fallback: {type: onnxruntime}}\n", encoding="utf-8"
    )
    assert main(["doctor", "--config", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["choice"]["label"] in ("tensorrt:int8", "onnxruntime:cpu")
    if data["backends"]["tensorrt"] is not None:
        assert data["choice"]["selected"] == "fallback"
        assert "TensorRT" in data["choice"]["reasons"]["primary"]
        path.write_text("backend: {primary: {type: tensorrt}}\n", encoding="utf-8")
        assert main(["doctor", "--config", str(path)]) == 1
        assert "NO BACKEND" in capsys.readouterr().out


def test_overlay_and_heatmap_are_images() -> None:
    from edge.overlay import draw_overlay
    from edge.types import Region

    img = np.zeros((48, 64), np.uint8)
    amap = np.zeros((16, 16), np.float32)
    amap[4:8, 4:8] = 3.0
    out = draw_overlay(
        img, amap, (Region(10, 10, 8, 8, 64, 3.0),), VerdictCode.NG, pixel_threshold=1.0
    )
    assert out.shape == (48, 64, 3)
    assert out[12, 12].any()


def test_follows_model_slots_moved_by_another_process(
    tmp_path: Path, toy_package_dir: Path, toy_rgb_package_dir: Path, app_factory: Any
) -> None:
    from cloud_sync.slots import SlotStore
    from models.package import pack_tar

    slots = SlotStore(tmp_path / "slots")
    slots.install(pack_tar(toy_package_dir, tmp_path / "a.tar"), "toy-a", "1.0.0")
    app = app_factory(
        _cfg(tmp_path, toy_package_dir, camera={"mode": "triggered"}, model={"package": None}),
        uplink_in_process=False,
    )
    app.start()
    assert app.trigger(1).model_name == "toy-brightness"
    # the uplink service (another process) activates a new release
    SlotStore(tmp_path / "slots").install(
        pack_tar(toy_rgb_package_dir, tmp_path / "b.tar"), "toy-b", "2.0.0"
    )
    deadline = time.monotonic() + 10
    while app.trigger(2).model_name != "toy-rgb":
        assert time.monotonic() < deadline, "the appliance did not follow the slots"
        time.sleep(0.2)


@pytest.mark.slow
def test_uplink_agent_ships_stored_verdicts(
    tmp_path: Path, toy_package_dir: Path, app_factory: Any
) -> None:
    import paho.mqtt.client as mqtt

    from tests.conftest import require_tool

    exe = require_tool("mosquitto")
    port = free_tcp_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n", encoding="utf-8"
    )
    broker = subprocess.Popen(
        [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)
        got: list[str] = []
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        sub.on_message = lambda _c, _u, msg: got.append(msg.topic)
        sub.connect("127.0.0.1", port)
        sub.subscribe("#", qos=1)
        sub.loop_start()
        app = app_factory(
            _cfg(
                tmp_path,
                toy_package_dir,
                camera={"mode": "triggered"},
                uplink={
                    "enabled": True,
                    "port": port,
                    "outbox": {"path": str(tmp_path / "outbox.sqlite"), "ack_mode": "broker"},
                },
            )
        )
        app.start()
        for i in range(3):
            app.trigger(i + 1)
        deadline = time.monotonic() + 20
        while not any(t.endswith("/logs") for t in got):
            assert time.monotonic() < deadline, f"no verdict log batch; topics: {set(got)}"
            time.sleep(0.1)
        assert app.health().uplink_state == "connected"
        sub.loop_stop()
        sub.disconnect()
    finally:
        broker.terminate()
        broker.wait(10)
