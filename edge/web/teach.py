"""Teaching from the panel: datasets, collect from the live line, teach and score jobs.

Datasets live in ``<data_dir>/datasets/<name>/`` in the MVTec AD layout
(``train/good``, ``test/good``, ``test/<defect>``). Teaching runs in a child
process at low priority (``lineinspect teach`` then a scoring pass, see
:mod:`edge.web.teachjob`), so torch never loads into the appliance and the
pipeline keeps its cores' priority. Collection polls :meth:`PanelBackend.latest`
from a panel thread and saves each new raw frame once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from edge.web.backend import PanelBackend

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
MAX_COLLECT = 2000
JobState = Literal["queued", "running", "done", "failed"]

TeachArgv = Callable[[Path, Path, Path], list[str]]
"""(dataset folder, package output folder, result JSON) -> the child process's argv."""


def default_teach_argv(dataset: Path, out: Path, result: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "edge.web.teachjob",
        "--dataset",
        str(dataset),
        "--out",
        str(out),
        "--result",
        str(result),
    ]


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    name: str
    good_train: int
    good_test: int
    defective: dict[str, int]

    @property
    def path_hint(self) -> str:
        return f"datasets/{self.name}"


@dataclass
class Job:
    """One background job (collect or teach)."""

    id: str
    kind: Literal["collect", "teach"]
    dataset: str
    state: JobState = "queued"
    progress: str = ""
    started_unix: float | None = None
    finished_unix: float | None = None
    error: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "dataset": self.dataset,
            "state": self.state,
            "progress": self.progress,
            "started_unix": self.started_unix,
            "finished_unix": self.finished_unix,
            "error": self.error,
            "result": self.result,
        }


def _count(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def check_name(name: str, what: str = "dataset") -> str:
    if not NAME_RE.fullmatch(name):
        raise ValueError(
            f"a {what} name is 1-64 letters, digits, '_' or '-' "
            f"(starting with a letter or digit), got {name!r}"
        )
    return name


class TeachService:
    """Datasets and jobs of one panel. Thread-safe."""

    def __init__(
        self, data_dir: Path, backend: PanelBackend, teach_argv: TeachArgv = default_teach_argv
    ) -> None:
        self.root = data_dir / "datasets"
        self.jobs_dir = data_dir / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.backend = backend
        self.teach_argv = teach_argv
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._teach_lock = threading.Lock()
        self._load_finished()

    def _load_finished(self) -> None:
        for f in sorted(self.jobs_dir.glob("*/job.json")):
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
                job = Job(**data)
            except (OSError, ValueError, TypeError):
                continue
            if job.state in {"queued", "running"}:
                job.state = "failed"
                job.error = "interrupted by a restart"
            self._jobs[job.id] = job

    def _save(self, job: Job) -> None:
        folder = self.jobs_dir / job.id
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "job.json.tmp"
        tmp.write_text(json.dumps(job.as_dict()), encoding="utf-8")
        os.replace(tmp, folder / "job.json")

    # -- datasets -----------------------------------------------------------
    def dataset_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def datasets(self) -> list[DatasetInfo]:
        out = []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            test = d / "test"
            defective = (
                {
                    p.name: _count(p)
                    for p in sorted(test.iterdir())
                    if p.is_dir() and p.name != "good"
                }
                if test.is_dir()
                else {}
            )
            out.append(
                DatasetInfo(d.name, _count(d / "train" / "good"), _count(test / "good"), defective)
            )
        return out

    @staticmethod
    def defect_names() -> list[str]:
        try:
            from edge.capture.synth import DEFECT_TYPES
        except ImportError:
            return []
        return list(DEFECT_TYPES)

    def _label_dir(self, name: str, label: str) -> Path:
        base = self.dataset_dir(name)
        if label == "good":
            return base / "train" / "good"
        if label == "test_good":
            return base / "test" / "good"
        return base / "test" / check_name(label, "defect class")

    def add_image(self, name: str, label: str, filename: str, data: bytes) -> int:
        """Store one uploaded image (1) or skip it (0) when it is not a readable image."""
        folder = self._label_dir(name, label)
        if len(data) > MAX_UPLOAD_BYTES:
            raise ValueError(f"{filename}: larger than {MAX_UPLOAD_BYTES // 2**20} MB")
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(filename).stem)[:80] or "image"
        if not data:  # an empty file part (e.g. the folder picker left empty)
            return 0
        try:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error:
            return 0
        if img is None or img.size == 0:
            return 0
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{stem}.png"
        n = 1
        while target.exists():
            target = folder / f"{stem}_{n}.png"
            n += 1
        if not cv2.imwrite(str(target), img):
            raise OSError(f"cannot write {target}")
        return 1

    # -- jobs ---------------------------------------------------------------
    def jobs(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.started_unix or 0, reverse=True)

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def _new_job(self, kind: Literal["collect", "teach"], dataset: str) -> Job:
        job = Job(id=uuid.uuid4().hex[:12], kind=kind, dataset=dataset, started_unix=time.time())
        with self._lock:
            self._jobs[job.id] = job
        self._save(job)
        return job

    def _finish(self, job: Job, error: str = "") -> None:
        with self._lock:
            job.state = "failed" if error else "done"
            job.error = error
            job.finished_unix = time.time()
        self._save(job)

    def collect(self, name: str, count: int, timeout_s: float | None = None) -> Job:
        """Save the next ``count`` inspected parts' raw frames as good training images."""
        folder = self._label_dir(name, "good")
        if not 1 <= count <= MAX_COLLECT:
            raise ValueError(f"collect between 1 and {MAX_COLLECT} images, not {count}")
        folder.mkdir(parents=True, exist_ok=True)
        job = self._new_job("collect", name)
        limit_s = timeout_s if timeout_s is not None else 30.0 + 10.0 * count

        def run() -> None:
            job.state = "running"
            seen: set[int] = set()
            last = self.backend.latest()
            if last is not None:
                seen.add(last.verdict.inspection_id)
            deadline = time.monotonic() + limit_s
            saved = 0
            try:
                while saved < count and time.monotonic() < deadline:
                    live = self.backend.latest()
                    if live is None or live.verdict.inspection_id in seen:
                        time.sleep(0.05)
                        continue
                    seen.add(live.verdict.inspection_id)
                    path = folder / f"live_{live.verdict.inspection_id:09d}.png"
                    if not cv2.imwrite(str(path), live.image):
                        raise OSError(f"cannot write {path}")
                    saved += 1
                    job.progress = f"{saved}/{count}"
                job.result = {"saved": saved}
                self._finish(
                    job,
                    ""
                    if saved == count
                    else f"only {saved} of {count} parts arrived in {limit_s:.0f} s",
                )
            except OSError as exc:
                self._finish(job, str(exc))

        threading.Thread(target=run, name=f"collect-{job.id}", daemon=True).start()
        return job

    def start_teach(self, name: str) -> Job:
        """Teach a package from the dataset and score its test images, in a child process."""
        ds = self.dataset_dir(name)
        n_good = _count(ds / "train" / "good")
        if n_good < 2:
            raise ValueError(
                f"dataset {name!r} has {n_good} good training images; collect or upload more first"
            )
        job = self._new_job("teach", name)
        out = self.jobs_dir / job.id / "package"
        result_file = self.jobs_dir / job.id / "result.json"
        log_file = self.jobs_dir / job.id / "teach.log"
        argv = self.teach_argv(ds, out, result_file)

        def run() -> None:
            with self._teach_lock:  # one teach at a time: the cores belong to the line
                job.state = "running"
                job.progress = "teaching"
                try:
                    with log_file.open("wb") as log:
                        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
                        _lower_priority(proc.pid)
                        while True:
                            try:
                                rc = proc.wait(timeout=1.0)
                                break
                            except subprocess.TimeoutExpired:
                                job.progress = _last_line(log_file)
                    if rc != 0:
                        tail = log_file.read_text(encoding="utf-8", errors="replace")[-600:]
                        self._finish(job, f"teach exited with {rc}: {tail.strip()}")
                        return
                    job.result = json.loads(result_file.read_text(encoding="utf-8"))
                    job.result["package"] = str(out)
                    job.progress = "done"
                    self._finish(job)
                except (OSError, ValueError) as exc:
                    self._finish(job, str(exc))

        threading.Thread(target=run, name=f"teach-{job.id}", daemon=True).start()
        return job

    def package_of(self, job_id: str) -> Path:
        job = self.job(job_id)
        if job is None or job.kind != "teach" or job.state != "done":
            raise ValueError(f"no finished teach job {job_id!r}")
        return Path(str(job.result["package"]))

    def latest_result(self, name: str) -> Job | None:
        for job in self.jobs():
            if job.kind == "teach" and job.dataset == name and job.state == "done":
                return job
        return None


def _last_line(path: Path, max_chars: int = 160) -> str:
    """The last non-empty line of a log (progress bars rewrite theirs with carriage returns)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in tail.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1][-max_chars:] if lines else ""


def _lower_priority(pid: int) -> None:
    """Give the line's cores to the pipeline first: the teach child runs at nice 10."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, 10)
