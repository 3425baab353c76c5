"""End to end in real headless Chromium (Debian's, driven by Playwright) against the appliance.

The appliance (edge.app.Appliance) inspects the synthetic line with a real
model package in ONNX Runtime and serves the panel on a free port. One browser
session walks what a technician does on the first day: create the admin, watch
the live view, open an NG part with its heatmap, change the threshold and see
it on the next parts, a forged form refused by CSRF, add an operator who is
refused on Settings, and the language switch. Every page is saved as a
screenshot under artifacts/screenshots/.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_helpers import chromium_context
from panel_helpers import ADMIN

from edge.app import Appliance
from edge.config import LineInspectConfig
from edge.web.backend import PartQuery
from tests.conftest import free_tcp_port, require_tool

SHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
TOY_RAW_SCALE = 0.76
"""The toy brightness model's scale: puts threshold 1.0 near the synthetic parts' median
peak brightness, so the line shows both OK and NG parts."""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Appliance]]:
    from models.toy_package import build_toy_package

    pkg = build_toy_package(tmp_path / "pkg", raw_scale=TOY_RAW_SCALE)
    port = free_tcp_port()
    cfg = LineInspectConfig.model_validate(
        {
            "camera": {
                "mode": "free_run",
                "source": {
                    "type": "synthetic",
                    "parts_per_minute": 300,
                    "size_px": 160,
                    "defect_rate": 0.3,
                },
            },
            "model": {"package": str(pkg)},
            "store": {"path": str(tmp_path / "results"), "ok_sample_every": 2},
            "panel": {
                "port": port,
                "live_refresh_ms": 300,
                "password_hash_time_cost": 1,
                "password_hash_memory_kib": 8192,
            },
            "uplink": {"updates": {"slots_dir": str(tmp_path / "slots")}},
            "backend": {"primary": {"type": "onnxruntime", "intra_op_threads": 1}},
        }
    )
    app = Appliance(cfg, panel_data_dir=tmp_path / "panel")
    app.start()
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        app.stop()


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


@pytest.mark.slow
def test_technician_day_one(served: tuple[str, Appliance], tmp_path: Path) -> None:
    chromium = require_tool("chromium")
    base, line = served
    with chromium_context(chromium, tmp_path / "profile") as ctx:
        page = ctx.new_page()
        page.set_default_timeout(15_000)

        # -- first run: the panel asks for the admin account, no default password
        page.goto(base + "/")
        assert page.url.endswith("/setup")
        page.fill("#username", ADMIN[0])
        page.fill("#password", ADMIN[1])
        page.fill("#password2", ADMIN[1])
        shot(page, "01-setup")
        page.click("#create-admin")
        page.wait_for_url(re.compile(r"/live$"))

        # -- live view updates by itself
        page.wait_for_function("document.getElementById('part-id').textContent !== ''")
        first = page.text_content("#part-id")
        page.wait_for_function(f"document.getElementById('part-id').textContent !== {first!r}")
        page.wait_for_function(
            "document.getElementById('live-image').naturalWidth > 0 && "
            "document.querySelectorAll('#strip a').length >= 3"
        )
        page.wait_for_function("Number(document.getElementById('count-ok').textContent) > 0")
        shot(page, "02-live")

        # -- an NG part appears, with its heatmap
        ng = page.wait_for_selector("#strip a.v-ng")
        assert ng is not None
        ng_id = ng.get_attribute("data-id")
        line.store.flush_images(5)
        page.goto(f"{base}/parts/{ng_id}")
        assert page.text_content("#part-verdict") == "NG"
        page.wait_for_function(
            "document.getElementById('part-heatmap').complete && "
            "document.getElementById('part-heatmap').naturalWidth > 0"
        )
        shot(page, "03-part-ng")

        # -- threshold change takes effect on the next parts
        page.goto(base + "/live")
        page.fill("#threshold-input", "0.01")
        page.click("#threshold-apply")
        page.wait_for_url(re.compile(r"/live$"))
        latest = line.latest()
        assert latest is not None
        changed_at = latest.verdict.inspection_id
        page.wait_for_function(
            f"Number(document.getElementById('part-id').textContent.slice(1)) > {changed_at + 1}"
        )
        assert page.text_content("#verdict") == "NG"
        assert page.text_content("#threshold") == "0.010"
        parts = page.evaluate("fetch('/api/parts?limit=2').then(r => r.json())")["parts"]
        assert all(p["threshold"] == pytest.approx(0.01) for p in parts)
        assert all(p["code"] == "NG" for p in parts)
        shot(page, "04-live-after-threshold")

        # -- the other pages render (screenshots as artifacts)
        for name, path in (
            ("05-history", "/history?verdict=NG"),
            ("06-models", "/models"),
            ("07-settings", "/settings"),
            ("08-health", "/health"),
            ("09-teach", "/teach"),
            ("10-audit", "/audit"),
        ):
            resp = page.goto(base + path)
            assert resp is not None
            assert resp.status == 200, path
            shot(page, name)
        assert "threshold.set" in (page.text_content("#audit") or "")

        # -- models: activate a staged package and roll back, each after a confirmation.
        # (Two activations, then a rollback to the first; the config package's own
        # slot and rollback across restarts are covered in tests/edge/test_model_slots.py.)
        from models.toy_package import build_toy_package

        def activate(version: str) -> None:
            line.stage_model(
                build_toy_package(
                    tmp_path / f"pkg-{version}", version=version, raw_scale=TOY_RAW_SCALE
                )
            )
            page.goto(base + "/models")
            assert version in (page.text_content("#slot-staged") or "")
            page.click("#activate")
            page.wait_for_selector("#confirm-box")
            assert version not in (page.text_content("#slot-active") or ""), "not yet"
            shot(page, "06b-models-confirm")
            page.click("#confirm-yes")
            page.wait_for_url(re.compile(r"/models$"))
            assert version in (page.text_content("#slot-active") or "")

        activate("1.1.0")
        activate("1.2.0")
        assert "1.1.0" in (page.text_content("#slot-previous") or "")
        page.click("#rollback")
        page.click("#confirm-yes")
        page.wait_for_url(re.compile(r"/models$"))
        assert "1.1.0" in (page.text_content("#slot-active") or "")
        assert line.part(line.query_parts(PartQuery(limit=1)).parts[0].inspection_id)

        # -- a forged form (wrong CSRF token) is refused and changes nothing
        page.goto(base + "/live")
        page.evaluate("""() => {
            const f = document.createElement('form');
            f.method = 'post'; f.action = '/threshold';
            for (const [k, v] of [['csrf_token', 'forged-token'], ['threshold', '5']]) {
                const i = document.createElement('input');
                i.name = k; i.value = v; f.appendChild(i);
            }
            document.body.appendChild(f); f.submit();
        }""")
        page.wait_for_selector("#error-message")
        assert "CSRF" in (page.text_content("#error-message") or "")
        assert line.health().threshold == pytest.approx(0.01)
        shot(page, "11-csrf-refused")

        # -- add an operator, who is refused on Settings
        page.goto(base + "/users")
        page.fill("#new-username", "olga")
        page.fill("#new-password", "operator-pass")
        page.select_option("#new-role", "operator")
        page.click("#add-user-btn")
        page.wait_for_selector("#done")
        shot(page, "12-users")
        page.click("#logout")
        page.wait_for_url(re.compile(r"/login"))
        page.fill("#username", "olga")
        page.fill("#password", "operator-pass")
        shot(page, "13-login")
        page.click("#login")
        page.wait_for_url(re.compile(r"/live$"))
        assert page.locator("nav.tabs a[href='/settings']").count() == 0
        resp = page.goto(base + "/settings")
        assert resp is not None
        assert resp.status == 403
        assert page.locator("#error-message").count() == 1
        shot(page, "14-operator-refused")

        # -- language switch
        page.goto(base + "/live")
        page.click("#lang-zh_CN")
        page.wait_for_url(re.compile(r"/live$"))
        assert page.text_content("nav.tabs a[href='/history']") == "历史"
        page.wait_for_function("document.getElementById('part-id').textContent !== ''")
        time.sleep(0.5)
        shot(page, "15-live-zh")
        page.click("#lang-en")
        assert page.text_content("nav.tabs a[href='/history']") == "History"

        # -- the phone layout
        page.set_viewport_size({"width": 390, "height": 844})
        page.goto(base + "/live")
        page.wait_for_function("document.getElementById('live-image').naturalWidth > 0")
        shot(page, "16-live-phone")


@pytest.mark.slow
def test_teach_slider_predicts_rates(tmp_path: Path) -> None:
    """Upload good and defective samples, teach, move the threshold slider, promote."""
    import cv2
    from simline import SimLine
    from test_panel_teach import png, toy_argv

    from edge.web.config import PanelConfig
    from edge.web.server import PanelServer

    chromium = require_tool("chromium")
    line = SimLine(tmp_path / "line", parts_per_s=2.0)
    line.start()
    cfg = PanelConfig(
        port=free_tcp_port(), password_hash_time_cost=1, password_hash_memory_kib=8192
    )
    server = PanelServer(line, cfg, tmp_path / "panel", teach_argv=toy_argv)
    server.start()
    samples = tmp_path / "samples"
    for sub, defect, n in (("good", None, 5), ("bad", "missing_bolt", 4)):
        (samples / sub).mkdir(parents=True)
        for i in range(n):
            (samples / sub / f"{i}.png").write_bytes(png(defect, i + (50 if defect else 0)))
    try:
        with chromium_context(chromium, tmp_path / "profile") as ctx:
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            base = server.url
            page.goto(base + "/setup")
            page.fill("#username", ADMIN[0])
            page.fill("#password", ADMIN[1])
            page.fill("#password2", ADMIN[1])
            page.click("#create-admin")
            page.wait_for_url(re.compile(r"/live$"))
            for label, sub in (("good", "good"), ("test_good", "good"), ("missing_bolt", "bad")):
                page.goto(base + "/teach")
                page.fill("#upload-dataset", "flange-c")
                page.select_option("#upload-label", label)
                page.set_input_files(
                    "#upload-files", [str(p) for p in sorted((samples / sub).iterdir())]
                )
                page.click("#upload-btn")
                page.wait_for_url(re.compile(r"/teach\?dataset=flange-c"))
            page.click("#teach-btn")
            page.wait_for_selector("#teach-result", timeout=60_000)
            frr0, esc0 = page.text_content("#frr"), page.text_content("#escape")
            assert frr0
            assert esc0
            assert "%" in frr0
            assert "%" in esc0
            # slider to the far left: every good part rejected, nothing escapes
            page.eval_on_selector(
                "#threshold-slider", "s => { s.value = 0; s.dispatchEvent(new Event('input')); }"
            )
            assert page.text_content("#frr", timeout=2000).startswith("100.0%")
            assert page.text_content("#escape").startswith("0.0%")
            # far right: nothing rejected, every defective part escapes
            page.eval_on_selector(
                "#threshold-slider",
                "s => { s.value = s.max; s.dispatchEvent(new Event('input')); }",
            )
            assert page.text_content("#frr").startswith("0.0%")
            assert page.text_content("#escape").startswith("100.0%")
            shot(page, "17-teach-result")
            page.click("#promote-btn")
            page.wait_for_url(re.compile(r"/models$"))
            assert "flange-c" in (page.text_content("#slot-staged") or "")
            shot(page, "18-models-staged")
            assert cv2 is not None
    finally:
        server.stop()
        line.stop()
