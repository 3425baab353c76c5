"""Machine health the panel reads itself: disk, CPU load, CPU and GPU temperature."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil

_THERMAL = Path("/sys/class/thermal")


@dataclass(frozen=True, slots=True)
class SystemInfo:
    disk_path: str
    disk_total_bytes: int | None
    disk_free_bytes: int | None
    cpu_percent: float | None
    cpu_temp_c: float | None
    gpu_temp_c: float | None
    memory_used_ratio: float | None

    @property
    def disk_used_ratio(self) -> float | None:
        if not self.disk_total_bytes or self.disk_free_bytes is None:
            return None
        return 1.0 - self.disk_free_bytes / self.disk_total_bytes


def _thermal_zones() -> dict[str, float]:
    """Jetson and most SoCs: /sys/class/thermal/thermal_zone*/{type,temp} (milli-degrees)."""
    out: dict[str, float] = {}
    for zone in sorted(_THERMAL.glob("thermal_zone*")):
        try:
            name = (zone / "type").read_text().strip().lower()
            out[name] = int((zone / "temp").read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
    return out


def _cpu_temp(zones: dict[str, float]) -> float | None:
    try:
        sensors = psutil.sensors_temperatures()
    except (AttributeError, OSError):
        sensors = {}
    for key in ("coretemp", "k10temp", "cpu_thermal", "cpu-thermal", "zenpower"):
        entries = sensors.get(key)
        if entries:
            return float(max(e.current for e in entries))
    for name, temp in zones.items():
        if "cpu" in name or name in {"x86_pkg_temp", "soc_thermal"}:
            return temp
    return None


def _gpu_temp(zones: dict[str, float]) -> float | None:
    for name, temp in zones.items():
        if "gpu" in name:
            return temp
    return None


def read_system(disk_path: Path) -> SystemInfo:
    """A snapshot of this machine's health (each reading None when not available here)."""
    path = disk_path
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
        total: int | None = usage.total
        free: int | None = usage.free
    except OSError:
        total = free = None
    zones = _thermal_zones()
    try:
        mem: float | None = psutil.virtual_memory().percent / 100.0
    except OSError:
        mem = None
    return SystemInfo(
        disk_path=str(path),
        disk_total_bytes=total,
        disk_free_bytes=free,
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        cpu_temp_c=_cpu_temp(zones),
        gpu_temp_c=_gpu_temp(zones),
        memory_used_ratio=mem,
    )
