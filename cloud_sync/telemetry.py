"""Telemetry: verdict statistics per interval plus device health readings.

:class:`VerdictStats` is fed every verdict the outbox feeder queues; the
agent turns a snapshot into a :class:`cloud_sync.topics.Telemetry` message.
Temperatures are read where the machine exposes them (``psutil``'s sensors,
``/sys/class/thermal`` zones such as Jetson's ``GPU-therm``) and are None
where it does not.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

_RESERVOIR = 4096


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """Counts and latency percentiles over one interval."""

    ok: int
    ng: int
    error: int
    total_ok: int
    total_ng: int
    total_error: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    @property
    def count(self) -> int:
        return self.ok + self.ng + self.error


class VerdictStats:
    """Thread-safe per-interval counters; latencies kept in a bounded reservoir."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {"OK": 0, "NG": 0, "ERROR": 0}
        self._totals = {"OK": 0, "NG": 0, "ERROR": 0}
        self._lat: list[float] = []
        self._seen = 0
        self._recent: deque[tuple[str, float | None]] = deque(maxlen=2000)

    def observe(self, code: str, latency_ms: float | None) -> None:
        with self._lock:
            if code in self._counts:
                self._counts[code] += 1
                self._totals[code] += 1
            self._recent.append((code, latency_ms))
            if latency_ms is None:
                return
            self._seen += 1
            if len(self._lat) < _RESERVOIR:
                self._lat.append(latency_ms)
            else:
                j = random.randrange(self._seen)
                if j < _RESERVOIR:
                    self._lat[j] = latency_ms

    def snapshot(self, reset: bool = True) -> StatsSnapshot:
        with self._lock:
            lat = np.asarray(self._lat, dtype=np.float64)
            c, t = dict(self._counts), dict(self._totals)
            if reset:
                self._counts = {"OK": 0, "NG": 0, "ERROR": 0}
                self._lat = []
                self._seen = 0
        p50: float | None = None
        p95: float | None = None
        p99: float | None = None
        mx: float | None = None
        if lat.size:
            p50, p95, p99 = (float(x) for x in np.percentile(lat, [50, 95, 99]))
            mx = float(lat.max())
        return StatsSnapshot(
            c["OK"], c["NG"], c["ERROR"], t["OK"], t["NG"], t["ERROR"], p50, p95, p99, mx
        )

    def recent(self) -> list[tuple[str, float | None]]:
        """The last verdicts seen (code, latency) for the health watch."""
        with self._lock:
            return list(self._recent)


def error_rate_and_p95(
    samples: list[tuple[str, float | None]],
) -> tuple[float | None, float | None]:
    """Share of ERROR verdicts and p95 latency of some samples (None when empty)."""
    if not samples:
        return None, None
    errors = sum(1 for code, _ in samples if code == "ERROR")
    lats = [x for _, x in samples if x is not None]
    p95 = float(np.percentile(np.asarray(lats), 95)) if lats else None
    return errors / len(samples), p95


@dataclass(frozen=True, slots=True)
class SystemReading:
    disk_free_mb: float | None
    disk_used_pct: float | None
    cpu_temp_c: float | None
    gpu_temp_c: float | None
    cpu_pct: float | None


_CPU_SENSORS = (
    "coretemp",
    "k10temp",
    "cpu_thermal",
    "cpu-thermal",
    "soc_thermal",
    "zenpower",
    "acpitz",
)


def _thermal_zones() -> dict[str, float]:
    out: dict[str, float] = {}
    for zone in Path("/sys/class/thermal").glob("thermal_zone*"):
        try:
            kind = (zone / "type").read_text().strip()
            milli = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):
            continue
        out[kind] = milli / 1000.0
    return out


def read_temperatures() -> tuple[float | None, float | None]:
    """(CPU, GPU) temperature in °C where readable."""
    cpu: float | None = None
    gpu: float | None = None
    try:
        sensors = psutil.sensors_temperatures()
    except (AttributeError, OSError):
        sensors = {}
    for name in _CPU_SENSORS:
        entries = sensors.get(name)
        if entries:
            cpu = max(e.current for e in entries)
            break
    for name, entries in sensors.items():
        if "gpu" in name.lower() and entries:
            gpu = max(e.current for e in entries)
    zones = _thermal_zones()
    for kind, temp in zones.items():
        low = kind.lower()
        if gpu is None and "gpu" in low:
            gpu = temp
        if cpu is None and ("cpu" in low or "x86_pkg" in low):
            cpu = temp
    return cpu, gpu


def read_system(disk_path: Path) -> SystemReading:
    """Disk space where the outbox lives, temperatures and CPU load."""
    try:
        du = psutil.disk_usage(str(disk_path))
        free_mb: float | None = du.free / 1e6
        used: float | None = float(du.percent)
    except OSError:
        free_mb = used = None
    cpu_t, gpu_t = read_temperatures()
    try:
        cpu_pct: float | None = float(psutil.cpu_percent(interval=None))
    except OSError:
        cpu_pct = None
    return SystemReading(free_mb, used, cpu_t, gpu_t, cpu_pct)
