"""A small, real, in-process PanelBackend for the panel's tests.

Real pieces: the synthetic line's images (edge.capture.synth), D's result store
(edge.store.ResultStore: SQLite WAL + background image writer), the event bus,
real model packages (models.toy_package) in the slots. Only the anomaly score
is stood in for: it is derived from the synthetic ground truth (defect mask),
so an NG part carries a real heatmap where its defect is.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from edge.capture.synth import DEFECT_TYPES, part_rng, render_part
from edge.config import LineInspectConfig
from edge.events import EventBus
from edge.runtime_config import StoreConfig
from edge.store import ImageJob, ResultStore
from edge.types import ImageArray, Region, StatusEvent, Verdict, VerdictCode
from edge.web.backend import (
    AnomalyMap,
    ApplyResult,
    HealthSnapshot,
    LiveResult,
    ModelSlot,
    PartFileKind,
    PartPage,
    PartQuery,
    PartRecord,
    SlotName,
    Stats,
    StatsBucket,
)

LIVE_KEYS = ("pipeline.", "camera.source.parts_per_minute", "camera.source.defect_rate")


def _slot_from_package(slot: SlotName, path: Path) -> ModelSlot:
    from models.package import load_package

    pkg = load_package(path)
    m = pkg.manifest
    return ModelSlot(
        slot=slot,
        name=m.name,
        version=m.version,
        created=str(m.created),
        threshold=m.threshold.image,
        metrics=dict(m.metrics or {}),
        path=path,
        sha256=__import__("hashlib").sha256(pkg.manifest_bytes).hexdigest(),
    )


class SimLine:
    """Parts from the synthetic line at ``parts_per_s``, scored from their ground truth."""

    def __init__(
        self,
        root: Path,
        parts_per_s: float = 4.0,
        defect_every: int = 4,
        size_px: int = 192,
        pool: int = 10,
        seed: int = 7,
    ) -> None:
        self.root = root
        self.bus = EventBus()
        self._cfg = LineInspectConfig.model_validate(
            {"store": {"path": str(root / "results"), "ok_sample_every": 2, "image_format": "png"}}
        )
        self.store = ResultStore(
            StoreConfig.model_validate(
                {"path": str(root / "results"), "ok_sample_every": 2, "image_format": "png"}
            ),
            self.bus,
        )
        self.parts_per_s = parts_per_s
        self.model_threshold = 1.0
        self._threshold: float | None = None
        self._lock = threading.Lock()
        self._latest: LiveResult | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._slots: dict[SlotName, ModelSlot] = {s: ModelSlot(slot=s) for s in SlotName}
        self.applied: list[LineInspectConfig] = []
        self.error_next = False
        self._pool = self._render_pool(pool, defect_every, size_px, seed)
        self._fps_times: list[float] = []

    @staticmethod
    @functools.lru_cache(maxsize=4)
    def _render_pool(
        n: int, defect_every: int, size_px: int, seed: int
    ) -> tuple[tuple[ImageArray, np.ndarray, str | None], ...]:
        out = []
        for i in range(n):
            defect = (
                DEFECT_TYPES[(i // defect_every) % len(DEFECT_TYPES)]
                if i % defect_every == defect_every - 1
                else None
            )
            img, mask = render_part(part_rng(seed, "sim", i), defect, size_px)
            img.flags.writeable = False
            out.append((img, mask, defect))
        return tuple(out)

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        self.store.start()
        self.bus.emit("camera.connected", "camera0", "synthetic line running")
        self._thread = threading.Thread(target=self._run, name="simline", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.store.stop()

    def _run(self) -> None:
        rng = np.random.default_rng(1)
        for i in itertools.count():
            if self._stop.wait(1.0 / self.parts_per_s):
                return
            img, mask, defect = self._pool[i % len(self._pool)]
            self._inspect(img, mask, defect, rng, i)

    def _inspect(
        self,
        img: ImageArray,
        mask: np.ndarray,
        defect: str | None,
        rng: np.random.Generator,
        seq: int,
    ) -> None:
        t0 = time.monotonic()
        thr = self.threshold
        iid = self.store.next_inspection_id()
        base = float(rng.uniform(0.2, 0.7))
        amap: AnomalyMap = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), 3) * float(
            rng.uniform(1.6, 3.0)
        )
        amap = (amap + base * 0.5).astype(np.float32)
        score = float(amap.max()) if defect else base
        regions: tuple[Region, ...] = ()
        if self.error_next:
            self.error_next = False
            code, score, err = VerdictCode.ERROR, math.nan, "backend timed out"
        else:
            code = VerdictCode.NG if score >= thr else VerdictCode.OK
            err = ""
        if code is VerdictCode.NG:
            n, _, st, _ = cv2.connectedComponentsWithStats((amap > thr).astype(np.uint8))
            regions = tuple(
                Region(
                    int(st[k, 0]),
                    int(st[k, 1]),
                    int(st[k, 2]),
                    int(st[k, 3]),
                    int(st[k, 4]),
                    score,
                    defect or "anomaly",
                )
                for k in range(1, n)
            )
        total_ms = (time.monotonic() - t0) * 1000 + float(rng.uniform(6, 9))
        v = Verdict(
            inspection_id=iid,
            frame_sequence=seq,
            source_id="camera0",
            trigger_id=None,
            code=code,
            score=score,
            threshold=thr,
            regions=regions,
            defect_class=(defect or "anomaly") if code is VerdictCode.NG else "",
            model_name=self._slots[SlotName.ACTIVE].name or "sim",
            model_version=self._slots[SlotName.ACTIVE].version or "0.0.0",
            timings_ms={
                "preprocess": 1.1,
                "infer": total_ms - 2.0,
                "decide": 0.9,
                "total": total_ms,
            },
            error=err,
            capture_time=t0,
        )
        self.store.commit(v)
        if self.store.wants_images(code):
            self.store.submit_images(ImageJob(iid, code, img, amap, regions, thr))
        with self._lock:
            self._latest = LiveResult(v, img, amap)
            self._fps_times = [t for t in self._fps_times if t > t0 - 5] + [t0]

    # -- PanelBackend -----------------------------------------------------------
    @property
    def threshold(self) -> float:
        return self._threshold if self._threshold is not None else self.model_threshold

    def latest(self) -> LiveResult | None:
        with self._lock:
            return self._latest

    def stats(self, since_unix: float, bucket_s: float) -> Stats:
        c = self.store.counts(since_unix)
        b = self.store.buckets(since_unix, bucket_s)
        return Stats(
            since_unix,
            bucket_s,
            c.ok,
            c.ng,
            c.error,
            tuple(
                StatsBucket(x.start_unix, x.ok, x.ng, x.error, x.latency_ms_p50, x.latency_ms_max)
                for x in b
            ),
        )

    def _record(self, s: object, kinds: set[str]) -> PartRecord:
        from edge.store import StoredVerdict

        assert isinstance(s, StoredVerdict)
        return PartRecord(
            inspection_id=s.inspection_id,
            decided_unix=s.decided_unix,
            code=s.code,
            score=s.score,
            threshold=s.threshold,
            defect_class=s.defect_class,
            regions=s.regions,
            model_name=s.model_name,
            model_version=s.model_version,
            timings_ms=s.timings_ms,
            error=s.error,
            trigger_id=s.trigger_id,
            source_id=s.source_id,
            frame_sequence=s.frame_sequence,
            has_image="image" in kinds,
            has_heatmap="heatmap" in kinds,
        )

    def query_parts(self, query: PartQuery) -> PartPage:
        rows, total = self.store.query(
            code=query.code,
            defect_class=query.defect_class,
            since_unix=query.since_unix,
            until_unix=query.until_unix,
            limit=query.limit,
            offset=query.offset,
        )
        kinds = self.store.image_kinds([r.inspection_id for r in rows])
        return PartPage(
            tuple(self._record(r, kinds.get(r.inspection_id, set())) for r in rows), total
        )

    def part(self, inspection_id: int) -> PartRecord | None:
        s = self.store.get(inspection_id)
        if s is None:
            return None
        return self._record(s, self.store.image_kinds([inspection_id]).get(inspection_id, set()))

    def part_file(self, inspection_id: int, kind: PartFileKind) -> Path | None:
        return self.store.image_path(inspection_id, kind)

    def defect_classes(self) -> Sequence[str]:
        return self.store.defect_classes()

    def config(self) -> LineInspectConfig:
        return self._cfg

    def apply_config(self, new: LineInspectConfig) -> ApplyResult:
        from edge.web.schemaform import diff

        changes = diff(self._cfg.model_dump(mode="json"), new.model_dump(mode="json"))
        if new.camera.id == "refuse-me":
            raise ValueError("camera id 'refuse-me' is refused by the appliance")
        live = tuple(k for k in changes if k.startswith(LIVE_KEYS))
        self._cfg = new
        self.applied.append(new)
        if "pipeline.threshold" in changes:
            self._threshold = new.pipeline.threshold
        return ApplyResult(
            applied=live, restart_required=tuple(k for k in changes if k not in live)
        )

    def set_threshold(self, threshold: float | None) -> None:
        if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError("threshold must be a finite number >= 0")
        self._threshold = threshold
        self._cfg = self._cfg.model_copy(
            update={"pipeline": self._cfg.pipeline.model_copy(update={"threshold": threshold})}
        )

    def model_slots(self) -> Sequence[ModelSlot]:
        return [self._slots[s] for s in SlotName]

    def stage_model(self, package: Path) -> ModelSlot:
        from models.package import PackageError

        try:
            slot = _slot_from_package(SlotName.STAGED, package)
        except PackageError as exc:
            raise ValueError(str(exc)) from None
        self._slots[SlotName.STAGED] = slot
        self.bus.emit("update.staged", "models", f"{slot.name} {slot.version} staged")
        return slot

    def activate_staged(self) -> ModelSlot:
        staged = self._slots[SlotName.STAGED]
        if staged.empty:
            raise ValueError("the staged slot is empty")
        self._slots[SlotName.PREVIOUS] = replace(
            self._slots[SlotName.ACTIVE], slot=SlotName.PREVIOUS
        )
        self._slots[SlotName.ACTIVE] = replace(staged, slot=SlotName.ACTIVE)
        self._slots[SlotName.STAGED] = ModelSlot(slot=SlotName.STAGED)
        if staged.threshold is not None:
            self.model_threshold = staged.threshold
        return self._slots[SlotName.ACTIVE]

    def rollback(self) -> ModelSlot:
        prev = self._slots[SlotName.PREVIOUS]
        if prev.empty:
            raise ValueError("there is no previous model to roll back to")
        self._slots[SlotName.PREVIOUS] = replace(
            self._slots[SlotName.ACTIVE], slot=SlotName.PREVIOUS
        )
        self._slots[SlotName.ACTIVE] = replace(prev, slot=SlotName.ACTIVE)
        return self._slots[SlotName.ACTIVE]

    def health(self) -> HealthSnapshot:
        with self._lock:
            times = list(self._fps_times)
        fps = (
            (len(times) - 1) / (times[-1] - times[0])
            if len(times) > 1 and times[-1] > times[0]
            else None
        )
        return HealthSnapshot(
            camera_connected=True,
            camera_fps=fps,
            camera_dropped_frames=0,
            backend_name="sim:ground-truth",
            backend_latency_ms_p50=7.5,
            backend_latency_ms_p99=9.0,
            pipeline_running=self._thread is not None,
            threshold=self.threshold,
            plc_connected=None,
            uplink_state="disabled",
            store_path=self.store.root,
            extra={"store_images_written": float(self.store.writer_stats().written)},
        )

    def recent_events(self, limit: int) -> Sequence[StatusEvent]:
        return self.bus.history()[-limit:]
