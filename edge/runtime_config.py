"""Model, backend, pipeline and result-store configuration (owned by edge runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from edge.backends.config import BackendConfig, OnnxRuntimeBackendConfig
from edge.config_base import StrictModel


class ModelConfig(StrictModel):
    package: Path | None = Field(
        None,
        title="Model package",
        description="Folder or .tar of the station's initial model package: installed "
        "into the model slots at the first start (and again whenever this names a "
        "different package), so later activations survive restarts; None runs the "
        "active slot (`demo` teaches a model on first start).",
    )
    trusted_keys: list[Path] = Field(
        default_factory=list,
        title="Trusted public keys",
        description="Ed25519 public key files; when set, a package must carry a valid "
        "manifest.sig from one of them.",
    )
    verify_reference: bool = Field(
        True,
        title="Check reference scores",
        description="On load, score the package's reference images and refuse the package "
        "when the scores disagree with the manifest beyond its tolerance.",
    )


class BackendSection(StrictModel):
    """Which backend runs the graph, its fallback and the watchdog's deadline."""

    primary: BackendConfig = Field(
        default_factory=OnnxRuntimeBackendConfig,
        title="Backend",
        description="The backend that runs the model (type: onnxruntime | tensorrt).",
    )
    fallback: BackendConfig | None = Field(
        None,
        title="Fallback backend",
        description="Second backend used when the first cannot load here, hangs or keeps "
        "failing; none reloads the first.",
    )
    deadline_ms: float = Field(
        1000.0,
        gt=0,
        le=60_000,
        title="Inference deadline (ms)",
        description="A backend call longer than this yields an ERROR verdict and a "
        "backend.hung event, and the backend is reloaded or replaced by the fallback.",
    )
    max_consecutive_errors: int = Field(
        3,
        ge=1,
        le=1000,
        title="Errors before recovery",
        description="Consecutive backend errors after which it is reloaded / replaced.",
    )
    warmup_runs: int = Field(
        3,
        ge=0,
        le=100,
        title="Warm-up runs",
        description="Inferences run at load time before the first part.",
    )


class RoiConfig(StrictModel):
    """A rectangle in frame pixels; only anomalies inside it count."""

    x: int = Field(0, ge=0, title="Left", description="Left edge in frame pixels.")
    y: int = Field(0, ge=0, title="Top", description="Top edge in frame pixels.")
    w: int = Field(..., gt=0, title="Width", description="Width in frame pixels.")
    h: int = Field(..., gt=0, title="Height", description="Height in frame pixels.")


class PipelineConfig(StrictModel):
    threshold: float | None = Field(
        None,
        title="Image threshold override",
        description="Normalised score above which a part is NG; "
        "None uses the model package's threshold.",
    )
    pixel_threshold: float | None = Field(
        None,
        gt=0,
        title="Pixel threshold override",
        description="Anomaly-map level that cuts defect regions; None uses the package's.",
    )
    roi: RoiConfig | None = Field(
        None,
        title="Region of interest",
        description="Only this part of the frame is judged; None judges the whole frame.",
    )
    min_defect_area_px: int = Field(
        0,
        ge=0,
        title="Minimum defect area (px)",
        description="An NG needs at least one defect region this large (frame pixels); "
        "0 decides on the score alone.",
    )
    max_regions: int = Field(
        16,
        ge=1,
        le=1000,
        title="Max regions",
        description="Largest number of defect regions reported.",
    )
    python_switch_interval_ms: float = Field(
        0.5,
        ge=0.05,
        le=50.0,
        title="Python switch interval (ms)",
        description="How long a Python thread may keep the interpreter while another is "
        "ready (sys.setswitchinterval; Python's default is 5 ms): the inspection thread "
        "returning from the backend waits at most this long behind the Modbus server, the "
        "panel or the uplink. Set for the whole process while the appliance runs.",
    )


class StoreConfig(StrictModel):
    path: Path = Field(
        Path("var/results"),
        title="Store folder",
        description="Folder holding results.sqlite and the image files.",
    )
    image_quota_mb: float = Field(
        2048.0,
        gt=0,
        title="Image quota (MB)",
        description="Most disk space the stored images may use; oldest OK images go first.",
    )
    min_free_mb: float = Field(
        64.0,
        ge=0,
        title="Free space reserve (MB)",
        description="Images are not written (and old ones are deleted) when the disk has "
        "less free space than this, so verdicts can always be committed.",
    )
    retention_days: float = Field(
        30.0,
        gt=0,
        title="Image retention (days)",
        description="Images older than this are deleted.",
    )
    save_ng_images: bool = Field(
        True, title="Save NG images", description="Keep the frame and heatmap of every NG/ERROR."
    )
    ok_sample_every: int = Field(
        100,
        ge=0,
        title="OK image sample",
        description="Keep the frame of every n-th OK part; 0 keeps none.",
    )
    image_format: Literal["jpg", "png"] = Field(
        "jpg", title="Image format", description="File format of stored frames."
    )
    writer_queue: int = Field(
        32,
        ge=1,
        le=10_000,
        title="Writer queue",
        description="Images waiting for the background writer; when "
        "full, new images are skipped (counted), never waited for.",
    )
    synchronous: Literal["normal", "full"] = Field(
        "normal",
        title="SQLite synchronous",
        description="normal: a verdict survives a crash or SIGKILL of the appliance; "
        "full: it also survives a power cut (one fsync per verdict).",
    )

    @model_validator(mode="after")
    def _quota_sane(self) -> StoreConfig:
        if self.image_quota_mb < 1:
            raise ValueError("image_quota_mb below 1 MB cannot hold one image")
        return self
