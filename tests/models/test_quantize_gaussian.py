"""The INT8 graph's image-level Gaussian refitted on its own pooled features (``set_gaussian``).

Toy graph (64 px random textures, gray, global stages 3-5), so the numbers are about the
plumbing and the direction of the effect; the AUROC on real defects is ``bench/quantize.py``
on MTD (docs/model-method.md, INT8).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from models.export import export_fp32
from models.patchcore import (
    GlobalGaussian,
    PatchCoreConfig,
    PatchCoreGraph,
    PatchFeatures,
    greedy_coreset,
)
from models.quantize import (
    Int8Settings,
    graph_features,
    mahalanobis,
    quantize_int8,
    set_gaussian,
    set_graph_scale,
)
from models.teach import TeachSettings, fit_int8, gaussian_gain
from tests.models.test_export import _images, ort_session

WEIGHT = 0.5
SETTINGS = TeachSettings(bank_size=64, global_weight=WEIGHT, gaussian_goods="fit")


def _consts(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _scores(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort_session(path)
    return np.asarray(sess.run(["score"], {"image": x})[0], dtype=np.float64)


def fit_toy_graph(
    cfg: PatchCoreConfig,
    n_fit: int,
    n_hold: int,
    bank: int,
    weight: float,
    gain: float | None = None,
) -> tuple[PatchCoreGraph, np.ndarray, np.ndarray]:
    """A fitted toy graph with the Gaussian branch (bank, Gaussian, gain by teach's rule at
    ``weight`` unless given, scale) and its fitting and held-out images."""
    feats = PatchFeatures(cfg).eval()
    x_fit = _images(n_fit, cfg.in_channels, seed=0)
    x_hold = _images(n_hold, cfg.in_channels, seed=1)
    with torch.no_grad():
        f, pooled = feats.forward_all(torch.from_numpy(x_fit))
    assert pooled is not None
    coreset = greedy_coreset(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), bank)
    graph = PatchCoreGraph(feats, coreset, gaussian=GlobalGaussian.fit(pooled)).eval()
    with torch.no_grad():
        pmap, dist = graph.branches(torch.from_numpy(x_hold))
        patch = graph.patch_score(pmap)
    assert dist is not None
    if gain is None:
        gain = gaussian_gain(weight, patch.numpy(), dist.numpy())["gain"]
    graph.set_gaussian(GlobalGaussian(graph.g_mean, graph.g_whiten, gain))
    graph.set_raw_scale(float((patch + gain * dist).max()))
    return graph, x_fit, x_hold


def _global_graph(gain: float | None) -> tuple[PatchCoreGraph, np.ndarray, np.ndarray]:
    """Gray toy graph with the Gaussian branch; gain by teach's rule unless given."""
    cfg = PatchCoreConfig(
        input_hw=(64, 64), in_channels=1, stages=(2, 4), top_k=3, global_stages=(3, 4, 5)
    )
    return fit_toy_graph(cfg, 24, 10, 64, WEIGHT, gain)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """FP32 graph, and its INT8 graph refitted by teach's step with and without the Gaussian."""
    root = tmp_path_factory.mktemp("qg")
    graph, x_fit, x_hold = _global_graph(None)
    fp32 = export_fp32(graph, root / "fp32.onnx")
    raw = quantize_int8(fp32, root / "raw_int8.onnx", x_fit[:8])
    paths = {"fp32": fp32}
    for mode in ("fp32", "refit"):
        path = root / f"int8_{mode}.onnx"
        shutil.copyfile(raw, path)
        fit_int8(path, x_fit, x_hold, SETTINGS, Int8Settings(gaussian=mode))
        paths[f"int8_{mode}"] = path
    return paths


@pytest.mark.slow
def test_refit_brings_the_int8_gaussian_back_to_fp32(fitted: dict[str, Path]) -> None:
    x_hold = _images(10, 1, seed=1)
    c32 = _consts(fitted["fp32"])
    d32 = mahalanobis(graph_features(fitted["fp32"], x_hold).pooled, c32["g_mean"], c32["g_whiten"])
    # without the refit, the INT8 graph's pooled features are off the FP32 Gaussian:
    # quantization noise inflates held-out goods' distances (measured +9 % here)
    kept = graph_features(fitted["int8_fp32"], x_hold).pooled
    d_kept = mahalanobis(kept, c32["g_mean"], c32["g_whiten"])
    cr = _consts(fitted["int8_refit"])
    assert not np.allclose(cr["g_mean"], c32["g_mean"], atol=1e-4), "the Gaussian was not refitted"
    d_refit = mahalanobis(
        graph_features(fitted["int8_refit"], x_hold).pooled, cr["g_mean"], cr["g_whiten"]
    )
    err_kept = abs(np.median(d_kept) / np.median(d32) - 1)
    err_refit = abs(np.median(d_refit) / np.median(d32) - 1)
    print(f"held-out median distance vs fp32: kept {err_kept:.3f}, refit {err_refit:.3f}")
    assert err_refit < err_kept / 2
    # and the fused scores (FP32's normalisation for all) follow FP32 more closely
    s32 = _scores(fitted["fp32"], x_hold)
    gap = {
        k: float(np.mean(np.abs(_scores(fitted[k], x_hold) - s32))) for k in fitted if k != "fp32"
    }
    print(f"held-out mean |int8 - fp32|: {gap}")
    assert gap["int8_refit"] < gap["int8_fp32"]


@pytest.mark.slow
def test_refitted_constants_follow_teachs_rule(fitted: dict[str, Path]) -> None:
    x_fit, x_hold = _images(24, 1, seed=0), _images(10, 1, seed=1)
    path = fitted["int8_refit"]
    c = _consts(path)
    # the mean and precision are the Ledoit-Wolf fit of the INT8 graph's own pooled features
    own = graph_features(path, x_fit).pooled
    assert own is not None
    want = GlobalGaussian.fit(torch.from_numpy(own))
    np.testing.assert_allclose(c["g_mean"], want.mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c["g_whiten"], want.whiten.numpy(), rtol=1e-3, atol=1e-4)
    # the gain is weight x median(patch) / median(distance) on the held-out goods
    hold = graph_features(path, x_hold)
    assert hold.pooled is not None
    assert hold.patch_score is not None
    dist = mahalanobis(hold.pooled, c["g_mean"], c["g_whiten"])
    assert float(c["g_gain"]) == pytest.approx(
        WEIGHT * np.median(hold.patch_score) / np.median(dist), rel=1e-4
    )
    # and the graph scores patch + gain x distance, normalised
    np.testing.assert_allclose(
        _scores(path, x_hold),
        (hold.patch_score + c["g_gain"] * dist) * c["inv_scale"],
        rtol=1e-4,
    )


@pytest.mark.parametrize(
    ("gain", "optimized"),
    [(1.0, False), (1.0, True), (0.5, False)],
    ids=["gain-shared", "gain-folded", "gain-own"],
)
def test_set_gaussian_rewrites_the_graph(gain: float, optimized: bool, tmp_path: Path) -> None:
    """A gain of 1 is merged with an equal constant by the exporter (``inv_scale`` is 1 here
    too) or folded away by the optimizer of ``quantize_int8``'s pre-processing; set_gaussian
    must still install a gain of its own and leave the other constant alone."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    graph, _, x_hold = _global_graph(gain)
    graph.set_raw_scale(1.0)
    path = export_fp32(graph, tmp_path / "fp32.onnx")
    if optimized:
        pre = tmp_path / "pre.onnx"
        quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
        path = pre
        model = onnx.load(str(path))
        assert not any("g_gain" in n.input for n in model.graph.node), "gain 1 not folded"
    feats = graph_features(path, x_hold)
    assert feats.pooled is not None
    assert feats.patch_score is not None
    rng = np.random.default_rng(0)
    dim = feats.pooled.shape[1]
    mean = feats.pooled.mean(0) + rng.normal(0, 0.01, dim).astype(np.float32)
    whiten = np.tril(rng.normal(0, 0.1, (dim, dim))).astype(np.float32)
    set_gaussian(path, mean, whiten, 0.3)
    set_graph_scale(path, 0.5)
    onnx.checker.check_model(onnx.load(str(path)))
    want = (feats.patch_score + 0.3 * mahalanobis(feats.pooled, mean, whiten)) * 0.5
    np.testing.assert_allclose(_scores(path, x_hold), want, rtol=1e-4)
    # idempotent: a second refit replaces, not stacks
    set_gaussian(path, mean, whiten, 0.6)
    want = (feats.patch_score + 0.6 * mahalanobis(feats.pooled, mean, whiten)) * 0.5
    np.testing.assert_allclose(_scores(path, x_hold), want, rtol=1e-4)


def test_set_gaussian_refuses_a_wrong_shape_or_a_graph_without_the_branch(
    tmp_path: Path,
) -> None:
    graph, _, _ = _global_graph(0.5)
    path = export_fp32(graph, tmp_path / "fp32.onnx")
    dim = int(graph.g_mean.shape[0])
    with pytest.raises(ValueError, match="does not fit"):
        set_gaussian(path, np.zeros(dim + 1), np.eye(dim + 1), 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        set_gaussian(path, np.zeros(dim), np.eye(dim - 1), 1.0)
    plain_cfg = PatchCoreConfig(input_hw=(64, 64), in_channels=1, stages=(2, 4))
    feats = PatchFeatures(plain_cfg).eval()
    plain = export_fp32(
        PatchCoreGraph(feats, torch.zeros(8, feats.dim)).eval(), tmp_path / "plain.onnx"
    )
    with pytest.raises(ValueError, match="no image-level Gaussian"):
        set_gaussian(plain, np.zeros(dim), np.eye(dim), 1.0)
    assert graph_features(plain, _images(2, 1, seed=3)).pooled is None
