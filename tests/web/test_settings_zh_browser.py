"""The Settings page in Simplified Chinese, in real headless Chromium against the appliance.

The appliance (edge.app.Appliance) inspects the synthetic line with the toy
model package and serves the panel with ``panel.language: zh_CN``. An admin
opens Settings at 1280x800: the section tabs, legends, field titles, group
headings and option labels are Chinese, switching the camera source shows
the alternative's Chinese fields, the page does not overflow sideways with
CJK text, and a bad value comes back with a Chinese message next to its
field; at phone width the form still fits. Screenshots go to artifacts/screenshots/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_helpers import chromium_context
from panel_helpers import ADMIN

from edge.app import Appliance
from edge.config import LineInspectConfig
from edge.web.translate import schema_catalog
from tests.conftest import free_tcp_port, require_tool

SHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"


@pytest.fixture
def served_zh(tmp_path: Path) -> Iterator[str]:
    from models.toy_package import build_toy_package

    pkg = build_toy_package(tmp_path / "pkg")
    port = free_tcp_port()
    cfg = LineInspectConfig.model_validate(
        {
            "camera": {
                "mode": "free_run",
                "source": {"type": "synthetic", "parts_per_minute": 120, "size_px": 128},
            },
            "model": {"package": str(pkg)},
            "store": {"path": str(tmp_path / "results")},
            "panel": {
                "port": port,
                "language": "zh_CN",
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
        yield f"http://127.0.0.1:{port}"
    finally:
        app.stop()


def shot(page: Any, name: str, full_page: bool = False) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def visible_text(page: Any, selector: str) -> str:
    return str(page.locator(selector).first.inner_text()).strip()


@pytest.mark.slow
def test_settings_in_chinese(served_zh: str, tmp_path: Path) -> None:
    chromium = require_tool("chromium")
    base = served_zh
    zh = schema_catalog("zh_CN")
    with chromium_context(chromium, tmp_path / "profile") as ctx:
        page = ctx.new_page()
        page.set_default_timeout(30_000)

        page.goto(base + "/")
        assert page.url.endswith("/setup")
        page.fill("#username", ADMIN[0])
        page.fill("#password", ADMIN[1])
        page.fill("#password2", ADMIN[1])
        page.click("#create-admin")
        page.wait_for_url(re.compile(r"/live$"))

        page.goto(base + "/settings")
        assert page.locator("html").get_attribute("lang") == "zh-CN"
        tabs = page.locator("nav.section-tabs a").all_inner_texts()
        assert [t.strip() for t in tabs[:4]] == ["工位", "相机", "模型", "推理后端"]
        assert visible_text(page, "#sec-pipeline legend") == zh["pipeline"]["title"]
        assert visible_text(page, "label[for='f-camera.mode']") == "采集模式"
        assert visible_text(page, "label[for='f-pipeline.threshold']").startswith(
            "图像阈值（覆盖）"
        )
        assert visible_text(page, "label[for='f-plc.verdict_deadline_ms']") == "判定时限 (ms)"
        help_text = visible_text(page, "[data-field='plc.mode'] .help")
        assert help_text == zh["plc.mode"]["description"]
        selected = page.eval_on_selector(
            "#f-camera\\.mode", "s => s.options[s.selectedIndex].textContent"
        )
        assert selected == "连续采集（free_run）"

        # the union selector shows the chosen alternative's (Chinese) fields only
        assert page.locator("h4[data-group='camera.source@synthetic']").is_visible()
        assert not page.locator("h4[data-group='camera.source@device']").is_visible()
        page.select_option("#f-camera\\.source\\.type", "device")
        device = page.locator("h4[data-group='camera.source@device']")
        assert device.is_visible()
        assert device.inner_text().strip() == "图像来源：本地相机"
        assert visible_text(page, "label[for='f-camera.source@device.fps']").startswith(
            "帧率 (fps)"
        )
        assert not page.locator("h4[data-group='camera.source@synthetic']").is_visible()
        page.select_option("#f-camera\\.source\\.type", "synthetic")

        # CJK text wraps inside the 1280 px layout: nothing wider than the window
        overflow = page.evaluate(
            """() => {
              const wide = document.documentElement.scrollWidth > window.innerWidth;
              const cut = [...document.querySelectorAll('.settings .field > label, legend, h4')]
                .filter(e => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1)
                .map(e => e.textContent.trim());
              return {wide, cut};
            }"""
        )
        assert overflow == {"wide": False, "cut": []}
        shot(page, "19-settings-zh")
        page.evaluate("window.scrollTo(0, document.getElementById('sec-plc').offsetTop - 60)")
        shot(page, "20-settings-zh-plc")

        # a bad value: refused, with the reason in Chinese next to its field
        page.fill("#f-plc\\.port", "70000")
        page.fill("#f-camera\\.source\\@synthetic\\.defect_rate", "2")
        page.click("#settings-apply")
        page.wait_for_selector("#settings-errors")
        assert "有 2 个字段需要修改" in visible_text(page, "#settings-errors")
        assert visible_text(page, "[id='err-plc.port']") == "必须小于或等于 65535"
        err = visible_text(page, "[id='err-camera.source@synthetic.defect_rate']")
        assert err.startswith("必须小于或等于 1")
        page.evaluate("window.scrollTo(0, document.getElementById('sec-plc').offsetTop - 60)")
        shot(page, "21-settings-zh-error")

        # the phone layout holds the Chinese form too
        page.set_viewport_size({"width": 390, "height": 844})
        page.goto(base + "/settings")
        page.wait_for_selector("#sec-camera")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.evaluate("window.scrollTo(0, document.getElementById('sec-camera').offsetTop - 60)")
        shot(page, "22-settings-zh-phone")
