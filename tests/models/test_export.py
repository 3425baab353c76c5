"""Round trip: the PyTorch scoring graph vs its ONNX exports in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models.export import export_fp16, export_fp32, torch_scores
from models.patchcore import (
    GlobalGaussian,
    PatchCoreConfig,
    PatchCoreGraph,
    PatchFeatures,
    greedy_coreset,
)

#: Stated tolerances (normalised score units; scores here are around 1).
FP32_TOL = 1e-4
FP16_TOL = 0.05


def _images(n: int, channels: int, seed: int, size: int = 64) -> np.ndarray:
    """Smooth random textures, preprocessed like the manifest says (range about -1..1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size // 4, size // 4, generator=gen)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear")
    return ((x - 0.5) / 0.5).numpy().astype(np.float32)


def _graph(channels: int, top_k: int = 3) -> PatchCoreGraph:
    cfg = PatchCoreConfig(input_hw=(64, 64), in_channels=channels, stages=(2, 4), top_k=top_k)
    feats = PatchFeatures(cfg).eval()
    with torch.no_grad():
        f = feats(torch.from_numpy(_images(6, channels, seed=0)))
    bank = greedy_coreset(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), 64)
    graph = PatchCoreGraph(feats, bank).eval()
    raw, _ = torch_scores(graph, _images(4, channels, seed=1))
    graph.set_raw_scale(float(np.quantile(raw, 0.9)))
    return graph


def ort_session(path: Path) -> ort.InferenceSession:
    """An ONNX Runtime CPU session on 2 threads (the tests' default)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=[1, 3], ids=["gray", "rgb"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    channels = int(request.param)
    graph = _graph(channels)
    path = export_fp32(graph, tmp_path_factory.mktemp("exp") / "model_fp32.onnx")
    return graph, path, channels


def test_graph_follows_the_contract(exported) -> None:
    _, path, channels = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert convs
    assert all(c.startswith("/features/trunk/") for c in convs)
    (inp,) = model.graph.input
    assert inp.name == "image"
    assert [o.name for o in model.graph.output] == ["score", "anomaly_map"]
    sess = ort_session(path)
    assert sess.get_inputs()[0].shape == ["N", channels, 64, 64]
    for n in (1, 3):
        score, amap = sess.run(None, {"image": _images(n, channels, seed=5)})
        assert score.shape == (n,)
        assert amap.shape == (n, 64, 64)
        assert score.dtype == np.float32
        assert amap.dtype == np.float32


def test_onnx_fp32_matches_pytorch(exported) -> None:
    graph, path, channels = exported
    x = _images(5, channels, seed=7)
    s_t, m_t = torch_scores(graph, x)
    s_o, m_o = ort_session(path).run(None, {"image": x})
    assert np.max(np.abs(s_t - s_o)) <= FP32_TOL
    assert np.max(np.abs(m_t - m_o)) <= FP32_TOL
    # The map and the score agree: the score is a top-k mean of map cells, so never above max.
    assert np.all(s_o <= m_o.reshape(len(x), -1).max(1) + 1e-5)


def test_onnx_fp16_is_close_and_keeps_float_io(exported, tmp_path: Path) -> None:
    graph, path, channels = exported
    half = export_fp16(path, tmp_path / "model_fp16.onnx")
    sess = ort_session(half)
    assert sess.get_inputs()[0].type == "tensor(float)"
    assert [o.type for o in sess.get_outputs()] == ["tensor(float)", "tensor(float)"]
    x = _images(4, channels, seed=9)
    s_t, _ = torch_scores(graph, x)
    s_h, m_h = sess.run(None, {"image": x})
    assert np.max(np.abs(s_t - s_h)) <= FP16_TOL
    assert np.all(np.isfinite(m_h))


def test_gray_input_equals_replicated_rgb() -> None:
    cfg1 = PatchCoreConfig(input_hw=(64, 64), in_channels=1)
    cfg3 = PatchCoreConfig(input_hw=(64, 64), in_channels=3)
    g = torch.from_numpy(_images(2, 1, seed=3))
    with torch.no_grad():
        f1 = PatchFeatures(cfg1).eval()(g)
        f3 = PatchFeatures(cfg3).eval()(g.repeat(1, 3, 1, 1))
    assert torch.allclose(f1, f3, atol=1e-4)


def test_anomalous_patch_raises_the_score(exported) -> None:
    graph, _, channels = exported
    x = _images(1, channels, seed=1)
    bad = x.copy()
    bad[:, :, 20:36, 20:36] = 1.0  # a bright square
    s_good, m_good = torch_scores(graph, x)
    s_bad, m_bad = torch_scores(graph, bad)
    assert s_bad[0] > s_good[0]
    rise = m_bad[0] - m_good[0]
    inside = np.zeros(rise.shape, bool)
    inside[20:36, 20:36] = True
    assert rise[inside].mean() > rise[~inside].mean()


# --------------------------------------------------------------------------- global branch


@pytest.fixture(scope="module")
def global_graph() -> tuple[PatchCoreGraph, np.ndarray]:
    """A gray graph with the image-level Gaussian branch, and the pooled fitting features."""
    cfg = PatchCoreConfig(
        input_hw=(64, 64), in_channels=1, stages=(2, 4), top_k=3, global_stages=(3, 4, 5)
    )
    feats = PatchFeatures(cfg).eval()
    with torch.no_grad():
        f, pooled = feats.forward_all(torch.from_numpy(_images(12, 1, seed=0)))
    assert pooled is not None
    bank = greedy_coreset(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), 64)
    fitted = GlobalGaussian.fit(pooled)
    graph = PatchCoreGraph(feats, bank, gaussian=fitted).eval()
    graph.set_gaussian(GlobalGaussian(fitted.mean, fitted.whiten, gain=0.25))
    graph.set_raw_scale(2.0)
    return graph, pooled.numpy()


def test_global_distance_is_the_ledoit_wolf_mahalanobis(global_graph) -> None:
    from sklearn.covariance import LedoitWolf

    graph, pooled = global_graph
    lw = LedoitWolf().fit(pooled.astype(np.float64))
    prec = np.linalg.inv(lw.covariance_)
    x = _images(3, 1, seed=4)
    with torch.no_grad():
        _, q = graph.features.forward_all(torch.from_numpy(x))
        got = graph.global_distance(torch.from_numpy(x)).numpy()
    assert q is not None
    z = q.numpy().astype(np.float64) - lw.location_
    want = np.sqrt(np.einsum("nd,de,ne->n", z, prec, z))
    np.testing.assert_allclose(got, want, rtol=1e-3)
    assert np.all(got > 0)


def test_global_term_is_added_to_the_patch_score(global_graph) -> None:
    graph, _ = global_graph
    x = torch.from_numpy(_images(3, 1, seed=6))
    with torch.no_grad():
        pmap, g = graph.branches(x)
        score, amap = graph(x)
    assert g is not None
    want = (graph.patch_score(pmap) + 0.25 * g) / 2.0
    torch.testing.assert_close(score, want, rtol=1e-5, atol=1e-6)
    # the map shows the patch term, scaled by (1 + weight) to read ~1.0 at its threshold
    assert float(amap.max()) == pytest.approx(float(pmap.max()) * 2.0 / 2.0, rel=1e-4)


def test_global_branch_onnx_matches_pytorch(global_graph, tmp_path: Path) -> None:
    graph, _ = global_graph
    path = export_fp32(graph, tmp_path / "model_fp32.onnx")
    x = _images(4, 1, seed=8)
    s_t, m_t = torch_scores(graph, x)
    s_o, m_o = ort_session(path).run(None, {"image": x})
    assert np.max(np.abs(s_t - s_o)) <= FP32_TOL * max(1.0, float(np.abs(s_t).max()))
    assert np.max(np.abs(m_t - m_o)) <= FP32_TOL * max(1.0, float(np.abs(m_t).max()))
    model = onnx.load(str(path))
    names = {i.name for i in model.graph.initializer}
    assert {"g_mean", "g_whiten", "g_gain", "inv_scale", "bank_t"} <= names
    # the backbone keeps the node scope the INT8 quantizer selects by
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert convs
    assert all(c.startswith("/features/trunk/") for c in convs)


def test_a_global_change_moves_the_global_distance(global_graph) -> None:
    graph, _ = global_graph
    x = _images(1, 1, seed=2)
    dark = np.clip(x - 0.8, -1.0, 1.0)  # the whole part darker: no local defect
    with torch.no_grad():
        g_good = float(graph.global_distance(torch.from_numpy(x))[0])
        g_dark = float(graph.global_distance(torch.from_numpy(dark))[0])
    assert g_dark > 2.0 * g_good


def test_a_gaussian_without_global_stages_is_refused_and_a_missing_one_is_zero() -> None:
    plain = PatchFeatures(PatchCoreConfig(input_hw=(64, 64), in_channels=1, stages=(2, 4)))
    g = GlobalGaussian(torch.zeros(3), torch.eye(3), 1.0)
    with pytest.raises(ValueError, match="global_stages"):
        PatchCoreGraph(plain, torch.zeros(4, plain.dim), gaussian=g)
    # global stages but no fitted Gaussian (a graph rebuilt for timing): the term is 0
    cfg = PatchCoreConfig(input_hw=(64, 64), in_channels=1, stages=(2, 4), global_stages=(4,))
    feats = PatchFeatures(cfg).eval()
    x = torch.from_numpy(_images(2, 1, seed=3))
    with torch.no_grad():
        f = feats(x)
    graph = PatchCoreGraph(feats, f.permute(0, 2, 3, 1).reshape(-1, feats.dim)[:16]).eval()
    with torch.no_grad():
        pmap, gdist = graph.branches(x)
        score, _ = graph(x)
    assert gdist is not None
    torch.testing.assert_close(score, graph.patch_score(pmap))
