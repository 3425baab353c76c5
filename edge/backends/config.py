"""Configuration models of the inference backends (one per type key).

They live apart from the backend modules so that the configuration loads on
any machine, whether or not a backend's libraries (TensorRT, CUDA) exist.
The ``type`` field is the discriminator of :data:`BackendConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from edge.config_base import StrictModel

GraphChoice = Literal["auto", "fp32", "int8", "fp16"]


class OnnxRuntimeBackendConfig(StrictModel):
    """ONNX Runtime with the CPU, CUDA or TensorRT execution provider."""

    type: Literal["onnxruntime"] = Field(
        "onnxruntime", title="Backend type", description="ONNX Runtime (CPU, CUDA or TensorRT EP)."
    )
    provider: Literal["cpu", "cuda", "tensorrt"] = Field(
        "cpu",
        title="Execution provider",
        description="cpu (default), cuda, or tensorrt (ONNX Runtime's TensorRT provider; "
        "CUDA and CPU stay behind it for unsupported nodes).",
    )
    graph: GraphChoice = Field(
        "auto",
        title="Graph",
        description="Which graph of the package to run; auto takes the package's default "
        "graph (int8) on cpu/tensorrt and fp16 (else fp32) on cuda.",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        le=256,
        title="Intra-op threads",
        description="Threads inside one operator; 0 = auto: on the cpu provider one per "
        "physical core but one (that core runs capture, the PLC, the store and the panel), "
        "on cuda/tensorrt ONNX Runtime's default.",
    )
    inter_op_threads: int = Field(
        1,
        ge=0,
        le=64,
        title="Inter-op threads",
        description="Threads running independent operators in parallel; 0 = ORT default.",
    )
    spinning: Literal["run", "always", "never"] = Field(
        "run",
        title="Thread spinning",
        description="How ONNX Runtime's intra-op threads wait for work (cpu): run = spin "
        "while a call runs and stop when it returns, so capture, the result store and the "
        "panel get the cores between parts; always = keep spinning after a call (ORT's "
        "default); never = block at once (least CPU; best on a machine shared with other "
        "busy processes).",
    )
    device_id: int = Field(0, ge=0, title="GPU", description="CUDA device index (cuda/tensorrt).")
    trt_fp16: bool = Field(
        True, title="TensorRT FP16", description="Let the TensorRT provider use FP16 kernels."
    )
    trt_int8: bool = Field(
        True,
        title="TensorRT INT8",
        description="Let the TensorRT provider run the QDQ (INT8) graph in INT8.",
    )
    engine_cache_dir: Path = Field(
        Path("var/engines"),
        title="Engine cache",
        description="Folder where the TensorRT provider caches built engines.",
    )


class TensorRTBackendConfig(StrictModel):
    """Native TensorRT (10+) engine built from the package's ONNX graph and cached."""

    type: Literal["tensorrt"] = Field(
        "tensorrt", title="Backend type", description="A native TensorRT engine."
    )
    precision: Literal["int8", "fp16", "fp32"] = Field(
        "int8",
        title="Precision",
        description="int8 builds from the package's QDQ graph; fp16/fp32 from the fp32 graph.",
    )
    device_id: int = Field(0, ge=0, title="GPU", description="CUDA device index.")
    workspace_mb: int = Field(
        1024,
        ge=16,
        le=65536,
        title="Builder workspace (MB)",
        description="Memory TensorRT may use while building tactics.",
    )
    engine_cache_dir: Path = Field(
        Path("var/engines"),
        title="Engine cache",
        description="Folder of serialized engines, keyed by TensorRT version, GPU model and "
        "graph sha256.",
    )
    max_batch: int = Field(
        1,
        ge=1,
        le=64,
        title="Max batch",
        description="Largest batch the engine's optimization profile allows.",
    )


BackendConfig = Annotated[
    OnnxRuntimeBackendConfig | TensorRTBackendConfig,
    Field(discriminator="type"),
]
"""One backend's configuration; ``type`` picks the backend."""
