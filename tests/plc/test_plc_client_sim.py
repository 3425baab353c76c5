"""The line simulator against the appliance, in server and client mode, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge.types import VerdictCode
from plc.sim import LineSimulator, SimSettings, percentile, run_line
from tests.conftest import free_tcp_port
from tests.plc.plc_helpers import Appliance, Inspector

MakeApp = Callable[..., Appliance]


def test_sim_server_mode_checks_every_id(make_appliance: MakeApp) -> None:
    app = make_appliance()
    report = run_line(SimSettings(port=app.cfg.port, ppm=3000, parts=60, first_part_id=1000))
    assert report.clean, report.table()
    assert report.parts == 60
    assert report.results == 60
    assert report.ng == 12
    assert report.ok == 48
    assert report.lost == report.mismatched == report.duplicated == report.missed == 0
    assert 0 < report.p50_ms <= report.p95_ms <= report.p99_ms <= report.max_ms
    assert app.inspector.triggers == list(range(1000, 1060))
    assert report.appliance_overruns == 0
    # the simulator reports its own scan period (poll jitter), start to start
    assert report.scans > 60
    assert 0 < report.scan_p50_ms <= report.scan_p99_ms <= report.scan_max_ms
    assert report.scan_p50_ms >= 1.0  # paced at the 2 ms scan time, not a busy loop
    assert report.scan_mean_ms >= 1.0
    assert "simulator scan mean / p50 / p99 / max" in report.table()


def test_sim_counts_deadline_errors_never_ok(make_appliance: MakeApp) -> None:
    insp = Inspector(delay_s=0.12)
    app = make_appliance(inspector=insp, verdict_deadline_ms=50, max_parts_in_flight=16)
    report = run_line(SimSettings(port=app.cfg.port, ppm=600, parts=6))
    assert report.results == 6
    assert report.ok == report.ng == 0
    assert report.error_results == 6
    assert report.deadline_errors == 6
    assert report.lost == report.mismatched == 0
    assert not report.clean


def test_sim_in_client_mode_and_plc_that_goes_away(make_appliance: MakeApp) -> None:
    """The appliance as Modbus client: the PLC (sim) stops its server and comes back."""
    port = free_tcp_port()
    app = make_appliance(
        mode="client", port=port, client_poll_interval_ms=2, reconnect_delay_s=0.1, wait_ready=False
    )
    s = SimSettings(port=port, mode="client", ppm=1200, parts=20, connect_timeout_s=10)
    first = run_line(s)  # the sim serves, then shuts its server down
    assert first.clean, first.table()
    assert first.results == 20
    app.wait_event("plc.disconnected", timeout_s=5)
    assert not app.service.status()["connected"]
    time.sleep(0.3)  # a couple of failed reconnect attempts
    second = run_line(
        SimSettings(
            port=port, mode="client", ppm=1200, parts=20, first_part_id=5000, connect_timeout_s=10
        )
    )
    assert second.clean, second.table()
    assert app.inspector.triggers[-20:] == list(range(5000, 5020))
    kinds = app.kinds()
    assert kinds.count("plc.connected") >= 2
    assert app.service.status()["counters"]["results"] == 40


def test_background_simulator_can_be_stopped(make_appliance: MakeApp) -> None:
    app = make_appliance()
    sim = LineSimulator(SimSettings(port=app.cfg.port, ppm=600, parts=100000))
    sim.start()
    time.sleep(0.5)
    sim.stop()
    report = sim.join(10)
    assert 0 < report.parts < 100000
    assert report.lost == 0
    assert report.results == report.parts


def test_sim_reports_a_missing_appliance_clearly() -> None:
    from plc.sim import SimulatorError

    with pytest.raises(SimulatorError, match="cannot connect"):
        run_line(SimSettings(port=free_tcp_port(), parts=1, connect_timeout_s=0.5))


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([3.0], 99) == 3.0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", "plc-sim", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_plc_sim_cli_table_and_json(make_appliance: MakeApp, tmp_path: Path) -> None:
    app = make_appliance(inspector=Inspector(code_for=lambda pid: VerdictCode.OK))
    out = tmp_path / "sim.json"
    proc = _cli("--port", str(app.cfg.port), "--ppm", "1200", "--parts", "15", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "latency p50 / p95 / p99 / max" in proc.stdout
    data = json.loads(out.read_text())
    assert data["parts"] == 15
    assert data["ok"] == 15
    assert data["mismatched"] == 0
    assert len(data["latencies_ms"]) == 15


def test_plc_sim_cli_bad_input() -> None:
    proc = _cli("--ppm", "0")
    assert proc.returncode == 2
    assert "must be > 0" in proc.stderr
    proc = _cli("--parts", "many")
    assert proc.returncode == 2
    assert "not a number" in proc.stderr
    proc = _cli("--port", str(free_tcp_port()), "--parts", "1", "--timeout-s", "1")
    assert proc.returncode == 1
    assert "cannot connect" in proc.stderr


def test_sim_respecting_ready_waits_instead_of_erroring(make_appliance: MakeApp) -> None:
    """A line that stops for the appliance: no NOT_READY errors while it is offline."""
    app = make_appliance()
    app.service.set_health(ready=False, fault_code=1, message="camera lost")
    sim = LineSimulator(
        SimSettings(
            port=app.cfg.port, ppm=1200, parts=10, respect_ready=True, connect_timeout_s=0.2
        )
    )
    sim.start()
    time.sleep(0.4)
    assert app.inspector.triggers == []
    app.service.set_health(ready=True)
    report = sim.join(10)
    assert report.clean, report.table()
    assert report.parts == 10
    assert report.missed == 0


def test_sim_survives_an_appliance_restart(make_appliance: MakeApp) -> None:
    """Server mode: the appliance goes away mid-run and comes back on the same port."""
    from edge.events import EventBus
    from plc.service import PlcService

    app = make_appliance()
    sim = LineSimulator(
        SimSettings(port=app.cfg.port, ppm=1200, parts=40, connect_timeout_s=10, result_timeout_s=2)
    )
    sim.start()
    time.sleep(0.6)
    app.service.stop()
    time.sleep(0.3)
    insp = Inspector()
    svc = PlcService(app.cfg, EventBus(), insp.on_trigger)
    insp.service = svc
    svc.start()
    import threading

    worker = threading.Thread(target=insp.run, daemon=True)
    worker.start()
    try:
        report = sim.join(30)
    finally:
        insp.stop()
        svc.stop()
        worker.join(2)
    assert report.comm_errors >= 1
    assert report.parts == 40
    assert report.mismatched == 0
    assert report.duplicated == 0
    assert report.results + report.lost == report.parts
    assert report.lost <= 3  # at most the parts in flight when it went away
    assert insp.triggers  # the restarted appliance got the rest of the line
