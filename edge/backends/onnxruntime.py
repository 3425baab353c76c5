"""ONNX Runtime backend: CPU (default), CUDA and TensorRT execution providers."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge.backends.base import (
    INPUT_NAME,
    MAP_NAME,
    SCORE_NAME,
    Backend,
    BackendError,
    BackendOutput,
    FloatArray,
    GraphSource,
    check_outputs,
    register_backend,
)
from edge.backends.config import OnnxRuntimeBackendConfig

log = logging.getLogger(__name__)

_PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyperthreads counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            pkg = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))  # no topology (some containers): count logical CPUs
        cores.add((pkg, core))
    return max(1, len(cores))


def auto_intra_op_threads(cores: int | None = None) -> int:
    """``intra_op_threads: 0`` on the CPU provider: one thread per physical core but one.

    The core left over runs the rest of the appliance (capture, decision, the result
    store, the Modbus server, the panel, the uplink). A graph spread over every core
    waits for its slowest thread whenever any of that work preempts one, which on a
    2-core station cost 20 % of throughput and a longer tail than the one-thread
    graph (docs/runtime.md, "Threads").
    """
    n = physical_cores() if cores is None else cores
    return max(1, n - 1)


# session config entries per ``spinning`` (onnxruntime_session_options_config_keys.h)
_SPINNING: dict[str, dict[str, str]] = {
    "run": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"},
    "always": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "0"},
    "never": {"session.intra_op.allow_spinning": "0"},
}


def available_providers() -> list[str]:
    """ONNX Runtime's execution providers on this machine ([] when ORT is missing)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


@register_backend(OnnxRuntimeBackendConfig)
class OnnxRuntimeBackend(Backend):
    """Runs the package graph in an ``onnxruntime.InferenceSession``."""

    type_key = "onnxruntime"
    config: OnnxRuntimeBackendConfig

    def __init__(self, config: OnnxRuntimeBackendConfig) -> None:
        super().__init__(config)
        self._session: Any = None
        self._graph: GraphSource | None = None
        self._providers: list[str] = []

    @classmethod
    def check(cls, config: Any) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"onnxruntime is not installed ({exc}); pip install onnxruntime"
        want = _PROVIDER_NAMES[config.provider]
        have = available_providers()
        if want not in have:
            hint = (
                "install onnxruntime-gpu (or the Jetson wheel) with CUDA/TensorRT"
                if config.provider != "cpu"
                else "reinstall onnxruntime"
            )
            return f"{want} is not among ONNX Runtime's providers {have}; {hint}"
        return None

    @classmethod
    def choose_graph(cls, config: Any, available: Mapping[str, Path], default: str) -> str:
        if config.graph != "auto":
            if config.graph not in available:
                raise BackendError(
                    f"the package has no {config.graph} graph (it has {sorted(available)})"
                )
            return str(config.graph)
        if config.provider == "cuda":
            for kind in ("fp16", "fp32"):
                if kind in available:
                    return kind
        if config.provider == "tensorrt" and not config.trt_int8 and "fp32" in available:
            return "fp32"
        if default in available:
            return default
        return sorted(available)[0]

    def _provider_list(self) -> list[Any]:
        c = self.config
        cuda = ("CUDAExecutionProvider", {"device_id": c.device_id})
        if c.provider == "cpu":
            return ["CPUExecutionProvider"]
        if c.provider == "cuda":
            return [cuda, "CPUExecutionProvider"]
        c.engine_cache_dir.mkdir(parents=True, exist_ok=True)
        trt_opts = {
            "device_id": c.device_id,
            "trt_fp16_enable": c.trt_fp16,
            "trt_int8_enable": c.trt_int8,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(c.engine_cache_dir),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(c.engine_cache_dir),
        }
        return [("TensorrtExecutionProvider", trt_opts), cuda, "CPUExecutionProvider"]

    def _intra_op_threads(self) -> int:
        """The configured count; 0 means :func:`auto_intra_op_threads` on the CPU provider
        (on CUDA/TensorRT the CPU only runs leftovers: ONNX Runtime's own default)."""
        n = self.config.intra_op_threads
        if n == 0 and self.config.provider == "cpu":
            return auto_intra_op_threads()
        return n

    def load(self, graph: GraphSource) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._intra_op_threads()
        opts.inter_op_num_threads = self.config.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        for key, value in _SPINNING[self.config.spinning].items():
            opts.add_session_config_entry(key, value)
        try:
            session = ort.InferenceSession(
                str(graph.path), sess_options=opts, providers=self._provider_list()
            )
        except Exception as exc:
            raise BackendError(f"ONNX Runtime cannot load {graph.path.name}: {exc}") from exc
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if inputs != [INPUT_NAME] or not {SCORE_NAME, MAP_NAME} <= set(outputs):
            raise BackendError(
                f"{graph.path.name} breaks the graph contract: inputs {inputs}, outputs "
                f"{outputs} (expected input '{INPUT_NAME}', outputs '{SCORE_NAME}', "
                f"'{MAP_NAME}')"
            )
        self._session = session
        self._graph = graph
        self._providers = list(session.get_providers())
        log.debug("onnxruntime session for %s on %s", graph.path.name, self._providers)

    def run(self, image: FloatArray) -> BackendOutput:
        if self._session is None:
            raise BackendError("backend not loaded")
        x = np.ascontiguousarray(image, dtype=np.float32)
        try:
            score, amap = self._session.run([SCORE_NAME, MAP_NAME], {INPUT_NAME: x})
        except Exception as exc:
            raise BackendError(f"ONNX Runtime run failed: {exc}") from exc
        return check_outputs(score, amap, x.shape[0])

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.type_key,
            "provider": self.config.provider,
            "providers": self._providers,
            "graph": self._graph.kind if self._graph else None,
            "intra_op_threads": self._intra_op_threads(),
            "inter_op_threads": self.config.inter_op_threads,
            "spinning": self.config.spinning,
        }

    def close(self) -> None:
        self._session = None
