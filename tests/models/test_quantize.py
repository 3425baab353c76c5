"""Static INT8 QDQ quantization: structure (what is quantized) and accuracy vs FP32."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models.export import export_fp32
from models.quantize import patch_features, quantize_int8, set_bank, set_graph_scale
from tests.models.test_export import _graph, _images

#: Stated tolerance: relative L2 error of INT8 patch features vs FP32 (measured 0.22 on these
#: random textures, which are far from the ImageNet statistics the ranges are calibrated for).
INT8_FEATURE_REL_TOL = 0.3

pytestmark = pytest.mark.slow  # the module fixture quantizes a graph (~6 s)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("q")
    fp32 = export_fp32(_graph(3), root / "model_fp32.onnx")
    int8 = quantize_int8(fp32, root / "model_int8.onnx", _images(8, 3, seed=11))
    return fp32, int8


def test_only_the_backbone_and_the_bank_product_are_quantized(
    graphs: tuple[Path, Path],
) -> None:
    _, int8 = graphs
    model = onnx.load(str(int8))
    nodes = model.graph.node
    producers = {o: n for n in nodes for o in n.output}
    convs = [n for n in nodes if n.op_type == "Conv"]
    assert convs
    # the stem (first convolution) stays float by default, every other one is quantized
    assert convs[0].input[0] not in producers or producers[convs[0].input[0]].op_type != (
        "DequantizeLinear"
    )
    assert all(producers[n.input[0]].op_type == "DequantizeLinear" for n in convs[1:])
    assert any(n.op_type == "QuantizeLinear" for n in nodes)
    consumers = {i: n for n in nodes for i in n.input}
    bank_products = []
    for n in nodes:
        fed = [producers.get(i) for i in n.input]
        quantized = [p for p in fed if p is not None and p.op_type == "DequantizeLinear"]
        if n.op_type in {"ReduceMin", "Sqrt", "TopK", "Resize"}:
            assert not quantized, f"{n.name} is quantized"
        if (n.op_type == "MatMul" and quantized) or n.op_type == "MatMulIntegerToFloat":
            bank_products.append(n)
            # int8 inputs, float output: no QuantizeLinear after the product
            assert consumers[n.output[0]].op_type != "QuantizeLinear"
    assert len(bank_products) == 1  # q . bank; the smoothing products stay float
    # ONNX Runtime's graph: the product is one fused operator with the bank bias as its bias
    (product,) = bank_products
    assert product.op_type == "MatMulIntegerToFloat"
    assert product.domain == "com.microsoft"
    assert product.input[6] == "bank_bias"


def test_patch_features_read_from_the_graph_match_pytorch(graphs: tuple[Path, Path]) -> None:
    fp32, _ = graphs
    x = _images(3, 3, seed=12)
    graph = _graph(3)
    with torch.no_grad():
        f = graph.features(torch.from_numpy(x))
    expected = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).numpy()
    assert np.allclose(patch_features(fp32, x), expected, atol=1e-4)


def test_int8_features_track_fp32(graphs: tuple[Path, Path]) -> None:
    fp32, int8 = graphs
    x = _images(6, 3, seed=12)
    a = patch_features(fp32, x)
    b = patch_features(int8, x)
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    print(f"int8 relative feature error {rel:.3f}")
    assert rel <= INT8_FEATURE_REL_TOL


def test_int8_graph_with_rebuilt_bank_ranks_an_anomaly_first(
    graphs: tuple[Path, Path], tmp_path: Path
) -> None:
    _, int8 = graphs
    work = tmp_path / "int8.onnx"
    shutil.copyfile(int8, work)
    bank = patch_features(work, _images(6, 3, seed=0))
    set_bank(work, bank)
    set_graph_scale(work, 0.5)
    good = _images(3, 3, seed=1)
    bad = good.copy()
    bad[:, :, 20:36, 20:36] = -1.0  # a dark square
    sess = ort.InferenceSession(str(work), providers=["CPUExecutionProvider"])
    s_good = sess.run(["score"], {"image": good})[0]
    s_bad = sess.run(["score"], {"image": bad})[0]
    assert np.all(s_bad > s_good)
    # inv_scale is applied: halving it halves the scores
    set_graph_scale(work, 0.25)
    sess = ort.InferenceSession(str(work), providers=["CPUExecutionProvider"])
    assert np.allclose(sess.run(["score"], {"image": good})[0], s_good / 2, rtol=1e-5)


def test_graph_surgery_refuses_a_graph_without_bank(tmp_path: Path) -> None:
    import onnx.helper as oh

    x = oh.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1])
    y = oh.make_tensor_value_info("score", onnx.TensorProto.FLOAT, [1])
    model = oh.make_model(
        oh.make_graph([oh.make_node("Identity", ["image"], ["score"])], "g", [x], [y])
    )
    path = tmp_path / "plain.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="bank constants"):
        set_bank(path, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="no inv_scale"):
        set_graph_scale(path, 1.0)


def test_empty_calibration_is_refused(graphs: tuple[Path, Path], tmp_path: Path) -> None:
    fp32, _ = graphs
    with pytest.raises(ValueError, match="at least one image"):
        quantize_int8(fp32, tmp_path / "x.onnx", np.zeros((0, 3, 64, 64), np.float32))
    assert not (tmp_path / "x.onnx").exists()
