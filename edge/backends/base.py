"""The backend interface and the registry of backends by type key.

A backend runs one graph that follows the model package's graph contract
(input ``image`` [N, C, H, W] float32; outputs ``score`` [N] and
``anomaly_map`` [N, H, W]) and returns the tensors. It knows nothing of
thresholds, regions or verdicts: that is :mod:`edge.decide`'s job.

Backends register themselves by type key (``onnxruntime``, ``tensorrt``)
with their own pydantic config model. A backend module whose libraries are
missing still imports; its :meth:`Backend.check` names what is missing, so
it drops out alone with a clear reason and the others load.
"""

from __future__ import annotations

import abc
import importlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import numpy.typing as npt

from edge.backends.config import BackendConfig

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

INPUT_NAME = "image"
SCORE_NAME = "score"
MAP_NAME = "anomaly_map"

BACKEND_MODULES = ("edge.backends.onnxruntime", "edge.backends.tensorrt")
"""Modules that register a backend when imported."""


class BackendError(Exception):
    """A backend failed to load or to run a graph."""


class BackendUnavailableError(BackendError):
    """This backend cannot run on this machine (libraries or device missing)."""


@dataclass(frozen=True, slots=True)
class GraphSource:
    """One ONNX graph of a model package, as handed to a backend."""

    path: Path
    """The .onnx file."""
    kind: str
    """Which graph of the package: ``fp32``, ``int8`` or ``fp16``."""
    sha256: str
    """The file's sha256 as listed in the package manifest (engine cache key)."""
    input_shape: tuple[int, int, int]
    """(C, H, W) the graph expects, from the manifest's ``input``."""


@dataclass(frozen=True, slots=True)
class BackendOutput:
    """The contract's two output tensors for a batch."""

    score: FloatArray
    """[N] normalised image anomaly scores."""
    anomaly_map: FloatArray
    """[N, H, W] normalised per-pixel anomaly at the graph's input resolution."""


class Backend(abc.ABC):
    """Runs one graph. Created unloaded; :meth:`load` then :meth:`run` many times."""

    type_key: ClassVar[str]
    """Registry key, equal to the config model's ``type``."""

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    @abc.abstractmethod
    def check(cls, config: Any) -> str | None:
        """Why this backend cannot run here with ``config`` (None when it can)."""

    @classmethod
    @abc.abstractmethod
    def choose_graph(cls, config: Any, available: Mapping[str, Path], default: str) -> str:
        """Which of the package's graphs (keys of ``available``) this backend runs."""

    @abc.abstractmethod
    def load(self, graph: GraphSource) -> None:
        """Prepare to run ``graph`` (session, engine); raises :class:`BackendError`."""

    @abc.abstractmethod
    def run(self, image: FloatArray) -> BackendOutput:
        """Run the graph on a preprocessed [N, C, H, W] batch; raises :class:`BackendError`."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """What is running: type, provider/device, graph kind (for logs and the panel)."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to free by default
        """Free sessions, engines and device memory."""


B = TypeVar("B", bound=type[Backend])


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """A registered backend: its key, class and config model."""

    type_key: str
    backend_cls: type[Backend]
    config_cls: type[Any]


_REGISTRY: dict[str, BackendSpec] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_lock = threading.Lock()
_state = {"imported": False}


def register_backend(config_cls: type[Any]) -> Callable[[B], B]:
    """Class decorator: register a backend under its ``type_key`` with its config model."""

    def deco(cls: B) -> B:
        key = cls.type_key
        field = config_cls.model_fields["type"]
        if field.default != key:
            raise TypeError(f"{config_cls.__name__}.type default must be {key!r}")
        _REGISTRY[key] = BackendSpec(key, cls, config_cls)
        return cls

    return deco


def _import_backends() -> None:
    with _lock:
        if _state["imported"]:
            return
        for mod in BACKEND_MODULES:
            try:
                importlib.import_module(mod)
            except Exception as exc:  # a broken module drops out alone
                key = mod.rsplit(".", 1)[-1]
                _IMPORT_ERRORS[key] = f"{type(exc).__name__}: {exc}"
                log.warning("backend module %s failed to import: %s", mod, exc)
        _state["imported"] = True


def registry() -> dict[str, BackendSpec]:
    """Every registered backend by type key."""
    _import_backends()
    return dict(_REGISTRY)


def availability(configs: list[Any] | None = None) -> dict[str, str | None]:
    """For each backend type: None when it can run here, else the reason it cannot.

    ``configs`` may give the config to check a type with; the default config
    of each type is used otherwise.
    """
    specs = registry()
    by_type = {c.type: c for c in configs or []}
    out: dict[str, str | None] = {k: v for k, v in _IMPORT_ERRORS.items()}
    for key, spec in specs.items():
        cfg = by_type.get(key) or spec.config_cls()
        try:
            out[key] = spec.backend_cls.check(cfg)
        except Exception as exc:
            out[key] = f"check failed: {type(exc).__name__}: {exc}"
    return out


def create_backend(config: BackendConfig) -> Backend:
    """A new, unloaded backend for ``config``; raises :class:`BackendUnavailableError` with why."""
    specs = registry()
    spec = specs.get(config.type)
    if spec is None:
        reason = _IMPORT_ERRORS.get(config.type, "no such backend type")
        raise BackendUnavailableError(f"backend {config.type!r} is not available: {reason}")
    why_not = spec.backend_cls.check(config)
    if why_not is not None:
        raise BackendUnavailableError(f"backend {config.type!r} cannot run here: {why_not}")
    return spec.backend_cls(config)


def check_outputs(score: Any, anomaly_map: Any, batch: int) -> BackendOutput:
    """Validate raw output tensors against the graph contract and wrap them."""
    s = np.asarray(score, dtype=np.float32).reshape(-1)
    m = np.asarray(anomaly_map, dtype=np.float32)
    if s.shape != (batch,):
        raise BackendError(f"'{SCORE_NAME}' has shape {s.shape}, expected ({batch},)")
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3 or m.shape[0] != batch:
        raise BackendError(f"'{MAP_NAME}' has shape {m.shape}, expected ({batch}, H, W)")
    return BackendOutput(score=s, anomaly_map=m)
