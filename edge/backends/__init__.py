"""Inference backends behind one small interface (see :mod:`edge.backends.base`)."""

from edge.backends.base import (
    Backend,
    BackendError,
    BackendOutput,
    BackendUnavailableError,
    GraphSource,
    availability,
    create_backend,
    registry,
)

__all__ = [
    "Backend",
    "BackendError",
    "BackendOutput",
    "BackendUnavailableError",
    "GraphSource",
    "availability",
    "create_backend",
    "registry",
]
