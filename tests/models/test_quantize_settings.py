"""INT8 quantization settings: what each option quantizes, and the INT8 graph against FP32.

Tiny synthetic data (64 px random textures, the toy graph of ``test_export``), so the
tolerances here are about the graph's plumbing, not about the accuracy on real parts (that is
``bench/quantize.py`` on MTD, see docs/model-method.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models.export import export_fp32
from models.quantize import (
    Int8Settings,
    fuse_bank_product,
    nodes_to_quantize,
    patch_features,
    quantize_int8,
    quantized_op_types,
    set_bank,
)
from tests.models.test_export import _graph, _images, ort_session

#: Stated tolerance: max |INT8 - FP32| normalised score on the toy graph, both with the same
#: bank (scores are ~1 at the threshold; measured about 0.1 here).
INT8_SCORE_TOL = 0.35

pytestmark = pytest.mark.slow  # each fixture quantizes a toy graph (a few seconds)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_fp32(_graph(3), tmp_path_factory.mktemp("q8") / "model_fp32.onnx")


def _quantize(fp32: Path, out: Path, settings: Int8Settings) -> Path:
    return quantize_int8(fp32, out, _images(8, 3, seed=11), settings)


@pytest.fixture(scope="module")
def default_int8(fp32: Path) -> Path:
    return _quantize(fp32, fp32.with_name("default.onnx"), Int8Settings())


def _model(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _consts(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _scores(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort_session(path)
    return np.asarray(sess.run(["score"], {"image": x})[0])


def _fed_by_dq(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    p = _producers(model).get(node.input[0])
    return p is not None and p.op_type == "DequantizeLinear"


def test_default_keeps_the_stem_float_and_quantizes_the_other_convolutions(
    default_int8: Path,
) -> None:
    model = _model(default_int8)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) > 3
    assert not _fed_by_dq(model, convs[0]), "the stem convolution must stay float"
    assert all(_fed_by_dq(model, n) for n in convs[1:])
    ops = quantized_op_types(default_int8)
    assert ops["Conv"] == len(convs) - 1
    assert ops.get("Add", 0) >= 1  # residuals
    assert ops["MatMulIntegerToFloat"] == 1  # the bank product runs on int8 inputs by default
    assert "MatMul" not in ops  # ... fused with its bias (fuse_bank_product)


def test_default_activation_type_is_what_the_settings_say(default_int8: Path) -> None:
    want = np.uint8 if Int8Settings().activations == "u8" else np.int8
    model = _model(default_int8)
    consts = _consts(model)
    zps = [consts[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zps
    assert all(z.dtype == want for z in zps)


def test_symmetric_activations_have_zero_points_zero_and_relu6_ranges(
    fp32: Path, tmp_path: Path
) -> None:
    path = _quantize(fp32, tmp_path / "s8.onnx", Int8Settings(activations="s8"))
    model = _model(path)
    consts = _consts(model)
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert qs
    for q in qs:  # TensorRT's explicit INT8: int8, zero point 0
        assert consts[q.input[2]].dtype == np.int8
        assert not np.any(consts[q.input[2]])
    producers = _producers(model)
    narrowed = 0
    for clip in (n for n in model.graph.node if n.op_type == "Clip"):
        dq = producers.get(clip.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        # the convolution output before a ReLU6 is quantized on the clipped range: <= 6/127
        assert float(consts[dq.input[1]]) <= 6.0 / 127 * (1 + 1e-6)
        narrowed += 1
    assert narrowed >= 3


def test_options_select_the_quantized_nodes(fp32: Path) -> None:
    model = _model(fp32)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    everything = set(nodes_to_quantize(model, Int8Settings(float_stem=False)))
    assert {n.name for n in convs} <= everything
    kept = set(nodes_to_quantize(model, Int8Settings(keep_float=("blocks.0/",))))
    assert not any("blocks.0/" in n for n in kept)
    assert any("blocks.1/" in n for n in kept)
    backbone_only = nodes_to_quantize(model, Int8Settings(bank="float"))
    assert backbone_only
    assert not [n for n in backbone_only if "/trunk/" not in n]
    bank_nodes = [n for n in everything if "/trunk/" not in n]
    assert len(bank_nodes) == 1
    assert next(n for n in model.graph.node if n.name == bank_nodes[0]).op_type == "MatMul"


def test_int8_scores_track_fp32_on_toy_data(fp32: Path, default_int8: Path) -> None:
    x = _images(6, 3, seed=5)
    a = _scores(fp32, x)
    b = _scores(default_int8, x)
    diff = float(np.max(np.abs(a - b)))
    print(f"max |int8 - fp32| normalised score {diff:.3f}")
    assert diff <= INT8_SCORE_TOL
    # a dark square ranks above its good part in both graphs
    bad = x.copy()
    bad[:, :, 20:36, 20:36] = -1.0
    assert np.all(_scores(default_int8, bad) > b)


def test_a_float_bank_option_keeps_the_bank_product_float(fp32: Path, tmp_path: Path) -> None:
    path = _quantize(fp32, tmp_path / "bankf.onnx", Int8Settings(bank="float"))
    assert "MatMul" not in quantized_op_types(path)
    assert "bank_t" in _consts(_model(path))
    x = _images(6, 3, seed=5)
    assert float(np.max(np.abs(_scores(path, x) - _scores(fp32, x)))) <= INT8_SCORE_TOL


def test_an_int8_bank_is_requantized_by_set_bank(
    fp32: Path, default_int8: Path, tmp_path: Path
) -> None:
    path = tmp_path / "bank8.onnx"
    path.write_bytes(default_int8.read_bytes())
    assert quantized_op_types(path).get("MatMulIntegerToFloat") == 1
    x = _images(6, 3, seed=5)
    before = _scores(path, x)
    assert float(np.max(np.abs(before - _scores(fp32, x)))) <= INT8_SCORE_TOL
    bank = patch_features(path, _images(6, 3, seed=0))
    assert bank.ndim == 2
    set_bank(path, bank)
    consts = _consts(_model(path))
    codes = next(v for k, v in consts.items() if k.startswith("bank_t") and "quantized" in k)
    assert codes.dtype == np.int8
    assert codes.shape == (bank.shape[1], bank.shape[0])
    # the bank now holds every patch of the seed-0 images: those score below all others
    own = _scores(path, _images(2, 3, seed=0))
    others = _scores(path, x)
    assert np.all(np.isfinite(others))
    assert own.max() < others.min()


@pytest.mark.parametrize(
    ("field", "value"),
    [("activations", "int4"), ("calibration", "kl"), ("bank", "fp16"), ("percentile", 0.0)],
)
def test_bad_settings_are_refused_with_the_field_named(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"Int8Settings.{field}"):
        Int8Settings(**{field: value})  # type: ignore[arg-type]


def test_tensorrt_is_told_which_int8_graphs_it_cannot_take(fp32: Path, tmp_path: Path) -> None:
    """The native TensorRT backend checks the graph before a build (no GPU needed)."""
    from edge.backends.tensorrt import asymmetric_quantization

    u8 = _quantize(fp32, tmp_path / "u8.onnx", Int8Settings(activations="u8"))
    s8 = _quantize(fp32, tmp_path / "s8-trt.onnx", Int8Settings(activations="s8"))
    assert asymmetric_quantization(u8)  # uint8 activations with zero points
    assert asymmetric_quantization(s8) == []
    assert asymmetric_quantization(fp32) == []


def test_the_fused_bank_product_computes_what_the_qdq_form_computes(
    fp32: Path, tmp_path: Path
) -> None:
    """MatMulIntegerToFloat with the bank bias == DQ(q) @ DQ(bank) + bank_bias, bank swaps too."""
    plain = quantize_int8(fp32, tmp_path / "qdq.onnx", _images(8, 3, seed=11), fuse=False)
    assert quantized_op_types(plain).get("MatMul") == 1
    fused = tmp_path / "fused.onnx"
    fused.write_bytes(plain.read_bytes())
    assert fuse_bank_product(fused)
    assert not fuse_bank_product(fused)  # nothing left to fuse
    model = _model(fused)
    assert [n.op_type for n in model.graph.node if n.domain == "com.microsoft"] == [
        "MatMulIntegerToFloat"
    ]
    assert not [n for n in model.graph.node if "bank_t_quantized" in n.input[:1]]  # no bank DQ
    x = _images(6, 3, seed=5)
    np.testing.assert_allclose(_scores(fused, x), _scores(plain, x), rtol=0, atol=1e-4)
    feats = patch_features(fused, x)
    np.testing.assert_array_equal(feats, patch_features(plain, x))
    bank = patch_features(plain, _images(4, 3, seed=0))
    for path in (plain, fused):
        set_bank(path, bank)
    np.testing.assert_allclose(_scores(fused, x), _scores(plain, x), rtol=0, atol=1e-4)
    # a graph for TensorRT (symmetric int8) keeps the standard QDQ form
    s8 = _quantize(fp32, tmp_path / "s8.onnx", Int8Settings(activations="s8"))
    assert not [n for n in _model(s8).graph.node if n.domain == "com.microsoft"]
    assert Int8Settings(activations="s8").describe()["bank_product"] == "QDQ MatMul + Add"
