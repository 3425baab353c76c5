"""Per-image input standardisation and mean+std pooling of the image-level branch.

Toy graphs (64 px random textures): the plumbing (shapes, invariance, ONNX parity, the INT8
refit finding the wider pooled vector). The accuracy on real defects is in
docs/model-method.md (Per-image standardisation and mean+std pooling).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from models.export import export_fp32, torch_scores
from models.patchcore import (
    SKEW_EPS,
    STANDARD_MEAN,
    STANDARD_STD,
    PatchCoreConfig,
    PatchCoreGraph,
    PatchFeatures,
    standardize,
)
from models.quantize import Int8Settings, graph_features, quantize_int8
from models.teach import TeachSettings, fit_int8
from tests.models.test_export import _images, ort_session
from tests.models.test_quantize_gaussian import fit_toy_graph

FP32_TOL = 1e-4


def _cfg(channels: int, **kw: object) -> PatchCoreConfig:
    base: dict[str, object] = {
        "input_hw": (64, 64),
        "in_channels": channels,
        "stages": (2, 4),
        "top_k": 3,
        "global_stages": (3, 4),
        "global_pool": "mean_std",
        "standardize_input": True,
    }
    base.update(kw)
    return PatchCoreConfig(**base)  # type: ignore[arg-type]


def _graph(channels: int, **kw: object) -> tuple[PatchCoreGraph, np.ndarray]:
    """A fitted toy graph (bank, Gaussian, gain, scale) and its held-out images."""
    graph, _, x_hold = fit_toy_graph(_cfg(channels, **kw), 16, 6, 48, 0.5)
    return graph, x_hold


def test_standardize_maps_every_image_to_the_fixed_mean_and_std() -> None:
    x = torch.from_numpy(_images(3, 3, seed=2)) * torch.tensor([0.3, 0.6, 1.0]).view(3, 1, 1, 1)
    out = standardize(x)
    pixels = (out + 1.0) * 127.5  # back to pixel units
    torch.testing.assert_close(
        pixels.mean(dim=(1, 2, 3)), torch.full((3,), STANDARD_MEAN), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(
        pixels.std(dim=(1, 2, 3), unbiased=False), torch.full((3,), STANDARD_STD), atol=1e-2, rtol=0
    )
    flat = standardize(torch.zeros(1, 1, 8, 8))  # no division by zero: the target mean
    torch.testing.assert_close(flat, torch.full_like(flat, STANDARD_MEAN / 127.5 - 1.0))


def test_a_standardised_graph_ignores_brightness_and_contrast() -> None:
    graph, x_hold = _graph(1)
    x = torch.from_numpy(x_hold)
    with torch.no_grad():
        s0, m0 = graph(x)
        s1, m1 = graph(x * 0.7 - 0.2)  # darker, flatter: the same part under other light
    torch.testing.assert_close(s1, s0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m1, m0, atol=1e-4, rtol=1e-4)


def test_mean_std_pooling_doubles_the_pooled_vector_with_the_channel_std() -> None:
    plain = PatchFeatures(_cfg(1, global_pool="mean", standardize_input=False)).eval()
    both = PatchFeatures(_cfg(1, standardize_input=False)).eval()
    assert both.global_dim == 2 * plain.global_dim
    x = torch.from_numpy(_images(2, 1, seed=3))
    with torch.no_grad():
        _, p_mean = plain.forward_all(x)
        _, p_both = both.forward_all(x)
        by_stage = dict(zip(both.taps, both.trunk(x), strict=True))
    taps = [by_stage[s] for s in (3, 4)]  # the global stages
    assert p_mean is not None
    assert p_both is not None
    expect = torch.cat(
        [torch.cat([t.mean(dim=(2, 3)), t.std(dim=(2, 3), unbiased=False)], 1) for t in taps], 1
    )
    torch.testing.assert_close(p_both, expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_mean, torch.cat([t.mean(dim=(2, 3)) for t in taps], 1))


def test_skew_pooling_appends_the_channel_skewness() -> None:
    feats = PatchFeatures(_cfg(1, global_pool="mean_std_skew", standardize_input=False)).eval()
    plain = PatchFeatures(_cfg(1, global_pool="mean", standardize_input=False)).eval()
    assert feats.global_dim == 3 * plain.global_dim
    x = torch.from_numpy(_images(2, 1, seed=3))
    with torch.no_grad():
        _, pooled = feats.forward_all(x)
        by_stage = dict(zip(feats.taps, feats.trunk(x), strict=True))
    assert pooled is not None
    parts = []
    for s in (3, 4):
        t = by_stage[s].double()
        c = t - t.mean(dim=(2, 3), keepdim=True)
        sd = c.pow(2).mean(dim=(2, 3)).sqrt()
        parts += [t.mean(dim=(2, 3)), sd, c.pow(3).mean(dim=(2, 3)) / (sd + SKEW_EPS) ** 3]
    torch.testing.assert_close(pooled.double(), torch.cat(parts, 1), atol=1e-4, rtol=1e-4)


def test_unknown_pooling_is_refused() -> None:
    with pytest.raises(ValueError, match="global_pool"):
        PatchCoreConfig(global_pool="max")
    with pytest.raises(ValueError, match="global_pool"):
        TeachSettings(global_pool="max")
    cfg = TeachSettings(global_pool="mean_std", flip_views="none").config(1)
    assert cfg.global_pool == "mean_std"
    assert cfg.standardize_input


@pytest.mark.parametrize(
    ("channels", "pool"),
    [(1, "mean_std"), (3, "mean_std"), (1, "mean_std_skew")],
    ids=["gray", "rgb", "gray-skew"],
)
def test_onnx_matches_pytorch_with_both_options(channels: int, pool: str, tmp_path: Path) -> None:
    graph, _ = _graph(channels, global_pool=pool)
    path = export_fp32(graph, tmp_path / "model_fp32.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    x = _images(4, channels, seed=4) * 0.8 + 0.1
    t_score, t_map = torch_scores(graph, x)
    o_score, o_map = ort_session(path).run(["score", "anomaly_map"], {"image": x})
    np.testing.assert_allclose(o_score, t_score, atol=FP32_TOL, rtol=0)
    np.testing.assert_allclose(o_map, t_map, atol=FP32_TOL, rtol=0)


def test_int8_refit_finds_the_mean_std_pooled_features(tmp_path: Path) -> None:
    graph, x_hold = _graph(1)
    x_fit = _images(16, 1, seed=0)
    fp32 = export_fp32(graph, tmp_path / "fp32.onnx")
    raw = quantize_int8(fp32, tmp_path / "raw_int8.onnx", x_fit[:8])
    int8 = tmp_path / "int8.onnx"
    shutil.copyfile(raw, int8)
    info = fit_int8(int8, x_fit, x_hold, TeachSettings(bank_size=48), Int8Settings())
    assert info["gain"] > 0
    feats = graph_features(int8, x_hold)
    assert feats.pooled is not None
    assert feats.pooled.shape == (len(x_hold), graph.features.global_dim)
    consts = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(int8)).graph.initializer}
    assert consts["g_whiten"].shape == (graph.features.global_dim,) * 2
    # the standardisation stays float: no Q/DQ pair before the trunk's first convolution
    model = onnx.load(str(int8))
    first_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert first_q.input[0] != "image"
    scores = ort_session(int8).run(["score"], {"image": x_hold})[0]
    assert np.all(np.isfinite(scores))
