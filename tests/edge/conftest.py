"""Fixtures for the edge runtime tests: real toy model packages, stores, pipelines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.events import EventBus
from edge.runtime_config import StoreConfig
from edge.store import ResultStore
from models.package import ModelPackage, load_package
from models.toy_package import build_toy_package


@pytest.fixture(scope="session")
def toy_package_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real toy package (brightness graph, 64x64 gray) shared by the session."""
    return build_toy_package(tmp_path_factory.mktemp("pkg") / "toy")


@pytest.fixture(scope="session")
def toy_rgb_package_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy graph with 3-channel RGB input at 96x64."""
    return build_toy_package(
        tmp_path_factory.mktemp("pkg") / "toy-rgb",
        color="rgb",
        width=96,
        height=64,
        name="toy-rgb",
        version="2.0.0",
    )


@pytest.fixture
def toy_package(toy_package_dir: Path) -> Iterator[ModelPackage]:
    with load_package(toy_package_dir) as pkg:
        yield pkg


@pytest.fixture
def events() -> EventBus:
    return EventBus()


@pytest.fixture
def store(tmp_path: Path, events: EventBus) -> Iterator[ResultStore]:
    s = ResultStore(StoreConfig(path=tmp_path / "results", ok_sample_every=1), events)
    s.start()
    yield s
    s.stop()
