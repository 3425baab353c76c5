"""Backends: registry, availability, the ONNX Runtime round trip, contract checks."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge.backends import BackendError, BackendUnavailableError, availability, create_backend
from edge.backends.config import OnnxRuntimeBackendConfig, TensorRTBackendConfig
from edge.backends.onnxruntime import auto_intra_op_threads, physical_cores
from edge.backends.tensorrt import engine_cache_key
from edge.pipeline import graph_source, verify_references
from models.package import ModelPackage, load_package

# Stated tolerance of the round trip: the same graph bytes on the same runtime
# must reproduce the manifest's reference scores to within float32 rounding.
ROUND_TRIP_TOL = 1e-5


def test_registry_lists_both_backends_and_tensorrt_drops_out_alone() -> None:
    avail = availability()
    assert avail["onnxruntime"] is None
    assert "tensorrt" in avail
    reason = avail["tensorrt"]
    assert reason is None or "TensorRT" in reason or "CUDA" in reason


def test_missing_provider_is_a_clear_unavailable_error() -> None:
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        create_backend(OnnxRuntimeBackendConfig(provider="cuda"))


def test_tensorrt_unavailable_names_the_reason() -> None:
    if availability()["tensorrt"] is None:
        pytest.skip("TensorRT is available here")
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        create_backend(TensorRTBackendConfig())


@pytest.mark.parametrize("graph", ["fp32", "int8"])
def test_round_trip_reference_scores(toy_package: ModelPackage, graph: str) -> None:
    backend = create_backend(OnnxRuntimeBackendConfig(graph=graph, intra_op_threads=1))  # type: ignore[arg-type]
    backend.load(graph_source(toy_package, graph))
    for ref, path in toy_package.reference_images():
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        out = backend.run(toy_package.preprocess(image))
        assert out.score.shape == (1,)
        assert out.anomaly_map.shape == (1, 64, 64)
        assert abs(float(out.score[0]) - ref.scores[graph]) <= ROUND_TRIP_TOL
    assert verify_references(backend, toy_package, graph) == []
    assert backend.describe()["providers"] == ["CPUExecutionProvider"]
    backend.close()


@pytest.mark.parametrize(
    ("spinning", "allow", "stop"),
    [("run", "1", "1"), ("always", "1", "0"), ("never", "0", None)],
)
def test_spinning_setting_reaches_the_session(
    toy_package: ModelPackage, spinning: str, allow: str, stop: str | None
) -> None:
    backend = create_backend(
        OnnxRuntimeBackendConfig(intra_op_threads=2, spinning=spinning)  # type: ignore[arg-type]
    )
    backend.load(graph_source(toy_package, "fp32"))
    opts = backend._session.get_session_options()  # type: ignore[attr-defined]
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == allow
    if stop is not None:
        assert opts.get_session_config_entry("session.force_spinning_stop") == stop
    assert backend.describe()["spinning"] == spinning
    ref, path = next(iter(toy_package.reference_images()))
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    score = float(backend.run(toy_package.preprocess(image)).score[0])
    assert abs(score - ref.scores["fp32"]) <= ROUND_TRIP_TOL
    backend.close()


def test_auto_threads_leave_one_core_to_the_rest_of_the_appliance(
    toy_package: ModelPackage,
) -> None:
    assert [auto_intra_op_threads(n) for n in (1, 2, 4, 8)] == [1, 1, 3, 7]
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
    backend = create_backend(OnnxRuntimeBackendConfig())  # intra_op_threads 0 = auto
    backend.load(graph_source(toy_package, "fp32"))
    opts = backend._session.get_session_options()  # type: ignore[attr-defined]
    assert opts.intra_op_num_threads == auto_intra_op_threads() == max(1, physical_cores() - 1)
    assert backend.describe()["intra_op_threads"] == opts.intra_op_num_threads
    backend.close()
    fixed = create_backend(OnnxRuntimeBackendConfig(intra_op_threads=2))
    fixed.load(graph_source(toy_package, "fp32"))
    assert fixed._session.get_session_options().intra_op_num_threads == 2  # type: ignore[attr-defined]
    fixed.close()


def test_spinning_defaults_to_run_and_rejects_unknown_values() -> None:
    assert OnnxRuntimeBackendConfig().spinning == "run"
    with pytest.raises(ValueError, match="spinning"):
        OnnxRuntimeBackendConfig(spinning="sometimes")  # type: ignore[arg-type]


def test_round_trip_rgb_package_batch(toy_rgb_package_dir: Path) -> None:
    with load_package(toy_rgb_package_dir) as pkg:
        backend = create_backend(OnnxRuntimeBackendConfig())
        backend.load(graph_source(pkg, "int8"))
        images = [cv2.imread(str(p)) for _, p in pkg.reference_images()]
        out = backend.run(pkg.preprocess_batch(images))
        want = [ref.scores["int8"] for ref, _ in pkg.reference_images()]
        np.testing.assert_allclose(out.score, want, atol=ROUND_TRIP_TOL)
        assert out.anomaly_map.shape == (2, 64, 96)


def test_reference_mismatch_is_reported(toy_package: ModelPackage) -> None:
    backend = create_backend(OnnxRuntimeBackendConfig())
    # run the package's fp32 refs through a graph that doubles the score
    bad = _contract_graph(scale=2.0)
    path = toy_package.root.parent / "double.onnx"
    onnx.save(bad, path)
    src = graph_source(toy_package, "fp32")
    backend.load(type(src)(path=path, kind="fp32", sha256=src.sha256, input_shape=src.input_shape))
    problems = verify_references(backend, toy_package, "fp32")
    assert problems
    assert "ref_001" in " ".join(problems)


def _contract_graph(
    scale: float = 1.0, out_names: tuple[str, str] = ("score", "anomaly_map")
) -> onnx.ModelProto:
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 64, 64])
    s = helper.make_tensor_value_info(out_names[0], TensorProto.FLOAT, ["N"])
    m = helper.make_tensor_value_info(out_names[1], TensorProto.FLOAT, ["N", 64, 64])
    k = helper.make_tensor("k", TensorProto.FLOAT, [], [scale * 2.0])
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["g"], axes=[1], keepdims=0),
        helper.make_node("Mul", ["g", "k"], [out_names[1]]),
        helper.make_node("ReduceMax", [out_names[1]], [out_names[0]], axes=[1, 2], keepdims=0),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [image], [s, m], [k]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    return model


def test_graph_breaking_the_contract_is_refused(tmp_path: Path, toy_package: ModelPackage) -> None:
    path = tmp_path / "wrong.onnx"
    onnx.save(_contract_graph(out_names=("logits", "heat")), path)
    src = graph_source(toy_package, "fp32")
    backend = create_backend(OnnxRuntimeBackendConfig())
    with pytest.raises(BackendError, match="graph contract"):
        backend.load(
            type(src)(path=path, kind="fp32", sha256="0" * 64, input_shape=src.input_shape)
        )


def test_corrupt_graph_is_a_backend_error(tmp_path: Path, toy_package: ModelPackage) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"not an onnx file")
    src = graph_source(toy_package, "fp32")
    backend = create_backend(OnnxRuntimeBackendConfig())
    with pytest.raises(BackendError, match="cannot load"):
        backend.load(
            type(src)(path=path, kind="fp32", sha256="0" * 64, input_shape=src.input_shape)
        )


def test_run_before_load_and_bad_input_are_errors(toy_package: ModelPackage) -> None:
    backend = create_backend(OnnxRuntimeBackendConfig())
    with pytest.raises(BackendError, match="not loaded"):
        backend.run(np.zeros((1, 1, 64, 64), np.float32))
    backend.load(graph_source(toy_package, "fp32"))
    with pytest.raises(BackendError, match="run failed"):
        backend.run(np.zeros((1, 3, 10, 10), np.float32))


def test_unknown_graph_choice_is_refused(toy_package: ModelPackage) -> None:
    from edge.backends.onnxruntime import OnnxRuntimeBackend

    avail = {k: toy_package.graph_path(k) for k in toy_package.graph_variants}
    with pytest.raises(BackendError, match="no fp16 graph"):
        OnnxRuntimeBackend.choose_graph(OnnxRuntimeBackendConfig(graph="fp16"), avail, "int8")
    assert OnnxRuntimeBackend.choose_graph(OnnxRuntimeBackendConfig(), avail, "int8") == "int8"
    assert (
        OnnxRuntimeBackend.choose_graph(OnnxRuntimeBackendConfig(provider="cuda"), avail, "int8")
        == "fp32"
    )


def test_engine_cache_key_changes_with_each_input() -> None:
    cfg = TensorRTBackendConfig()
    base = engine_cache_key("10.3.0", "Orin", "a" * 64, cfg)
    assert base != engine_cache_key("10.4.0", "Orin", "a" * 64, cfg)
    assert base != engine_cache_key("10.3.0", "Xavier", "a" * 64, cfg)
    assert base != engine_cache_key("10.3.0", "Orin", "b" * 64, cfg)
    assert base != engine_cache_key(
        "10.3.0", "Orin", "a" * 64, TensorRTBackendConfig(precision="fp16")
    )
    assert base == engine_cache_key("10.3.0", "Orin", "a" * 64, cfg)


@pytest.mark.gpu
def test_tensorrt_engine_round_trip(toy_package: ModelPackage, tmp_path: Path) -> None:
    cfg = TensorRTBackendConfig(precision="fp16", engine_cache_dir=tmp_path / "engines")
    backend = create_backend(cfg)
    backend.load(graph_source(toy_package, "fp32"))
    for ref, path in toy_package.reference_images():
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        out = backend.run(toy_package.preprocess(image))
        assert abs(float(out.score[0]) - ref.scores["fp32"]) < 1e-2
    backend.close()
    again = create_backend(cfg)
    again.load(graph_source(toy_package, "fp32"))
    assert len(list((tmp_path / "engines").glob("*.engine"))) == 1
    again.close()
