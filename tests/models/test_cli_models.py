"""`lineinspect model keygen|sign|verify|info|pack` and `lineinspect eval`: exit codes."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from models import cli
from models.toy_package import build_toy_package, write_toy_dataset


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="lineinspect")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    code = int(args.func(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def pkg(tmp_path: Path) -> Path:
    return build_toy_package(tmp_path / "pkg")


@pytest.fixture
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    code, out, _ = run(["model", "keygen", "--out", str(tmp_path / "keys")], capsys)
    assert code == 0
    priv = tmp_path / "keys" / "lineinspect-signing.key"
    pub = tmp_path / "keys" / "lineinspect-signing.pub"
    assert "fingerprint" in out
    return priv, pub


def test_keygen_modes_and_no_overwrite(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    priv, _ = keys
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    before = priv.read_bytes()
    code, _, err = run(["model", "keygen", "--out", str(priv.parent)], capsys)
    assert code == 1
    assert "already exists" in err
    assert priv.read_bytes() == before
    code, _, _ = run(["model", "keygen", "--out", str(priv.parent), "--force"], capsys)
    assert code == 0
    assert priv.read_bytes() != before
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600


def test_sign_verify_cycle(
    pkg: Path, keys: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    priv, pub = keys
    code, _, err = run(["model", "verify", str(pkg), "--pubkey", str(pub)], capsys)
    assert (code, "signature_missing" in err) == (1, True)
    code, out, _ = run(["model", "verify", str(pkg)], capsys)
    assert code == 0
    assert "unsigned" in out
    code, out, _ = run(["model", "sign", str(pkg), "--key", str(priv)], capsys)
    assert code == 0
    code, out, _ = run(["model", "verify", str(pkg), "--pubkey", str(pub), "--references"], capsys)
    assert code == 0, out
    assert "signature valid" in out
    assert "graph int8: 2 reference image(s) within tolerance" in out
    code, out, _ = run(["model", "verify", str(pkg)], capsys)
    assert "NOT checked" in out
    # another key
    run(["model", "keygen", "--out", str(tmp_path / "other")], capsys)
    other = tmp_path / "other" / "lineinspect-signing.pub"
    code, _, err = run(["model", "verify", str(pkg), "--pubkey", str(other)], capsys)
    assert code == 1
    assert "signature_invalid" in err
    # several keys: one matching is enough
    code, _, _ = run(
        ["model", "verify", str(pkg), "--pubkey", str(other), "--pubkey", str(pub)], capsys
    )
    assert code == 0


def test_verify_refuses_tampered(
    pkg: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    graph = pkg / "model_fp32.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    code, out, err = run(["model", "verify", str(pkg)], capsys)
    assert code == 1
    assert "hash_mismatch" in err
    assert "model_fp32.onnx" in err
    assert out == ""


def test_sign_with_bad_key_file(
    pkg: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, pub = keys
    code, _, err = run(["model", "sign", str(pkg), "--key", str(pub)], capsys)
    assert code == 1
    assert "private key" in err
    assert not (pkg / "manifest.sig").exists()
    code, _, err = run(["model", "sign", str(pkg), "--key", "/nonexistent.key"], capsys)
    assert code == 1
    assert "cannot read" in err


def test_info_and_pack(pkg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["model", "info", str(pkg)], capsys)
    assert code == 0
    assert "toy-brightness@1.0.0" in out
    assert "64x64 gray" in out
    assert "(default)" in out
    code, out, _ = run(["model", "info", str(pkg), "--json"], capsys)
    assert json.loads(out)["version"] == "1.0.0"
    tar = tmp_path / "toy.tar"
    code, out, _ = run(["model", "pack", str(pkg), "--out", str(tar)], capsys)
    assert code == 0
    code, out, _ = run(["model", "verify", str(tar), "--references"], capsys)
    assert code == 0
    code, _, err = run(["model", "info", str(tmp_path / "missing")], capsys)
    assert code == 1
    assert "not_found" in err


def test_eval_cli(pkg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_toy_dataset(tmp_path / "ds")
    out_json = tmp_path / "out" / "eval.json"
    code, out, _ = run(
        [
            "eval",
            "--model",
            str(pkg),
            "--data",
            str(data),
            "--json",
            str(out_json),
            "--graphs",
            "fp32",
        ],
        capsys,
    )
    assert code == 0
    res = json.loads(out_json.read_text())
    assert list(res["graphs"]) == ["fp32"]
    assert res["graphs"]["fp32"]["image_auroc"] == pytest.approx(10 / 15)
    assert "0.6667" in out
    code, _, err = run(
        ["eval", "--model", str(pkg), "--data", str(tmp_path / "nope"), "--json", str(out_json)],
        capsys,
    )
    assert code == 1
    assert "not a folder" in err


def test_teach_refuses_bad_key_before_teaching(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        [
            "teach",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "p"),
            "--sign-key",
            str(tmp_path / "missing.key"),
        ],
        capsys,
    )
    assert code == 1
    assert "cannot read private key" in err
    assert not (tmp_path / "p").exists()


def test_real_entry_point(pkg: Path, tmp_path: Path) -> None:
    """The installed `lineinspect` dispatcher reaches these commands and returns their codes."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    ok = subprocess.run(
        [sys.executable, "-m", "edge.cli", "model", "verify", str(pkg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    (pkg / "stray.bin").write_bytes(b"x")
    bad = subprocess.run(
        [sys.executable, "-m", "edge.cli", "model", "verify", str(pkg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 1
    assert "file_unlisted" in bad.stderr


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("input_size=abc", "expected int"),
        ("no_such_knob=1", "KEY one of"),
        ("fp16=1", "expected bool"),
        ("input_size", "KEY=VALUE"),
        ('int8_activations="int4"', "int8_activations must be one of u8, s8"),
        ('default_graph="fp64"', "default_graph must be one of auto, fp32, int8"),
    ],
)
def test_teach_rejects_bad_settings_before_teaching(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, needle: str
) -> None:
    data = write_toy_dataset(tmp_path / "ds")
    code, _, err = run(
        ["teach", "--data", str(data), "--out", str(tmp_path / "p"), "--set", setting], capsys
    )
    assert code == 1
    assert needle in err
    assert not (tmp_path / "p").exists()
