"""The panel on the real appliance (edge.app.Appliance), through the ASGI client.

Triggered mode, so each part is made on demand: history, part pages and images
from the real result store; settings applied live or saved for a restart by
the appliance itself; the configuration file rewritten; metrics from the
appliance's own counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from panel_helpers import setup_admin
from test_panel_api import form_values

from edge.app import Appliance
from edge.config import LineInspectConfig
from edge.web.config import PanelConfig
from edge.web.server import create_app


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Appliance]:
    from models.toy_package import build_toy_package

    pkg = build_toy_package(tmp_path / "pkg", raw_scale=0.76)
    data = {
        "camera": {"mode": "triggered", "source": {"type": "synthetic", "size_px": 96}},
        "model": {"package": str(pkg)},
        "store": {"path": str(tmp_path / "results"), "ok_sample_every": 1},
        "panel": {"enabled": False},
        "uplink": {"updates": {"slots_dir": str(tmp_path / "slots")}},
        "backend": {"primary": {"type": "onnxruntime", "intra_op_threads": 1}},
    }
    cfg_file = tmp_path / "lineinspect.yaml"
    cfg_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    app = Appliance(
        LineInspectConfig.model_validate(data),
        config_path=cfg_file,
        panel_data_dir=tmp_path / "panel",
    )
    app.start()
    yield app
    app.stop()


@pytest.fixture
def panel(appliance: Appliance, tmp_path: Path) -> tuple[TestClient, str]:
    cfg = PanelConfig(password_hash_time_cost=1, password_hash_memory_kib=8192)
    c = TestClient(create_app(appliance, cfg, tmp_path / "panel"))
    return c, setup_admin(c)


@pytest.mark.slow
def test_panel_on_the_appliance(
    panel: tuple[TestClient, str], appliance: Appliance, tmp_path: Path
) -> None:
    c, csrf = panel
    verdicts = [appliance.trigger(i) for i in range(1, 9)]
    appliance.store.flush_images(10)
    live = c.get("/api/live").json()
    assert live["part"]["inspection_id"] == verdicts[-1].inspection_id
    assert live["stats"]["total"] == 8
    assert c.get(live["live_image_url"]).content[:2] == b"\xff\xd8"
    page = c.get("/api/parts", params={"limit": 3}).json()
    assert page["total"] == 8
    assert page["parts"][0]["trigger_id"] == 8
    part = page["parts"][0]
    assert part["image_url"]
    assert c.get(part["image_url"]).status_code == 200
    assert c.get(f"/parts/{part['inspection_id']}").status_code == 200
    assert c.get("/history").status_code == 200
    csv_rows = c.get("/api/parts.csv").text.strip().splitlines()
    assert len(csv_rows) == 9

    # a live setting and a restart setting through the Settings form
    values = form_values(c.get("/settings").text)
    r = c.post(
        "/settings",
        data={
            **values,
            "csrf_token": csrf,
            "pipeline.threshold": "0.05",
            "station.name": "press-7",
        },
    )
    assert r.status_code == 200, r.text
    assert "pipeline.threshold" in r.text
    assert "station" in r.text
    assert appliance.trigger(9).threshold == pytest.approx(0.05)
    saved = yaml.safe_load((tmp_path / "lineinspect.yaml").read_text(encoding="utf-8"))
    assert saved["station"]["name"] == "press-7"
    assert saved["pipeline"]["threshold"] == 0.05
    audit = c.get("/api/audit").json()[0]
    assert audit["action"] == "config.apply"
    assert audit["new"]["station.name"] == "press-7"

    # health and metrics from the appliance
    health = c.get("/api/health").json()
    assert health["backend_name"]
    assert health["threshold"] == pytest.approx(0.05)
    token = c.post(
        "/users", data={"csrf_token": csrf, "action": "token", "name": "prom", "username": "admin"}
    ).text.split('id="new-token">')[1]
    metrics = (
        TestClient(c.app)
        .get("/metrics", headers={"Authorization": f"Bearer {token.split('<')[0]}"})
        .text
    )
    assert "lineinspect_verdicts_total" in metrics
    assert "lineinspect_backend_latency_p50_ms" in metrics
