"""Patch features projected (PCA) before the nearest-neighbour search: graph, export, INT8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from models.export import export_fp32, torch_scores
from models.patchcore import (
    GlobalGaussian,
    PatchCoreConfig,
    PatchCoreGraph,
    PatchFeatures,
    greedy_coreset,
    pca_projection,
    random_projection,
)
from models.quantize import patch_features, quantize_int8, quantized_op_types, set_bank
from tests.models.test_export import FP32_TOL, _images, ort_session

DIM = 24


def _features(channels: int, dim: int, global_stages: tuple[int, ...] = ()) -> PatchFeatures:
    cfg = PatchCoreConfig(
        input_hw=(64, 64),
        in_channels=channels,
        stages=(2, 4),
        top_k=3,
        global_stages=global_stages,
        projection_dim=dim,
    )
    return PatchFeatures(cfg).eval()


def _projected_graph(channels: int, global_stages: tuple[int, ...] = ()) -> PatchCoreGraph:
    feats = _features(channels, DIM, global_stages)
    with torch.no_grad():
        f, pooled = feats.forward_all(torch.from_numpy(_images(8, channels, seed=0)))
    patches = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    proj = pca_projection(patches, DIM)
    bank = greedy_coreset(patches @ proj, 64)
    gaussian = None if pooled is None else GlobalGaussian.fit(pooled)
    graph = PatchCoreGraph(feats, bank, gaussian=gaussian, projection=proj).eval()
    if gaussian is not None:
        graph.set_gaussian(GlobalGaussian(gaussian.mean, gaussian.whiten, 0.3))
    raw, _ = torch_scores(graph, _images(4, channels, seed=1))
    graph.set_raw_scale(float(np.quantile(raw, 0.9)))
    return graph


def test_pca_projection_is_orthonormal_deterministic_and_keeps_the_most_variance() -> None:
    rng = np.random.default_rng(0)
    # 40-d data whose variance lies mostly in a random 6-d subspace
    basis = np.linalg.qr(rng.normal(size=(40, 6)))[0]
    x = rng.normal(size=(3000, 6)) * np.array([9, 8, 7, 6, 5, 4]) @ basis.T
    x = torch.from_numpy((x + rng.normal(scale=0.3, size=x.shape) + 5.0).astype(np.float32))
    p = pca_projection(x, 6)
    assert p.shape == (40, 6)
    torch.testing.assert_close(p.T @ p, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(pca_projection(x, 6), p)  # same data, same axes and signs
    xc = x - x.mean(0)
    kept = float(((xc @ p) ** 2).sum() / (xc**2).sum())
    rand = random_projection(40, 6)
    torch.testing.assert_close(rand.T @ rand, torch.eye(6), atol=1e-5, rtol=0)
    kept_rand = float(((xc @ rand) ** 2).sum() / (xc**2).sum())
    assert kept > 0.98  # the noise (0.3 per dimension) outside the subspace is lost
    assert kept_rand < 0.5
    with pytest.raises(ValueError, match="projection to 41"):
        pca_projection(x, 41)


def test_projection_shapes_are_checked() -> None:
    feats = _features(1, DIM)
    with pytest.raises(ValueError, match="bank of shape"):
        PatchCoreGraph(feats, torch.zeros(8, feats.dim))  # bank must be projected
    with pytest.raises(ValueError, match="projection of shape"):
        PatchCoreGraph(feats, torch.zeros(8, DIM), projection=torch.zeros(feats.dim, DIM + 1))
    plain = _features(1, 0)
    with pytest.raises(ValueError, match="projection_dim is 0"):
        PatchCoreGraph(plain, torch.zeros(8, plain.dim), projection=torch.zeros(plain.dim, DIM))
    # no projection given (a graph rebuilt for timing): a random orthonormal placeholder
    graph = PatchCoreGraph(feats, torch.zeros(8, DIM))
    assert tuple(graph.proj.shape) == (feats.dim, DIM)


@pytest.mark.parametrize(
    ("channels", "global_stages"), [(1, ()), (3, (3, 4, 5))], ids=["gray", "rgb-global"]
)
def test_projected_graph_onnx_matches_pytorch(
    channels: int, global_stages: tuple[int, ...], tmp_path: Path
) -> None:
    graph = _projected_graph(channels, global_stages)
    path = export_fp32(graph, tmp_path / "model_fp32.onnx")
    x = _images(4, channels, seed=8)
    s_t, m_t = torch_scores(graph, x)
    s_o, m_o = ort_session(path).run(None, {"image": x})
    assert np.max(np.abs(s_t - s_o)) <= FP32_TOL * max(1.0, float(np.abs(s_t).max()))
    assert np.max(np.abs(m_t - m_o)) <= FP32_TOL * max(1.0, float(np.abs(m_t).max()))
    consts = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    assert consts["bank_t"].shape == (DIM, 64)  # the bank is stored projected
    assert consts["proj"].shape == (graph.features.dim, DIM)
    # the features the graph multiplies with the bank are the projected ones
    with torch.no_grad():
        f = graph.features(torch.from_numpy(x))
    want = (f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) @ graph.proj).numpy()
    np.testing.assert_allclose(patch_features(path, x), want, atol=1e-4)


def test_projected_distances_are_a_contraction_and_still_find_an_anomaly() -> None:
    """With the same bank entries (all fitting patches), projected nearest-neighbour
    distances are at most the full ones (an orthonormal projection never lengthens a
    difference), and PCA to DIM of the toy's 160 dimensions keeps most of them."""
    feats = _features(1, DIM)
    plain = _features(1, 0)
    plain.load_state_dict(feats.state_dict())
    with torch.no_grad():
        f = plain(torch.from_numpy(_images(8, 1, seed=0)))
    patches = f.permute(0, 2, 3, 1).reshape(-1, plain.dim)
    proj = pca_projection(patches, DIM)
    projected = PatchCoreGraph(feats, patches @ proj, projection=proj).eval()
    full = PatchCoreGraph(plain, patches).eval()
    good = torch.from_numpy(_images(4, 1, seed=5))
    bad = good.clone()
    bad[:, :, 20:36, 20:36] = -1.0
    with torch.no_grad():
        d_proj = projected.patch_distances(good)
        d_full = full.patch_distances(good)
        s_bad = projected.patch_score(projected.patch_distances(bad))
    assert torch.all(d_proj <= d_full * (1 + 1e-4) + 1e-4)
    ratio = float(d_proj.sum() / d_full.sum())
    print(f"projected / full distance: {ratio:.3f}")
    assert ratio > 0.5  # measured 0.69
    assert torch.all(s_bad > projected.patch_score(d_proj))


@pytest.mark.slow
def test_projected_graph_quantizes_with_the_projection_in_float(tmp_path: Path) -> None:
    graph = _projected_graph(3)
    fp32 = export_fp32(graph, tmp_path / "model_fp32.onnx")
    int8 = quantize_int8(fp32, tmp_path / "model_int8.onnx", _images(8, 3, seed=11))
    model = onnx.load(str(int8))
    producers = {o: n for n in model.graph.node for o in n.output}
    (proj_mm,) = [n for n in model.graph.node if n.op_type == "MatMul" and "proj" in n.input]
    assert producers[proj_mm.input[0]].op_type != "DequantizeLinear"  # the projection is float
    # the (projected) bank product is int8
    assert quantized_op_types(int8).get("MatMulIntegerToFloat") == 1
    x = _images(6, 3, seed=0)
    feats = patch_features(int8, x)
    assert feats.shape == (6 * 16, DIM)
    set_bank(int8, feats)  # the bank rebuilt from the INT8 graph's projected features
    good = _images(3, 3, seed=1)
    bad = good.copy()
    bad[:, :, 20:36, 20:36] = -1.0
    sess = ort_session(int8)
    assert np.all(sess.run(["score"], {"image": bad})[0] > sess.run(["score"], {"image": good})[0])
