"""Native TensorRT (10+) backend: build, cache and run a serialized engine.

The engine is built from the package's ONNX graph: INT8 from the QDQ graph
(explicit quantization, so no calibrator is needed) or FP16/FP32 from the
fp32 graph. Built engines are cached under ``engine_cache_dir`` with a key
made of the TensorRT version, the GPU model, the graph's sha256 and the
build settings, so a new JetPack, another module or another model rebuilds
and everything else loads in a second.

Inference uses device buffers and a CUDA stream through cuda-python
(``cuda.bindings.runtime``, or ``cuda.cudart`` on older releases). The
module imports on any machine: ``tensorrt`` and ``cuda`` are imported only
when the backend is checked or loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
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
    BackendUnavailableError,
    FloatArray,
    GraphSource,
    check_outputs,
    register_backend,
)
from edge.backends.config import TensorRTBackendConfig

log = logging.getLogger(__name__)


def import_tensorrt() -> Any:
    """The ``tensorrt`` module (10+), or :class:`BackendUnavailableError` saying why not."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT Python API not installed ({exc}); on Jetson it ships with JetPack "
            "(python3-libnvinfer), elsewhere pip install tensorrt"
        ) from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is too old; 10 or newer needed")
    return trt


def import_cudart() -> Any:
    """cuda-python's runtime module, or :class:`BackendUnavailableError` saying why not."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise BackendUnavailableError(
                f"cuda-python not installed ({exc}); pip install cuda-python"
            ) from None
    return cudart


def _cuda_check(result: Any, what: str) -> Any:
    """Unwrap cuda-python's ``(err, *values)`` tuples, raising on an error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA {what} failed: {err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_name(cudart: Any, device_id: int) -> str:
    """The GPU model's name (e.g. ``Orin``), used in the engine cache key."""
    props = _cuda_check(cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(name).strip()


def engine_cache_key(
    trt_version: str, gpu: str, graph_sha256: str, config: TensorRTBackendConfig
) -> str:
    """The cache key of an engine: TensorRT version, GPU model, graph sha256, build settings."""
    parts = [trt_version, gpu, graph_sha256, config.precision, str(config.max_batch)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def asymmetric_quantization(path: Path) -> list[str]:
    """Names of QuantizeLinear/DequantizeLinear nodes TensorRT's explicit INT8 cannot take.

    TensorRT needs symmetric signed int8 Q/DQ (zero point 0). ONNX Runtime's fastest CPU
    form (``Int8Settings(activations="u8")``) quantizes activations to uint8 with a zero
    point, which TensorRT's parser rejects with an opaque message; this names the nodes
    before a build is attempted (no GPU needed).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = attr.t
    bad = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zp = consts.get(node.input[2])
        if zp is None:
            continue
        if zp.data_type == onnx.TensorProto.UINT8 or numpy_helper.to_array(zp).any():
            bad.append(node.name or node.output[0])
    return bad


def build_engine(trt: Any, graph: GraphSource, config: TensorRTBackendConfig) -> bytes:
    """Build a serialized engine from an ONNX graph (slow: minutes on a Jetson)."""
    if config.precision == "int8":
        bad = asymmetric_quantization(graph.path)
        if bad:
            raise BackendError(
                f"{graph.path.name} quantizes with uint8 / non-zero zero points ({len(bad)} "
                f"Q/DQ nodes, e.g. {bad[0]}): ONNX Runtime's CPU form, which TensorRT's "
                "explicit INT8 cannot take. Teach the package with "
                "`--set int8_activations=s8` for TensorRT, or set precision: fp16"
            )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph.path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse {graph.path.name}: {errors}")
    bconf = builder.create_builder_config()
    bconf.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
    if config.precision in ("fp16", "int8"):
        bconf.set_flag(trt.BuilderFlag.FP16)
    if config.precision == "int8":
        bconf.set_flag(trt.BuilderFlag.INT8)  # scales come from the QDQ nodes
    c, h, w = graph.input_shape
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, c, h, w), (1, c, h, w), (config.max_batch, c, h, w))
    bconf.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, bconf)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {graph.path.name}")
    return bytes(serialized)


@dataclass(frozen=True, slots=True)
class EngineFile:
    """A cached engine and the metadata written next to it."""

    path: Path
    key: str
    built: bool
    """True when this call built it, False when it came from the cache."""


def ensure_engine(graph: GraphSource, config: TensorRTBackendConfig) -> EngineFile:
    """The cached engine for ``graph`` on this GPU, building it first when missing.

    This is also the first-boot step of deploy/jetson (``lineinspect engine``).
    """
    trt = import_tensorrt()
    cudart = import_cudart()
    gpu = gpu_name(cudart, config.device_id)
    key = engine_cache_key(str(trt.__version__), gpu, graph.sha256, config)
    cache = config.engine_cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{graph.path.stem}-{config.precision}-{key}.engine"
    if path.exists():
        return EngineFile(path, key, built=False)
    log.info(
        "building TensorRT %s engine for %s on %s (TensorRT %s); this takes a while",
        config.precision,
        graph.path.name,
        gpu,
        trt.__version__,
    )
    data = build_engine(trt, graph, config)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    meta = {
        "tensorrt": str(trt.__version__),
        "gpu": gpu,
        "graph_sha256": graph.sha256,
        "graph": graph.path.name,
        "precision": config.precision,
        "max_batch": config.max_batch,
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return EngineFile(path, key, built=True)


@register_backend(TensorRTBackendConfig)
class TensorRTBackend(Backend):
    """Runs a cached TensorRT engine with device buffers on its own CUDA stream."""

    type_key = "tensorrt"
    config: TensorRTBackendConfig

    def __init__(self, config: TensorRTBackendConfig) -> None:
        super().__init__(config)
        self._trt: Any = None
        self._cudart: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._device_ptrs: dict[str, int] = {}
        self._capacity: dict[str, int] = {}
        self._graph: GraphSource | None = None
        self._engine_file: EngineFile | None = None

    @classmethod
    def check(cls, config: Any) -> str | None:
        try:
            import_tensorrt()
            cudart = import_cudart()
        except BackendUnavailableError as exc:
            return str(exc)
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count <= config.device_id:
            return f"no CUDA device {config.device_id} (cudaGetDeviceCount: {err}, {count})"
        return None

    @classmethod
    def choose_graph(cls, config: Any, available: Mapping[str, Path], default: str) -> str:
        want = "int8" if config.precision == "int8" else "fp32"
        if want not in available:
            raise BackendError(
                f"TensorRT {config.precision} needs the package's {want} graph "
                f"(it has {sorted(available)})"
            )
        return want

    def load(self, graph: GraphSource) -> None:
        self._trt = trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        _cuda_check(cudart.cudaSetDevice(self.config.device_id), "cudaSetDevice")
        self._engine_file = ensure_engine(graph, self.config)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(self._engine_file.path.read_bytes())
        if engine is None:
            raise BackendError(f"cannot deserialize {self._engine_file.path}; delete it to rebuild")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if INPUT_NAME not in names or SCORE_NAME not in names or MAP_NAME not in names:
            raise BackendError(f"engine tensors {names} break the graph contract")
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = _cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._graph = graph

    def _device_buffer(self, name: str, nbytes: int) -> int:
        if self._capacity.get(name, 0) < nbytes:
            if name in self._device_ptrs:
                _cuda_check(self._cudart.cudaFree(self._device_ptrs[name]), "cudaFree")
            ptr = _cuda_check(self._cudart.cudaMalloc(nbytes), "cudaMalloc")
            self._device_ptrs[name] = int(ptr)
            self._capacity[name] = nbytes
        return self._device_ptrs[name]

    def run(self, image: FloatArray) -> BackendOutput:
        if self._context is None:
            raise BackendError("backend not loaded")
        trt, cudart, ctx = self._trt, self._cudart, self._context
        x = np.ascontiguousarray(image, dtype=np.float32)
        if not ctx.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise BackendError(f"engine rejects input shape {x.shape}")
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        d_in = self._device_buffer(INPUT_NAME, x.nbytes)
        ctx.set_tensor_address(INPUT_NAME, d_in)
        outputs: dict[str, np.ndarray[Any, Any]] = {}
        for name in (SCORE_NAME, MAP_NAME):
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            host = np.empty(shape, dtype=dtype)
            ctx.set_tensor_address(name, self._device_buffer(name, max(host.nbytes, 1)))
            outputs[name] = host
        _cuda_check(
            cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, h2d, self._stream),
            "cudaMemcpyAsync H2D",
        )
        if not ctx.execute_async_v3(self._stream):
            raise BackendError("TensorRT execute_async_v3 failed")
        for name, host in outputs.items():
            _cuda_check(
                cudart.cudaMemcpyAsync(
                    host.ctypes.data, self._device_ptrs[name], host.nbytes, d2h, self._stream
                ),
                "cudaMemcpyAsync D2H",
            )
        _cuda_check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return check_outputs(outputs[SCORE_NAME], outputs[MAP_NAME], x.shape[0])

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.type_key,
            "precision": self.config.precision,
            "device_id": self.config.device_id,
            "graph": self._graph.kind if self._graph else None,
            "engine": str(self._engine_file.path) if self._engine_file else None,
        }

    def close(self) -> None:
        if self._cudart is not None:
            for ptr in self._device_ptrs.values():
                self._cudart.cudaFree(ptr)
            if self._stream is not None:
                self._cudart.cudaStreamDestroy(self._stream)
        self._device_ptrs.clear()
        self._capacity.clear()
        self._stream = None
        self._context = None
        self._engine = None
