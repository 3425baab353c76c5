"""The Settings page in Simplified Chinese.

The zh_CN catalogue (``edge/web/i18n/zh_CN.schema.json``) is checked against
the live configuration schema walked by the form builder, so a config field,
section or union alternative cannot ship untranslated, and a translation
cannot outlive its field or the English text it was made from. Then the page
itself (through the ASGI client on the synthetic line): every label, heading
and option in Chinese, the form still submitting the same values, and its
validation messages in Chinese.
"""

from __future__ import annotations

import html
import re
import string
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import Field
from pydantic_core._pydantic_core import list_all_errors
from simline import SimLine
from test_panel_api import form_values

from edge.config import LineInspectConfig, StationConfig
from edge.web.schemaform import (
    SourceText,
    build_form,
    check_catalog,
    localize,
    source_texts,
)
from edge.web.translate import (
    LANGUAGES,
    schema_catalog,
    schema_catalog_path,
    validation_catalog,
    validation_message,
)
from edge.web.translate import main as translate_main

CJK = re.compile(r"[\u4e00-\u9fff]")
LITERAL = re.compile(
    r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b"  # key names: auto_exposure, recipe_id_max
    r"|\b[a-z][a-z0-9_]+(?:\.[a-z][a-z0-9_]+)+\b"  # dotted: backend.hung, results.sqlite
    r"|\b[A-Z][A-Z0-9_]+\b"  # constants and acronyms: READY, CMD_FAILED, V4L2, MQTT
)
UNIT = re.compile(r"\((ms|s|MB|KiB|px|fps)\)")
NOT_CJK_TITLES = {
    "PLC",
    "TLS",
    "GPU",
    "TensorRT",
    "TensorRT FP16",
    "TensorRT INT8",
    "ONNX Runtime",
}
"""zh titles that are rightly acronyms or product names only."""


def live_sources() -> dict[str, SourceText]:
    return source_texts(build_form(LineInspectConfig.model_json_schema()))


@pytest.mark.parametrize("lang", [code for code in LANGUAGES if code != "en"])
def test_catalogue_covers_the_live_schema(lang: str) -> None:
    """Fails when a config field/section/alternative has no entry in the language's
    catalogue, when the file holds a key that no longer exists, or when the English
    text changed since it was translated."""
    assert schema_catalog_path(lang).is_file()
    check = check_catalog(live_sources(), schema_catalog(lang))
    assert check.ok, "\n" + check.report(f"edge/web/i18n/{lang}.schema.json")


def test_catalogue_check_flags_new_removed_and_changed_texts() -> None:
    station_field = LineInspectConfig.model_fields["station"]

    class NewStation(StationConfig):
        line_no: int = Field(1, title="Line number", description="Number of the line.")

    class NewConfig(LineInspectConfig):
        station: NewStation = Field(  # type: ignore[assignment]
            default_factory=NewStation,
            title=station_field.title,
            description=station_field.description,
        )

    cat = dict(schema_catalog("zh_CN"))
    sources = source_texts(build_form(NewConfig.model_json_schema()))
    check = check_catalog(sources, cat)
    assert check.missing == ["station.line_no"]
    assert not check.unknown
    assert not check.stale
    assert not check.problems

    cat["station.retired"] = {"title": "旧字段", "src": "0"}
    assert check_catalog(live_sources(), cat).unknown == ["station.retired"]

    changed = dict(live_sources())
    old = changed["plc.verdict_deadline_ms"]
    changed["plc.verdict_deadline_ms"] = SourceText("Verdict deadline (s)", old.description)
    assert check_catalog(changed, schema_catalog("zh_CN")).stale == ["plc.verdict_deadline_ms"]

    mode = changed["camera.mode"]
    changed["camera.mode"] = SourceText(mode.title, mode.description, (*mode.options, "burst"))
    problems = check_catalog(changed, schema_catalog("zh_CN")).problems
    assert any(p.startswith("camera.mode: options") for p in problems), problems

    bad = dict(schema_catalog("zh_CN"))
    bad["station.name"] = {"title": "", "src": bad["station.name"]["src"]}
    problems = check_catalog(live_sources(), bad).problems
    assert "station.name: no title" in problems
    assert "station.name: description missing" in problems


def test_translate_cli_lists_gaps(capsys: pytest.CaptureFixture[str]) -> None:
    assert translate_main([]) == 0
    assert capsys.readouterr().out.strip() == "complete"
    assert translate_main(["--stub"]) == 0
    assert capsys.readouterr().out.strip() == "{}"


def test_zh_texts_are_chinese_and_keep_units_and_literals() -> None:
    cat = schema_catalog("zh_CN")
    for key, src in live_sources().items():
        entry = cat[key]
        title, desc = entry["title"], entry.get("description", "")
        assert CJK.search(title) or title in NOT_CJK_TITLES, (key, title)
        if src.description:
            assert CJK.search(desc), (key, desc)
        for literal in LITERAL.findall(src.description):
            assert literal in desc, f"{key}: {literal!r} must stay as is in {desc!r}"
        for unit in UNIT.findall(src.title):
            assert f"({unit})" in title, f"{key}: unit ({unit}) must stay in {title!r}"
        for value, label in entry.get("options", {}).items():
            assert label.strip(), (key, value)


def test_zh_validation_templates_match_pydantic_errors() -> None:
    cat = validation_catalog("zh_CN")
    known = {e["type"]: set(e.get("example_context") or {}) for e in list_all_errors()}
    for kind, template in cat.items():
        if kind.startswith("_"):
            continue
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
        # pydantic's own types (ip_any_address, path_type...) carry no context
        assert names <= known.get(kind, set()), (kind, names)
        assert CJK.search(template), kind
    assert "{msg}" in cat["_fallback"]
    assert validation_catalog("en") == {}

    err: dict[str, Any] = {"type": "greater_than", "msg": "Input should be greater than 0"}
    err["ctx"] = {"gt": 0}
    assert validation_message("zh_CN", err) == "必须大于 0"
    assert validation_message("en", err) == "Input should be greater than 0"
    lit = {"type": "literal_error", "msg": "x", "ctx": {"expected": "'tcp' or 'rtu'"}}
    assert validation_message("zh_CN", lit) == "应为 'tcp' 或 'rtu'"
    own = {
        "type": "value_error",
        "msg": "Value error, bad or worse",
        "ctx": {"error": "bad or worse"},
    }
    assert validation_message("zh_CN", own) == "取值无效：bad or worse"
    odd = {"type": "no_such_type_here", "msg": "Something odd"}
    assert validation_message("zh_CN", odd) == "输入无效：Something odd"


LABEL = re.compile(r'<label for="f-([^"]+)">([^<]*)')
LEGEND = re.compile(r'<fieldset id="sec-([^"]+)"[^>]*>\s*<legend>([^<]*)')
HEADING = re.compile(r'<h4 [^>]*data-group="([^"]+)">([^<]*)</h4>')


def test_settings_page_in_zh(admin: tuple[TestClient, str], line: SimLine) -> None:
    c, csrf = admin
    sections = build_form(LineInspectConfig.model_json_schema())
    fields = {f.path: f for s in sections for f in s.fields}
    cat = schema_catalog("zh_CN")

    en_page = c.get("/settings").text
    labels_en = {p: html.unescape(t).strip() for p, t in LABEL.findall(en_page)}
    assert labels_en["camera.mode"] == "Acquisition mode"
    assert '<option value="triggered" >triggered</option>' in en_page

    c.cookies.set("li_lang", "zh_CN")
    page = c.get("/settings")
    assert page.status_code == 200
    text = page.text
    labels = {p: html.unescape(t).strip() for p, t in LABEL.findall(text)}
    assert set(labels) == set(fields)
    for path, label in labels.items():  # every field title is the catalogue's
        assert label == cat[fields[path].text_key]["title"], path
    legends = dict(LEGEND.findall(text))
    assert legends["camera"] == "相机"
    assert legends["plc"] == "PLC"
    assert legends["pipeline"] == "检测流程"
    assert {k: cat[k]["title"] for k in legends} == {k: v.strip() for k, v in legends.items()}
    headings = dict(HEADING.findall(text))
    assert headings["camera.reconnect"] == "重连"
    assert headings["camera.source@device"] == "图像来源：本地相机"
    assert headings["uplink.updates.health"] == "健康监测"
    assert '<option value="triggered" >触发采集（triggered）</option>' in text
    assert '<option value="O" >奇校验（O）</option>' in text
    assert "感兴趣区域 (ROI)" in text
    assert html.escape(cat["plc.mode"]["description"], quote=True) in text
    assert "Acquisition mode" not in text
    assert "Backoff when the source fails." not in text

    # the form submits the same values in either language
    values = form_values(text)
    assert values == form_values(en_page)
    r = c.post("/settings", data={**values, "csrf_token": csrf})
    assert r.status_code == 200
    assert "没有更改" in r.text
    assert not line.applied

    # validation messages in Chinese, next to their fields, nothing applied
    r = c.post(
        "/settings",
        data={
            **values,
            "csrf_token": csrf,
            "plc.port": "seventy",
            "model.trusted_keys": "[not json",
            "pipeline.max_regions": "1.5",
        },
    )
    assert r.status_code == 422
    errors = dict(re.findall(r'<small class="error" id="err-([^"]+)">([^<]*)</small>', r.text))
    assert errors["plc.port"] == "请输入整数"
    assert errors["model.trusted_keys"].startswith("JSON 格式错误：")
    assert errors["pipeline.max_regions"] == "请输入整数"
    r = c.post(
        "/settings",
        data={
            **values,
            "csrf_token": csrf,
            "camera.source@synthetic.defect_rate": "2",
            "plc.allowed_clients": '["not-a-network"]',
            "uplink.port": "0",
        },
    )
    assert r.status_code == 422
    errors = dict(re.findall(r'<small class="error" id="err-([^"]+)">([^<]*)</small>', r.text))
    assert errors["camera.source@synthetic.defect_rate"].startswith("必须小于或等于 1")
    assert errors["uplink.port"].startswith("必须大于")
    assert CJK.search(errors["plc.allowed_clients"]), errors
    assert "有 3 个字段需要修改" in r.text
    assert not line.applied


def test_localize_leaves_english_and_paths_alone() -> None:
    sections = build_form(LineInspectConfig.model_json_schema())
    assert localize(sections, "en") is sections
    zh = localize(sections, "zh_CN")
    pairs = [
        (a, b)
        for s, t in zip(sections, zh, strict=True)
        for a, b in zip(s.fields, t.fields, strict=True)
    ]
    assert len(pairs) == sum(len(s.fields) for s in sections)
    for a, b in pairs:
        assert (a.path, a.options, a.kind, a.group_key) == (b.path, b.options, b.kind, b.group_key)
        assert len(b.option_labels) == len(b.options)
