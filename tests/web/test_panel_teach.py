"""Teach page: datasets from uploads and the live line, a teach job, score distributions, promote.

The teach step is the toy package writer (tests/web/toy_teach.py) so the test
stays fast; everything around it is real: uploads decoded by OpenCV, the child
process, ONNX Runtime scoring of the dataset, staging through the backend.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from panel_helpers import setup_admin, state_of
from simline import SimLine

from edge.capture.synth import part_rng, render_part
from edge.web.config import PanelConfig
from edge.web.server import create_app
from edge.web.teach import TeachService

TOY_TEACH = Path(__file__).with_name("toy_teach.py")


def toy_argv(dataset: Path, out: Path, result: Path) -> list[str]:
    return [
        sys.executable,
        str(TOY_TEACH),
        "--dataset",
        str(dataset),
        "--out",
        str(out),
        "--result",
        str(result),
    ]


@pytest.fixture
def teach_client(line: SimLine, tmp_path: Path) -> tuple[TestClient, str]:
    cfg = PanelConfig(password_hash_time_cost=1, password_hash_memory_kib=8192)
    c = TestClient(create_app(line, cfg, tmp_path / "panel", teach_argv=toy_argv))
    return c, setup_admin(c)


def png(defect: str | None, i: int) -> bytes:
    img, _ = render_part(part_rng(3, "teach", i), defect, 64)
    return cv2.imencode(".png", img)[1].tobytes()


def wait_job(c: TestClient, kind: str, timeout_s: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = [j for j in c.get("/api/jobs").json() if j["kind"] == kind]
        if jobs and jobs[0]["state"] in {"done", "failed"}:
            return dict(jobs[0])
        time.sleep(0.2)
    raise AssertionError(f"{kind} job did not finish in {timeout_s} s")


@pytest.mark.slow
def test_upload_teach_score_and_promote(
    teach_client: tuple[TestClient, str], line: SimLine
) -> None:
    c, csrf = teach_client
    good = [("files", (f"g{i}.png", png(None, i), "image/png")) for i in range(6)]
    good.append(("files", ("notes.txt", b"not an image", "text/plain")))
    good.append(("files", ("empty.png", b"", "image/png")))
    good.append(("files", ("truncated.png", png(None, 99)[:200], "image/png")))
    r = c.post(
        "/teach/upload",
        data={"csrf_token": csrf, "dataset": "flange-b", "label": "good"},
        files=good,
    )
    assert r.status_code == 200
    c.post(
        "/teach/upload",
        data={"csrf_token": csrf, "dataset": "flange-b", "label": "test_good"},
        files=[("files", (f"t{i}.png", png(None, 10 + i), "image/png")) for i in range(3)],
    )
    c.post(
        "/teach/upload",
        data={"csrf_token": csrf, "dataset": "flange-b", "label": "scratch"},
        files=[("files", (f"s{i}.png", png("scratch", 20 + i), "image/png")) for i in range(3)],
    )
    ds = {d["name"]: d for d in c.get("/api/datasets").json()}["flange-b"]
    assert ds == {
        "name": "flange-b",
        "good_train": 6,
        "good_test": 3,
        "defective": {"scratch": 3},
    }, "the text, empty and truncated files were skipped"
    audit = c.get("/api/audit").json()
    assert any(e["action"] == "dataset.upload" and e["new"]["files"] == 6 for e in audit)

    r = c.post("/teach/teach", data={"csrf_token": csrf, "dataset": "flange-b"})
    assert r.status_code == 200
    job = wait_job(c, "teach")
    assert job["state"] == "done", job
    result = job["result"]
    assert isinstance(result, dict)
    assert len(result["good"]) == 3
    assert len(result["defective"]["scratch"]) == 3
    assert result["good_source"] == "test/good"
    page = c.get("/teach", params={"dataset": "flange-b"})
    assert 'id="score-hist"' in page.text
    assert 'id="threshold-slider"' in page.text

    r = c.post(
        "/teach/promote",
        data={"csrf_token": csrf, "dataset": "flange-b", "job": str(job["id"]), "threshold": "0.9"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert r.headers["location"] == "/models"
    staged = {s["slot"]: s for s in c.get("/api/models").json()}["staged"]
    assert staged["name"] == "flange-b"
    assert staged["version"] == "2.0.0"


def test_teach_refusals(teach_client: tuple[TestClient, str], tmp_path: Path) -> None:
    c, csrf = teach_client
    for name in ("../etc", "", "a b", "x" * 70):
        r = c.post(
            "/teach/upload",
            data={"csrf_token": csrf, "dataset": name, "label": "good"},
            files=[("files", ("g.png", png(None, 0), "image/png"))],
        )
        assert r.status_code == 422, name
    r = c.post(
        "/teach/upload",
        data={"csrf_token": csrf, "dataset": "ok", "label": "../x"},
        files=[("files", ("g.png", png(None, 0), "image/png"))],
    )
    assert r.status_code == 422
    # too few images to teach
    r = c.post("/teach/teach", data={"csrf_token": csrf, "dataset": "ok"})
    assert r.status_code == 422
    r = c.post("/teach/collect", data={"csrf_token": csrf, "dataset": "ok", "count": "0"})
    assert r.status_code == 422
    r = c.post("/teach/promote", data={"csrf_token": csrf, "dataset": "ok", "job": "nope"})
    assert r.status_code == 422
    assert not (tmp_path / "etc").exists()


def test_failed_teach_job_reports_why(teach_client: tuple[TestClient, str]) -> None:
    c, csrf = teach_client
    c.post(
        "/teach/upload",
        data={"csrf_token": csrf, "dataset": "bad", "label": "good"},
        files=[("files", (f"g{i}.png", png(None, i), "image/png")) for i in range(3)],
    )
    service: TeachService = state_of(c).teach
    (service.dataset_dir("bad") / "FAIL").write_text("x")
    c.post("/teach/teach", data={"csrf_token": csrf, "dataset": "bad"})
    job = wait_job(c, "teach")
    assert job["state"] == "failed"
    assert "teaching failed on purpose" in str(job["error"])


def test_collect_from_live_line(teach_client: tuple[TestClient, str], line: SimLine) -> None:
    c, csrf = teach_client
    r = c.post("/teach/collect", data={"csrf_token": csrf, "dataset": "live-set", "count": "4"})
    assert r.status_code == 200
    job = wait_job(c, "collect", 20)
    assert job["state"] == "done"
    assert job["result"] == {"saved": 4}
    files = sorted((state_of(c).teach.dataset_dir("live-set") / "train" / "good").iterdir())
    assert len(files) == 4
    img = cv2.imread(str(files[0]))
    assert img is not None
    assert img.shape[2] == 3
    assert np.asarray(img).std() > 1


def test_collect_times_out_when_the_line_stops(line: SimLine, tmp_path: Path) -> None:
    line.stop()
    service = TeachService(tmp_path / "p", line)
    job = service.collect("stopped", 3, timeout_s=0.5)
    deadline = time.monotonic() + 5
    while job.state not in {"done", "failed"} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.state == "failed"
    assert "only 0 of 3" in job.error
