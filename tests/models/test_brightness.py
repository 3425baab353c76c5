"""The brightness check (``brightness_margin``): a 2-d Gaussian of each image's mean and std.

Toy graphs (64 px random textures): the plumbing (the statistic, the gain rule, the maximum
with the score, a standardised graph flagging a darker or brighter copy again, ONNX parity,
the INT8 graph keeping the check in float). The accuracy on real defects is in
docs/model-method.md (Brightness check).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

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
    image_stats,
)
from models.quantize import Int8Settings, quantize_int8
from models.teach import TeachSettings, fit_int8, holdout_scores
from tests.models.test_export import _images, ort_session
from tests.models.test_standardize_pool import _cfg as _std_cfg

FP32_TOL = 1e-4
MARGIN = 1.5


def _cfg(channels: int, **kw: object) -> PatchCoreConfig:
    """The standardised toy configuration of test_standardize_pool, with the check on."""
    return _std_cfg(channels, **{"brightness_margin": MARGIN, **kw})


def _fit(
    channels: int, **kw: object
) -> tuple[PatchCoreGraph, np.ndarray, np.ndarray, dict[str, float]]:
    """A toy graph fitted as teach does (bank, both Gaussians, gains by holdout_scores, scale),
    its fitting and held-out images and the fit record."""
    cfg = _cfg(channels, **kw)
    feats = PatchFeatures(cfg).eval()
    # the goods vary a little in brightness and contrast, like parts under one lamp
    gen = np.random.default_rng(5)
    x_fit = _images(16, channels, seed=0) * gen.uniform(0.9, 1.0, (16, 1, 1, 1)).astype(
        np.float32
    ) + gen.uniform(-0.05, 0.05, (16, 1, 1, 1)).astype(np.float32)
    x_hold = _images(6, channels, seed=1)
    with torch.no_grad():
        f, pooled = feats.forward_all(torch.from_numpy(x_fit))
    coreset = greedy_coreset(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), 48)
    brightness = (
        GlobalGaussian.fit(image_stats(torch.from_numpy(x_fit)))
        if cfg.brightness_margin > 0
        else None
    )
    graph = PatchCoreGraph(
        feats,
        coreset,
        gaussian=GlobalGaussian.fit(pooled) if pooled is not None else None,
        brightness=brightness,
    ).eval()
    s = TeachSettings(global_weight=0.5, brightness_margin=cfg.brightness_margin)
    raw, fit, _ = holdout_scores(graph, x_hold, s, progress=False)
    graph.set_raw_scale(float(raw.max()))  # 1.0 = the highest held-out good
    return graph, x_fit, x_hold, fit


def test_settings_carry_and_check_the_margin() -> None:
    assert PatchCoreConfig().brightness_margin == 0.0  # old manifests: no check
    cfg = TeachSettings(brightness_margin=2.0, flip_views="none").config(1)
    assert cfg.brightness_margin == 2.0
    with pytest.raises(ValueError, match="brightness_margin"):
        PatchCoreConfig(brightness_margin=-1.0)
    with pytest.raises(ValueError, match="brightness_margin"):
        TeachSettings(brightness_margin=float("nan"))


def test_image_stats_are_the_mean_and_std_over_all_pixels() -> None:
    x = torch.from_numpy(_images(3, 3, seed=2))
    stats = image_stats(x)
    torch.testing.assert_close(stats[:, 0], x.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(stats[:, 1], x.std(dim=(1, 2, 3), unbiased=False))


def test_graph_without_the_margin_has_no_check() -> None:
    feats = PatchFeatures(_cfg(1, brightness_margin=0.0)).eval()
    graph = PatchCoreGraph(feats, torch.zeros(8, feats.dim))
    assert not graph.has_brightness
    assert "b_mean" not in dict(graph.named_buffers())
    with pytest.raises(ValueError, match="brightness"):
        graph.set_brightness(GlobalGaussian(torch.zeros(2), torch.eye(2), 1.0))
    # a manifest without the key rebuilds the config without the term
    fields = {f.name for f in dataclasses.fields(PatchCoreConfig)}
    old_method: dict[str, Any] = {
        "stages": [4, 5],
        "global_stages": [3, 4, 5, 6],
        "global_pool": "mean_std",
    }
    kwargs: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in old_method.items()
    }
    assert (
        PatchCoreConfig(**{k: v for k, v in kwargs.items() if k in fields}).brightness_margin == 0
    )


def test_gain_is_one_over_margin_times_the_highest_held_out_good() -> None:
    graph, _, x_hold, fit = _fit(1)
    x = torch.from_numpy(x_hold)
    with torch.no_grad():
        bdist = graph.brightness_distance(x).double().numpy()
        pmap, gdist = graph.branches(x)
        assert gdist is not None
        main = (graph.patch_score(pmap) + graph.g_gain * gdist) * graph.inv_scale
        score, _ = graph(x)
    assert fit["brightness_max"] == pytest.approx(float(bdist.max()), rel=1e-5)
    assert fit["brightness_gain"] == pytest.approx(1.0 / (MARGIN * bdist.max()), rel=1e-5)
    assert float(graph.b_gain) == pytest.approx(fit["brightness_gain"], rel=1e-6)
    assert fit["gain"] > 0  # the image-level Gaussian's gain is still set
    # the score is the maximum of the two; held-out goods stay under 1 / margin on the check
    expect = torch.maximum(main, graph.b_gain * torch.from_numpy(bdist).float())
    torch.testing.assert_close(score, expect, atol=1e-5, rtol=1e-5)
    assert float((graph.b_gain * torch.from_numpy(bdist)).max()) == pytest.approx(1 / MARGIN)


@pytest.mark.parametrize("channels", [1, 3], ids=["gray", "rgb"])
def test_standardised_graph_flags_a_darker_or_brighter_copy(channels: int) -> None:
    graph, _, x_hold, _ = _fit(channels)
    x = torch.from_numpy(x_hold)
    darker = (x + 1.0) * 0.7 - 1.0  # pixel values x 0.7
    brighter = (x + 1.0) * 1.3 - 1.0  # x 1.3
    with torch.no_grad():
        s0, m0 = graph(x)
        s_dark, m_dark = graph(darker)
        s_bright, _ = graph(brighter)
        d0 = graph.brightness_distance(x)
        d_dark = graph.brightness_distance(darker)
    # the trunk's terms do not move (standardised input), only the brightness term does
    torch.testing.assert_close(m_dark, m0, atol=1e-4, rtol=1e-4)
    assert torch.all(d_dark > d0)
    assert torch.all(s_dark > s0)
    assert torch.all(s_bright > s0)
    assert torch.all(s_dark > 1.0)  # over the threshold (1.0 = highest held-out good here)
    assert torch.all(s_bright > 1.0)


@pytest.mark.parametrize(
    ("channels", "kw"),
    [(1, {}), (3, {}), (1, {"standardize_input": False, "global_stages": ()})],
    ids=["gray", "rgb", "plain-no-gaussian"],
)
def test_onnx_matches_pytorch(channels: int, kw: dict[str, object], tmp_path: Path) -> None:
    graph, _, _, _ = _fit(channels, **kw)
    path = export_fp32(graph, tmp_path / "model_fp32.onnx")
    consts = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert {"b_mean", "b_whiten", "b_gain"} <= consts
    x = np.concatenate([_images(3, channels, seed=4), _images(2, channels, seed=5) * 0.6 - 0.3])
    t_score, t_map = torch_scores(graph, x)
    o_score, o_map = ort_session(path).run(["score", "anomaly_map"], {"image": x})
    np.testing.assert_allclose(o_score, t_score, atol=FP32_TOL, rtol=0)
    np.testing.assert_allclose(o_map, t_map, atol=FP32_TOL, rtol=0)


def test_int8_graph_keeps_the_term_in_float(tmp_path: Path) -> None:
    graph, x_fit, x_hold, _ = _fit(1)
    fp32 = export_fp32(graph, tmp_path / "fp32.onnx")
    raw = quantize_int8(fp32, tmp_path / "raw_int8.onnx", x_fit[:8])
    int8 = tmp_path / "int8.onnx"
    shutil.copyfile(raw, int8)
    # the INT8 refit still finds the image-level Gaussian's chain past the brightness Add
    info = fit_int8(
        int8, x_fit, x_hold, TeachSettings(bank_size=48, brightness_margin=MARGIN), Int8Settings()
    )
    assert info["gain"] > 0
    model = onnx.load(str(int8))
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_allclose(consts["b_mean"], graph.b_mean.numpy())
    assert consts["b_mean"].dtype == np.float32
    assert float(consts["b_gain"]) == pytest.approx(float(graph.b_gain))
    sess = ort_session(int8)
    s0 = sess.run(["score"], {"image": x_hold})[0]
    s_dark = sess.run(["score"], {"image": (x_hold + 1.0) * 0.7 - 1.0})[0]
    assert np.all(np.isfinite(s0))
    assert np.all(s_dark > s0)
