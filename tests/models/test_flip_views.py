"""Flip views: each image scored together with its mirror image(s) inside one graph.

Toy graphs (64 px random textures): the views' plumbing (the trunk's batch, maps flipped
back and averaged, pooled features averaged, the bank from every view), ONNX parity and the
INT8 refit reading every view's patches. The accuracy on real defects is in
docs/model-method.md (Flip views).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.export import export_fp32, torch_scores
from models.images import load_good_images
from models.package import load_package, preprocess_batch
from models.patchcore import FLIP_VIEWS, PatchCoreConfig, PatchFeatures
from models.quantize import Int8Settings, graph_features, quantize_int8
from models.teach import (
    TeachSettings,
    _input_spec,
    _split,
    choose_flip_views,
    fit_int8,
    teach,
)
from tests.models.test_export import _images, ort_session
from tests.models.test_quantize_gaussian import fit_toy_graph
from tests.models.test_standardize_pool import _cfg

FP32_TOL = 1e-4


def test_unknown_flip_views_are_refused() -> None:
    with pytest.raises(ValueError, match="flip_views"):
        PatchCoreConfig(flip_views="diagonal")
    with pytest.raises(ValueError, match="flip_views"):
        TeachSettings(flip_views="x")
    assert [PatchCoreConfig(flip_views=v).n_views for v in FLIP_VIEWS] == [1, 2, 2, 3]
    assert TeachSettings(flip_views="hv").config(3).flip_views == "hv"


@pytest.mark.parametrize("views", ["h", "v", "hv"])
def test_features_hold_every_view_and_pooled_features_their_mean(views: str) -> None:
    """Patch rows are view-major (the images, then each flipped view as the trunk saw it),
    and the pooled vector is the mean of the views' own pooled vectors."""
    cfg = _cfg(3, flip_views=views)
    plain = PatchFeatures(_cfg(3)).eval()
    viewed = PatchFeatures(cfg).eval()
    viewed.load_state_dict(plain.state_dict())
    x = torch.from_numpy(_images(3, 3, seed=5))
    flips = [(), *FLIP_VIEWS[views]]
    with torch.no_grad():
        f, pooled = viewed.forward_all(x)
        per_view = [plain.forward_all(x.flip(d) if d else x) for d in flips]
    assert f.shape[0] == len(flips) * 3
    torch.testing.assert_close(f, torch.cat([pf for pf, _ in per_view]), atol=1e-5, rtol=1e-5)
    assert pooled is not None
    mean = torch.stack([pp for _, pp in per_view if pp is not None]).mean(0)
    torch.testing.assert_close(pooled, mean, atol=1e-5, rtol=1e-5)


def test_a_horizontal_flip_view_makes_the_graph_mirror_invariant() -> None:
    """With the image and its h-flip as views, a mirrored part gets the same score and the
    mirrored map: each view's map is flipped back before the average (without that, the
    two maps would be averaged misaligned and this would fail)."""
    cfg = _cfg(3, flip_views="h", global_pool="mean_std_skew", brightness_margin=3.0)
    graph, _, x_hold = fit_toy_graph(cfg, 16, 6, 48, 1.0)
    x = torch.from_numpy(x_hold)
    with torch.no_grad():
        s0, m0 = graph(x)
        s1, m1 = graph(x.flip(3))
        s_v, _ = graph(x.flip(2))  # not a view: a different input, a different score
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m1, m0.flip(2), atol=1e-5, rtol=1e-5)
    assert float((s_v - s0).abs().max()) > 1e-3


def test_a_defect_shows_where_it_is_in_the_averaged_map() -> None:
    """A bright square on one side of a part raises the map there, not at its mirror place
    (averaging the views' maps without flipping them back would raise both alike)."""
    graph, _, x_hold = fit_toy_graph(_cfg(1, flip_views="h"), 16, 6, 48, 1.0)
    x = x_hold[:1].copy()
    x[0, :, 20:32, 4:16] = 2.5  # a defect on the left
    with torch.no_grad():
        _, clean = graph(torch.from_numpy(x_hold[:1]))
        _, amap = graph(torch.from_numpy(x))
    rise = amap - clean
    left = float(rise[0, 20:32, 4:16].mean())
    mirror = float(rise[0, 20:32, 48:60].mean())
    assert left > 2.0 * mirror


@pytest.mark.parametrize("views", ["h", "hv"])
def test_onnx_and_int8_refit_with_flip_views(views: str, tmp_path: Path) -> None:
    cfg = _cfg(3, flip_views=views, global_pool="mean_std_skew")
    graph, x_fit, x_hold = fit_toy_graph(cfg, 16, 6, 48, 1.0)
    path = export_fp32(graph, tmp_path / "model_fp32.onnx")
    t_score, t_map = torch_scores(graph, x_hold)
    o_score, o_map = ort_session(path).run(["score", "anomaly_map"], {"image": x_hold})
    np.testing.assert_allclose(o_score, t_score, atol=FP32_TOL, rtol=0)
    np.testing.assert_allclose(o_map, t_map, atol=FP32_TOL, rtol=0)
    # batch 1 (the runtime's) and the batch of 6 agree: the views do not mix images
    one, _ = ort_session(path).run(["score", "anomaly_map"], {"image": x_hold[2:3]})
    np.testing.assert_allclose(one, o_score[2:3], atol=FP32_TOL, rtol=0)

    q = tmp_path / "model_int8.onnx"
    quantize_int8(path, q, x_fit[:8], Int8Settings())
    feats = graph_features(q, x_fit[:5])
    cells = cfg.grid_hw[0] * cfg.grid_hw[1]
    assert feats.patches.shape[0] == cfg.n_views * 5 * cells  # every view's patches
    assert feats.pooled is not None
    assert feats.pooled.shape[0] == 5  # one per image
    assert feats.patch_score is not None
    assert feats.patch_score.shape == (5,)
    fit_int8(
        q,
        x_fit,
        x_hold,
        TeachSettings(bank_size=48, global_weight=1.0, gaussian_goods="fit"),
        Int8Settings(),
    )
    q_score, q_map = ort_session(q).run(["score", "anomaly_map"], {"image": x_hold})
    assert q_map.shape == t_map.shape
    assert float(np.abs(q_score - t_score).max()) < 0.15


# --------------------------------------------------------------------------- flip_views="auto"


def _folder(root: Path, n: int, *, corner: bool) -> Path:
    """Gray 64 px textures; with ``corner``, every part has a bright block top-left (a part
    whose mirror image, either way, is not a good part)."""
    rng = np.random.default_rng(4)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        noise = rng.normal(128, 40, size=(64, 64)).astype(np.float32)
        img = np.clip(cv2.GaussianBlur(noise, (0, 0), 2.0), 0, 255).astype(np.uint8)
        if corner:
            img[4:24, 4:24] = 235
        cv2.imwrite(str(root / f"img_{i:03d}.png"), img)
    return root


AUTO = TeachSettings(
    input_size=64,
    stages=(2, 3),
    grid_stride=8,
    neighbourhood=3,
    top_k=3,
    bank_size=200,
    holdout_fraction=0.35,
    flip_views="auto",
    int8=False,
    fp16=False,
    n_reference=2,
    threads=2,
)


def _choose(data: Path, s: TeachSettings) -> tuple[str, dict[str, object]]:
    images = load_good_images(data, min_images=10)
    fit_idx, hold_idx = _split(len(images.images), s)
    spec = _input_spec(s, images.color)
    x_hold = preprocess_batch([images.images[i] for i in hold_idx], spec)
    return choose_flip_views(images, fit_idx.tolist(), x_hold, s, spec)


def test_auto_admits_a_flip_for_goods_that_look_alike_mirrored(tmp_path: Path) -> None:
    chosen, info = _choose(_folder(tmp_path / "tex", 80, corner=False), AUTO)
    flagged = info["mirrored_goods_flagged"]
    assert isinstance(flagged, dict)
    assert chosen in {"h", "v"}
    assert flagged[chosen] <= AUTO.flip_auto_max_flagged
    assert info["n_holdout"] == 28


def test_auto_refuses_flips_for_a_part_whose_mirror_image_is_not_good(tmp_path: Path) -> None:
    """A part with a fixed asymmetric feature: its mirror images are flagged by the model
    without views, so a view would make the model blind to a mirrored part: no view."""
    chosen, info = _choose(_folder(tmp_path / "corner", 80, corner=True), AUTO)
    flagged = info["mirrored_goods_flagged"]
    assert isinstance(flagged, dict)
    assert chosen == "none"
    assert min(flagged.values()) > 0.5
    # a looser bound than the flagged share admits it again: the rule is the bound
    loose, _ = _choose(tmp_path / "corner", replace(AUTO, flip_auto_max_flagged=1.0))
    assert loose in {"h", "v"}


def test_auto_with_too_few_held_out_goods_takes_no_view(tmp_path: Path) -> None:
    chosen, info = _choose(_folder(tmp_path / "few", 20, corner=False), AUTO)
    assert chosen == "none"
    assert "fewer than" in str(info["reason"])


def test_auto_is_decided_before_the_graph_is_built() -> None:
    with pytest.raises(ValueError, match="auto"):
        AUTO.config(1)
    with pytest.raises(ValueError, match="flip_auto_max_flagged"):
        TeachSettings(flip_auto_max_flagged=1.5)


def test_teach_records_the_auto_decision_in_the_manifest(tmp_path: Path) -> None:
    data = _folder(tmp_path / "tex", 60, corner=False)
    pkg_dir = teach(data, tmp_path / "pkg", settings=AUTO, progress=False)
    with load_package(pkg_dir) as pkg:
        method = pkg.manifest.method
    assert method["settings"]["flip_views"] == "auto"  # what was asked
    assert method["flip_views"] == method["flip_choice"]["chosen"]  # what was built
    assert method["flip_views"] in {"h", "v"}
    assert set(method["flip_choice"]["mirrored_goods_flagged"]) == {"h", "v"}
