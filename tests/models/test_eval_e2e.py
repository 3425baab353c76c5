"""End to end on a tiny synthetic line: teach -> signed .tar -> verify -> eval, all via the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from edge.capture.synth import write_dataset
from models import cli
from models.package import check_references, load_package
from models.signing import load_public_key


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="lineinspect")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    code = int(args.func(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_teach_sign_verify_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "synth"
    write_dataset(data, good=40, defective=12, seed=7, size_px=128)
    keys = tmp_path / "keys"
    assert run(["model", "keygen", "--out", str(keys)], capsys)[0] == 0
    priv, pub = keys / "lineinspect-signing.key", keys / "lineinspect-signing.pub"
    tar = tmp_path / "out" / "synth.tar"
    code, out, err = run(
        [
            "teach",
            "--data",
            str(data),
            "--out",
            str(tar),
            "--name",
            "synth-line",
            "--version",
            "0.3.0",
            "--sign-key",
            str(priv),
            "--set",
            "input_size=128",
            "--set",
            "bank_size=300",
            "--set",
            "coreset_candidates=4000",
            "--set",
            "calibration_images=8",
            "--set",
            "fp16=false",
        ],
        capsys,
    )
    assert code == 0, err
    assert "synth-line@0.3.0" in out
    code, out, err = run(
        ["model", "verify", str(tar), "--pubkey", str(pub), "--references"], capsys
    )
    assert code == 0, err
    assert "signature valid" in out
    with load_package(tar, [load_public_key(pub)]) as pkg:
        assert {"fp32", "int8"} <= set(pkg.graph_variants)
        assert pkg.manifest.reference, "teach must store reference images with scores"
        assert all(r.ok for r in check_references(pkg, "fp32"))
    report = tmp_path / "report.png"
    out_json = tmp_path / "eval.json"
    code, out, err = run(
        [
            "eval",
            "--model",
            str(tar),
            "--data",
            str(data),
            "--json",
            str(out_json),
            "--report",
            str(report),
            "--pubkey",
            str(pub),
        ],
        capsys,
    )
    assert code == 0, err
    res = json.loads(out_json.read_text())
    assert res["package"]["model_id"] == "synth-line@0.3.0"
    assert res["package"]["signed_by"] is not None
    assert res["data"]["n_images"] == 8 + 12
    for variant in ("fp32", "int8"):
        g = res["graphs"][variant]
        # model quality is the benchmark's business; here: every metric is computed
        for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "f1_best"):
            assert 0.0 <= g[key] <= 1.0, (key, g)
        assert g["latency_ms_p50"] > 0
        assert g["n_pixel_masks"] == 12
    # INT8 accuracy is the teach/quantize tests' business; eval reports the gap
    cmp = res["comparison"]["int8"]
    assert set(cmp) == {
        "image_auroc_delta",
        "score_abs_diff_max",
        "score_abs_diff_p50",
        "verdicts_changed",
    }
    assert cmp["score_abs_diff_max"] >= cmp["score_abs_diff_p50"] >= 0
    assert report.stat().st_size > 20_000
    code, _, err = run(
        ["teach", "--data", str(data), "--out", str(tar), "--set", "input_size=big"], capsys
    )
    assert code == 1
    assert "exists" in err or "input_size" in err
