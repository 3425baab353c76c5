"""`lineinspect doctor`: what this machine offers the appliance, and what the config gets.

Reports ONNX Runtime and its execution providers, TensorRT and CUDA, the
Jetson platform (L4T release, power mode), camera devices (V4L2 nodes and
GStreamer's CSI source), every backend's availability with its reason, and
which backend the given configuration would run. Nothing here loads a model.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge.backends.base import availability
from edge.backends.config import BackendConfig
from edge.config import LineInspectConfig


@dataclass(frozen=True, slots=True)
class CameraDevice:
    """A V4L2 video node and its driver's name."""

    path: str
    name: str


@dataclass(frozen=True, slots=True)
class BackendChoice:
    """Which backend a configuration gets here, and why the others do not."""

    selected: str | None
    """``primary`` or ``fallback`` (None: nothing can run)."""
    label: str
    reasons: dict[str, str] = field(default_factory=dict)
    """Role -> why that backend cannot run here."""


@dataclass(frozen=True, slots=True)
class DoctorReport:
    """Everything `doctor` found."""

    python: str
    machine: str
    onnxruntime: str | None
    providers: list[str]
    tensorrt: str | None
    cuda_devices: list[str]
    jetson: str | None
    """Contents of /etc/nv_tegra_release (L4T version), None off Jetson."""
    power_mode: str | None
    backends: dict[str, str | None]
    """Backend type -> None when it can run here, else the reason."""
    cameras: list[CameraDevice]
    csi_gstreamer: bool
    """GStreamer's nvarguscamerasrc (Jetson CSI cameras) is installed."""
    choice: BackendChoice | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _onnxruntime() -> tuple[str | None, list[str]]:
    try:
        import onnxruntime as ort
    except ImportError:
        return None, []
    return str(ort.__version__), list(ort.get_available_providers())


def _tensorrt() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(trt.__version__)


def _cuda_devices() -> list[str]:
    try:
        from edge.backends.tensorrt import gpu_name, import_cudart

        cudart = import_cudart()
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0:
            return []
        return [gpu_name(cudart, i) for i in range(int(count))]
    except Exception:
        return []


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _power_mode() -> str | None:
    tool = shutil.which("nvpmodel")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "-q"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def camera_devices() -> list[CameraDevice]:
    """V4L2 capture nodes (``/dev/video*``) with their driver names."""
    found = []
    for path in sorted(glob.glob("/dev/video*")):
        name = _read(f"/sys/class/video4linux/{os.path.basename(path)}/name") or "?"
        found.append(CameraDevice(path, name))
    return found


def _has_nvargus() -> bool:
    tool = shutil.which("gst-inspect-1.0")
    if tool is None:
        return False
    try:
        out = subprocess.run(
            [tool, "nvarguscamerasrc"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


def backend_choice(
    cfg: LineInspectConfig, avail: dict[str, str | None] | None = None
) -> BackendChoice:
    """Which configured backend would run here (primary, else fallback), without loading."""
    from edge.backends.base import BackendUnavailableError, registry
    from edge.pipeline import backend_label

    specs = registry()
    reasons: dict[str, str] = {}
    roles: list[tuple[str, BackendConfig]] = [("primary", cfg.backend.primary)]
    if cfg.backend.fallback is not None:
        roles.append(("fallback", cfg.backend.fallback))
    for role, bcfg in roles:
        spec = specs.get(bcfg.type)
        if spec is None:
            reasons[role] = (avail or {}).get(bcfg.type) or "not registered"
            continue
        try:
            why = spec.backend_cls.check(bcfg)
        except BackendUnavailableError as exc:
            why = str(exc)
        if why is None:
            return BackendChoice(role, backend_label(bcfg), reasons)
        reasons[role] = why
    return BackendChoice(None, "none", reasons)


def diagnose(cfg: LineInspectConfig | None) -> DoctorReport:
    """Probe this machine (and the configuration when given)."""
    ort_version, providers = _onnxruntime()
    avail = availability(
        [c for c in ([cfg.backend.primary, cfg.backend.fallback] if cfg else []) if c is not None]
    )
    return DoctorReport(
        python=platform.python_version(),
        machine=f"{platform.system()} {platform.machine()}",
        onnxruntime=ort_version,
        providers=providers,
        tensorrt=_tensorrt(),
        cuda_devices=_cuda_devices(),
        jetson=_read("/etc/nv_tegra_release"),
        power_mode=_power_mode(),
        backends=avail,
        cameras=camera_devices(),
        csi_gstreamer=_has_nvargus(),
        choice=backend_choice(cfg, avail) if cfg else None,
    )


def format_report(r: DoctorReport) -> str:
    """The report as aligned text lines."""
    lines = [
        f"python        {r.python} on {r.machine}",
        f"onnxruntime   {r.onnxruntime or 'not installed'}",
        f"providers     {', '.join(r.providers) or '-'}",
        f"tensorrt      {r.tensorrt or 'not installed'}",
        f"cuda devices  {', '.join(r.cuda_devices) or 'none'}",
        f"jetson        {r.jetson.splitlines()[0] if r.jetson else 'no'}",
    ]
    if r.power_mode:
        lines.append(f"power mode    {r.power_mode.splitlines()[0]}")
    lines.append("backends")
    for key, why in sorted(r.backends.items()):
        lines.append(f"  {key:12s}{'available' if why is None else 'unavailable: ' + why}")
    lines.append("cameras")
    if not r.cameras:
        lines.append("  (no /dev/video* device)")
    lines.extend(f"  {c.path:12s}{c.name}" for c in r.cameras)
    lines.append(f"  CSI (GStreamer nvarguscamerasrc): {'yes' if r.csi_gstreamer else 'no'}")
    if r.choice is not None:
        if r.choice.selected is None:
            lines.append("config gets   NO BACKEND")
        else:
            lines.append(f"config gets   {r.choice.selected}: {r.choice.label}")
        for role, why in r.choice.reasons.items():
            lines.append(f"  {role} unavailable: {why}")
    return "\n".join(lines)


def build_engines(cfg: LineInspectConfig) -> list[str]:
    """Build and cache the TensorRT engines the configuration needs (first-boot step).

    For a ``tensorrt`` backend this builds the serialized engine of the
    configured package; for ``onnxruntime`` with the TensorRT provider a
    session is created, which fills the provider's engine cache. Returns a
    line per backend saying what was done. Raises on a failed build.
    """
    from edge.backends.base import create_backend, registry
    from edge.pipeline import backend_label, graph_source
    from models.package import load_package

    package = cfg.model.package
    if package is None:
        from cloud_sync.slots import active_package_path

        package = active_package_path(Path(cfg.uplink.updates.slots_dir))
        if package is None:
            return [
                "no model package yet (model.package unset, no active slot): nothing to "
                "build; the engine is built when the first model is loaded"
            ]
    done: list[str] = []
    with load_package(Path(package)) as pkg:
        for bcfg in (cfg.backend.primary, cfg.backend.fallback):
            if bcfg is None:
                continue
            is_trt = bcfg.type == "tensorrt" or (
                bcfg.type == "onnxruntime" and bcfg.provider == "tensorrt"
            )
            if not is_trt:
                done.append(f"{backend_label(bcfg)}: no engine needed")
                continue
            spec = registry()[bcfg.type]
            available = {k: pkg.graph_path(k) for k in pkg.graph_variants}
            kind = spec.backend_cls.choose_graph(bcfg, available, pkg.manifest.default_graph)
            backend = create_backend(bcfg)
            try:
                backend.load(graph_source(pkg, kind))
                done.append(
                    f"{backend_label(bcfg)}: engine ready for {pkg.model_id} ({kind}) "
                    f"in {bcfg.engine_cache_dir}"
                )
            finally:
                backend.close()
    return done
