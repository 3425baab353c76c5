"""The configuration: example file, generated docs, schema, and every error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from edge.capture.config import FolderSourceConfig, SyntheticSourceConfig
from edge.cli import main
from edge.config import ConfigError, LineInspectConfig, load_config, parse_config
from edge.config_check import _models_in
from edge.config_cli import docs_markdown
from edge.config_docs import render_markdown

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def only(err: ConfigError, key: str) -> tuple[str, str, int | None]:
    found = [p for p in err.details if p.key == key]
    assert len(found) == 1, [p.key for p in err.details]
    return found[0].message, found[0].hint, found[0].line


# ------------------------------------------------------------------ the good files


def test_example_config_validates_and_is_not_all_defaults() -> None:
    cfg = load_config(REPO / "config" / "example.yaml")
    assert cfg.camera.mode == "triggered"
    assert isinstance(cfg.camera.source, SyntheticSourceConfig)
    assert cfg.camera.source.seed == 42
    assert cfg.station.device_id == "press2-st4"
    assert cfg.uplink.password is not None
    assert cfg.uplink.password.env == "LINEINSPECT_MQTT_PASSWORD"


def test_docs_config_md_matches_the_schema() -> None:
    on_disk = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert on_disk == docs_markdown(), (
        "docs/config.md is out of date: run `lineinspect config docs --out docs/config.md`"
    )


def test_docs_cover_every_section_and_union_member() -> None:
    text = docs_markdown()
    for section in LineInspectConfig.model_fields:
        assert f"## `{section}`" in text
    for tag in ("synthetic", "device", "stream", "video", "folder"):
        assert f"`camera.source` with `type: {tag}`" in text
    assert "| `rate_fps` | number |" in text
    assert "**required**" in text  # folder/video path


def _all_models(root: type[BaseModel]) -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []
    todo = [root]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.append(model)
        for field in model.model_fields.values():
            todo.extend(_models_in(field.annotation))
    return seen


def test_every_field_has_a_title_and_a_description() -> None:
    missing = [
        f"{m.__name__}.{name}"
        for m in _all_models(LineInspectConfig)
        for name, f in m.model_fields.items()
        if not (f.title and f.description)
    ]
    assert missing == []


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == LineInspectConfig()
    assert load_config(write(tmp_path, "# only a comment\n")) == LineInspectConfig()


def test_defaults_command_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "defaults"]) == 0
    path = write(tmp_path, capsys.readouterr().out)
    assert load_config(path) == LineInspectConfig()


def test_source_types_parse(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            "camera:\n  source:\n    type: folder\n"
            "    path: /data/imgs\n    extensions: [PNG, .Jpg]\n",
        )
    )
    assert isinstance(cfg.camera.source, FolderSourceConfig)
    assert cfg.camera.source.extensions == (".png", ".jpg")
    for text in (
        "type: device\n    device: /dev/video0",
        "type: device\n    device: 1",
        "type: stream\n    url: rtsp://cam/1",
        "type: video\n    path: a.mp4",
    ):
        load_config(write(tmp_path, f"camera:\n  source:\n    {text}\n"))


# ------------------------------------------------------------------ every error path


def test_unknown_key_has_path_line_and_suggestion(tmp_path: Path) -> None:
    err = problems_of(
        write(tmp_path, "camera:\n  source:\n    type: folder\n    path: x\n    rate_fsp: 3\n")
    )
    message, hint, line = only(err, "camera.source.rate_fsp")
    assert message == "unknown key"
    assert "did you mean 'rate_fps'?" in hint
    assert "allowed here:" in hint
    assert line == 5


def test_unknown_section(tmp_path: Path) -> None:
    err = problems_of(write(tmp_path, "camra:\n  id: x\n"))
    _, hint, line = only(err, "camra")
    assert "did you mean 'camera'?" in hint
    assert line == 1


def test_wrong_type(tmp_path: Path) -> None:
    err = problems_of(write(tmp_path, "camera:\n  trigger_timeout_s: fast\n"))
    message, hint, line = only(err, "camera.trigger_timeout_s")
    assert "valid number" in message
    assert "'fast'" in message
    assert "Trigger timeout" in hint
    assert line == 2


def test_out_of_range(tmp_path: Path) -> None:
    err = problems_of(
        write(tmp_path, "camera:\n  source:\n    type: synthetic\n    defect_rate: 1.5\n")
    )
    message, _, line = only(err, "camera.source.defect_rate")
    assert "less than or equal to 1" in message
    assert line == 4


def test_bad_choice_and_bad_source_type(tmp_path: Path) -> None:
    err = problems_of(write(tmp_path, "camera:\n  mode: triggerd\n  source:\n    type: webcam\n"))
    _, hint, _ = only(err, "camera.mode")
    assert "'free_run'" in hint
    assert "'triggered'" in hint
    _, hint, line = only(err, "camera.source")
    assert "set 'type' to one of" in hint
    assert "'folder'" in hint
    assert line == 3


def test_source_without_type_and_missing_required(tmp_path: Path) -> None:
    err = problems_of(write(tmp_path, "camera:\n  source:\n    path: /x\n"))
    _, hint, _ = only(err, "camera.source")
    assert "add a 'type:' key" in hint
    err = problems_of(write(tmp_path, "camera:\n  source:\n    type: video\n"))
    message, hint, _ = only(err, "camera.source.path")
    assert message == "Field required"
    assert "add 'path:'" in hint


def test_cross_field_rule(tmp_path: Path) -> None:
    err = problems_of(
        write(tmp_path, "camera:\n  reconnect:\n    initial_delay_s: 5\n    max_delay_s: 1\n")
    )
    message, _, line = only(err, "camera.reconnect")
    assert message == "max_delay_s must be at least initial_delay_s"
    assert line == 2


def test_secret_in_yaml_is_refused_without_echoing_it(tmp_path: Path) -> None:
    err = problems_of(write(tmp_path, "uplink:\n  password: hunter2\n"))
    message, hint, _ = only(err, "uplink.password")
    assert "hunter2" not in message
    assert "hunter2" not in str(err)
    assert "{env: LINEINSPECT_PASSWORD}" in hint


def test_every_problem_is_reported_at_once_in_line_order(tmp_path: Path) -> None:
    err = problems_of(
        write(tmp_path, "station:\n  devce_id: a\ncamera:\n  mode: x\nplc:\n  port: 0\n")
    )
    assert [p.key for p in err.details] == ["station.devce_id", "camera.mode", "plc.port"]
    assert [p.line for p in err.details] == [2, 4, 6]
    assert len(err.problems) == 3  # the (key, message, hint) view
    report = err.report()
    assert f"{tmp_path / 'cfg.yaml'}:6: plc.port:" in report
    assert "hint:" in report


def test_duplicate_key(tmp_path: Path) -> None:
    err = problems_of(write(tmp_path, "plc:\n  port: 5020\n  port: 5021\n"))
    message, hint, line = only(err, "plc.port")
    assert message == "duplicate key (first on line 2)"
    assert "silently" in hint
    assert line == 3


def test_bad_yaml_has_a_line(tmp_path: Path) -> None:
    err = problems_of(write(tmp_path, "camera:\n  id: a\n   mode: b\n"))
    message, hint, line = only(err, "(yaml)")
    assert message.startswith("invalid YAML")
    assert "fix the YAML syntax" in hint
    assert line == 3
    err = problems_of(write(tmp_path, "camera: [unclosed\n"))
    assert only(err, "(yaml)")[2] is not None
    err = problems_of(write(tmp_path, "a: 1\n---\nb: 2\n"))  # two documents
    assert "invalid YAML" in only(err, "(yaml)")[0]


@pytest.mark.parametrize(
    ("text", "kind"), [("- camera\n- plc\n", "list"), ("just a string\n", "str"), ("42\n", "int")]
)
def test_root_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    err = problems_of(write(tmp_path, text))
    message, hint, _ = only(err, "(root)")
    assert message.endswith(f"not {kind}")
    assert "camera:" in hint
    with pytest.raises(ConfigError):
        parse_config([1, 2])


def test_file_problems(tmp_path: Path) -> None:
    err = problems_of(tmp_path / "missing.yaml")
    assert only(err, "(file)")[0] == "no such file"
    assert err.path == tmp_path / "missing.yaml"
    err = problems_of(tmp_path)
    assert "folder" in only(err, "(file)")[0]
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("station:\n  name: Stra\xdfe\n".encode("latin-1"))
    err = problems_of(latin1)
    assert "not UTF-8" in only(err, "(file)")[0]


# ------------------------------------------------------------------ the CLI


def test_check_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "camera:\n  mode: triggered\n", "good.yaml")
    assert main(["config", "check", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = write(tmp_path, "camera:\n  mode: sometimes\n  frobnicate: 1\n", "bad.yaml")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err
    assert f"{bad}:2: camera.mode:" in err
    assert f"{bad}:3: camera.frobnicate: unknown key" in err
    assert main(["config", "check", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["config", "check", str(REPO / "config" / "example.yaml")]) == 0


def test_check_cli_json_and_notes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path, "plc:\n  port: 70000\n")
    assert main(["config", "check", "--json", str(bad)]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert out["problems"][0]["key"] == "plc.port"
    assert out["problems"][0]["line"] == 2
    note = write(tmp_path, f"camera:\n  source:\n    type: folder\n    path: {tmp_path}/later\n")
    assert main(["config", "check", "--json", str(note)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True
    assert "does not exist yet" in out["notes"][0]


def test_check_notes_unavailable_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(tmp_path, "uplink:\n  enabled: true\n  password: {env: LI_TEST_MQTT_PW}\n")
    off = write(tmp_path, "uplink:\n  password: {env: LI_TEST_MQTT_PW}\n", "off.yaml")
    monkeypatch.delenv("LI_TEST_MQTT_PW", raising=False)
    assert main(["config", "check", str(cfg)]) == 0  # valid, but worth a note
    out = capsys.readouterr().out
    assert "uplink.password: secret not available here ($LI_TEST_MQTT_PW" in out
    assert main(["config", "check", str(off)]) == 0
    assert "secret not available" not in capsys.readouterr().out  # uplink disabled
    monkeypatch.setenv("LI_TEST_MQTT_PW", "s3cret")
    assert main(["config", "check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "secret not available" not in out
    assert "s3cret" not in out


def test_check_cli_as_a_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = write(tmp_path, "camera: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "edge.cli", "config", "check", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "camera:" in proc.stderr


def test_schema_and_docs_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    source = schema["$defs"]["CameraConfig"]["properties"]["source"]
    assert source["discriminator"]["propertyName"] == "type"
    assert main(["config", "schema", "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text()) == schema
    assert main(["config", "docs", "--out", str(tmp_path / "c.md")]) == 0
    assert (tmp_path / "c.md").read_text(encoding="utf-8") == render_markdown(schema)
    assert main(["config"]) == 2  # no action: usage


def test_config_module_does_not_import_heavy_things() -> None:
    import subprocess
    import sys

    code = (
        "import sys, edge.config; "
        "print(sorted(m for m in ('cv2', 'torch', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_example_file_is_documented() -> None:
    text = (REPO / "config" / "example.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    assert set(data) <= set(LineInspectConfig.model_fields)
    assert text.count("#") > 30  # comments explain the settings
