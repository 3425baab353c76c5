"""The image-level Gaussian refitted on every good (``gaussian_goods="all"``, the default).

Gain and thresholds come from the held-out goods scored out of sample (by the Gaussian of
the fitting goods alone); the final Gaussian is then fitted on the fitting and held-out
goods together, in the FP32 and the INT8 graph alike, and the manifest's held-out metrics
stay out of sample. Real teach runs on 64 px toy textures, real ONNX Runtime sessions.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from models.images import load_good_images
from models.package import load_package, preprocess_batch
from models.patchcore import GlobalGaussian
from models.quantize import graph_features, mahalanobis
from models.teach import _input_spec, _split, refit_gaussian_on_all_goods, teach
from tests.models.test_flip_views import AUTO, _folder

TOY = replace(  # the flip-view tests' toy settings, with INT8 and a small Gaussian
    AUTO,
    global_stages=(3, 4),
    holdout_fraction=0.3,
    flip_views="none",
    int8=True,
    calibration_images=8,
)


def _consts(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_the_refit_uses_every_good_and_reports_each_held_out_goods_move() -> None:
    rng = np.random.default_rng(0)
    fit, hold = rng.normal(size=(60, 6)), rng.normal(size=(20, 6))
    old = GlobalGaussian.fit(torch.from_numpy(fit))
    old_d = mahalanobis(hold, old.mean.numpy(), old.whiten.numpy())
    new, move = refit_gaussian_on_all_goods(2.0, old_d, fit, hold)
    both = GlobalGaussian.fit(torch.from_numpy(np.concatenate([fit, hold])))
    np.testing.assert_allclose(new.mean.numpy(), both.mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(new.whiten.numpy(), both.whiten.numpy(), rtol=1e-5)
    assert new.gain == 2.0
    want = 2.0 * (mahalanobis(hold, new.mean.numpy(), new.whiten.numpy()) - old_d)
    np.testing.assert_allclose(move, want, rtol=1e-4, atol=1e-6)
    assert np.median(move) < 0  # held-out goods, now part of the fit, score lower


@pytest.fixture(scope="module")
def taught(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("goods")
    data = _folder(root / "tex", 60, corner=False)
    return {
        mode: teach(data, root / mode, settings=replace(TOY, gaussian_goods=mode), progress=False)
        for mode in ("fit", "all")
    } | {"data": data}


def test_thresholds_are_chosen_out_of_sample_then_the_gaussian_takes_every_good(
    taught: dict[str, Path],
) -> None:
    with load_package(taught["fit"]) as a, load_package(taught["all"]) as b:
        ma, mb = a.manifest, b.manifest
        fp32 = {k: _consts(p.graph_path("fp32")) for k, p in (("fit", a), ("all", b))}
        int8 = {k: p.graph_path("int8") for k, p in (("fit", a), ("all", b))}
        # same held-out scores before the refit: the same FP32 threshold and gain
        assert mb.threshold.raw_scale == pytest.approx(ma.threshold.raw_scale, rel=1e-6)
        assert mb.method["global_fit"]["gain"] == pytest.approx(
            ma.method["global_fit"]["gain"], rel=1e-6
        )
        assert mb.method["gaussian_goods"] == "all"
        n = mb.method["images"]["fit"] + mb.method["images"]["holdout"]
        assert mb.method["global_fit"]["goods"] == n
        assert mb.metrics["int8_global_fit"]["goods"] == n
        assert "goods" not in ma.method["global_fit"]
        # the final FP32 Gaussian is the fit of every good's pooled features
        assert not np.allclose(fp32["all"]["g_mean"], fp32["fit"]["g_mean"])
        # held-out metrics stay out of sample: the highest held-out good is the threshold
        for g in ("fp32", "int8"):
            assert mb.metrics["holdout_good"][g]["score_max"] == pytest.approx(1.0, abs=1e-3)
            assert ma.metrics["holdout_good"][g]["score_max"] == pytest.approx(1.0, abs=1e-3)
        # ... while the final graph scores its own (in-sample) held-out goods lower
        s = replace(TOY, gaussian_goods="all")
        images = load_good_images(taught["data"], min_images=10)
        fit_idx, hold_idx = _split(len(images.images), s)
        spec = _input_spec(s, images.color)
        x_hold = preprocess_batch([images.images[i] for i in hold_idx], spec)
        x_fit = preprocess_batch([images.images[i] for i in fit_idx], spec)
        ref = [r.scores["fp32"] for r in mb.reference]
        assert max(ref) < 1.0
        # the INT8 Gaussian too: the fit of the INT8 graph's own pooled features of every good
        own = [graph_features(int8["all"], x).pooled for x in (x_fit, x_hold)]
        assert own[0] is not None
        assert own[1] is not None
        want = GlobalGaussian.fit(torch.from_numpy(np.concatenate([own[0], own[1]])))
        c8 = _consts(int8["all"])
        np.testing.assert_allclose(c8["g_mean"], want.mean.numpy(), rtol=1e-4, atol=1e-5)
