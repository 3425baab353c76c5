"""Teach a model package from good images (``lineinspect teach``).

Steps: load the good images (bad files skipped and counted), hold out a share of them, fit
the PatchCore memory bank and the image-level Gaussian on the rest, choose the gain and the
threshold on the held-out goods (:mod:`models.threshold`), refit the Gaussian on every good
(``gaussian_goods="all"``), export the whole scoring graph to ONNX (FP32, FP16), quantize it
to INT8 (QDQ, calibrated on good images), check ONNX-vs-PyTorch parity, score reference
images, and write the package with :func:`models.package.write_package`.

Train-only module: it imports torch. See ``docs/model-method.md`` for the method and the
numbers behind the defaults.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from models.backbone import LITE_MEAN, LITE_STD
from models.export import export_fp16, export_fp32
from models.images import ImageSet, ImageSetError, load_good_images
from models.package import (
    InputSpec,
    ReferenceImage,
    ThresholdSpec,
    preprocess_batch,
    semver_key,
    write_package,
)
from models.patchcore import (
    FLIP_VIEWS,
    GLOBAL_POOLS,
    GlobalGaussian,
    PatchCoreConfig,
    PatchCoreGraph,
    PatchFeatures,
    greedy_coreset,
    image_stats,
    pca_projection,
)
from models.quantize import (
    Int8Settings,
    graph_features,
    mahalanobis,
    quantize_int8,
    set_bank,
    set_gaussian,
    set_graph_scale,
)
from models.threshold import ThresholdRule, choose_threshold

log = logging.getLogger(__name__)

#: Largest |ONNX FP32 - PyTorch| normalised score difference accepted at export.
FP32_PARITY_TOL = 1e-3
#: Tolerances written to the manifest for on-device reference checks (normalised score).
REFERENCE_TOLERANCE = {"fp32": 0.02, "fp16": 0.05, "int8": 0.10}
#: With ``default_graph="auto"``, INT8 becomes the default graph only when its normalised
#: scores on the held-out goods stay within this of FP32's. It catches a broken INT8 graph
#: (scores off by ~1 at the threshold), not a small AUROC loss, which no held-out-goods
#: statistic showed (MTD: 0.155 with an AUROC loss of 0.004, 0.138 with a loss of 0.021);
#: that is measured on defects by ``bench/quantize.py`` (docs/model-method.md, INT8).
INT8_DEFAULT_TOL = 0.25
#: ``flip_views="auto"``: the quick model without views is fitted on at most this many fitting
#: images, with a coreset bank of this many patches from at most this many candidates.
FLIP_AUTO_FIT_IMAGES = 200
FLIP_AUTO_BANK = 1000
FLIP_AUTO_CORESET_CANDIDATES = 20_000
#: ``flip_views="auto"`` with fewer held-out goods than this: no views (too few to judge).
FLIP_AUTO_MIN_HOLDOUT = 10
#: The flips ``flip_views="auto"`` considers, in order of preference on a tie.
FLIP_AUTO_VIEWS = ("h", "v")


class TeachError(RuntimeError):
    """Teaching failed for a reason the user can act on."""


@dataclass(frozen=True)
class TeachSettings:
    """Knobs of teaching; the defaults are the shipped method (docs/model-method.md)."""

    backbone: str = "efficientnet-lite0"
    input_size: int = 256
    stages: tuple[int, ...] = (4, 5)
    neighbourhood: int = 5
    grid_stride: int = 16
    blur_sigma_cells: float = 1.0
    top_k: int = 10
    global_stages: tuple[int, ...] = (3, 4, 5, 6)
    #: Weight of the image-level Gaussian against the patch term (gain = weight x median patch
    #: score / median distance on held-out goods); 1.0 since 2026-12-05 (0.5 before).
    global_weight: float = 1.0
    #: Project patch features to this many dimensions (PCA of the fitting patches, a constant
    #: MatMul in the graph) before the nearest-neighbour search; 0 = off.
    projection_dim: int = 0
    #: Pooling of the image-level branch: ``mean``, ``mean_std`` (per-channel mean and
    #: standard deviation) or ``mean_std_skew`` (and skewness; the default since 2026-12-05).
    #: See docs/model-method.md, Per-image standardisation and mean+std pooling.
    global_pool: str = "mean_std_skew"
    #: Standardise each image (zero mean, unit variance, then mean 128 / std 40 in pixel
    #: units) inside the graph before the backbone; overall brightness/contrast then no
    #: longer count, except through the brightness check. On since 2026-12-05.
    standardize_input: bool = True
    #: Brightness check: a part whose image mean/std lies further from the good images'
    #: (Mahalanobis, 2-d Gaussian) than ``margin x`` the highest held-out good is flagged
    #: (score = max(score, distance / that)); 0 = off. Gives a standardised graph back its
    #: sight of overall brightness and contrast. 3.0 since 2026-12-05.
    brightness_margin: float = 3.0
    #: Mirrored views scored with each image (``none``, ``h``, ``v``, ``hv``): maps averaged
    #: over the views, bank from every view's patches. Blind to a mirrored part. ``auto`` (the
    #: default since 2026-12-05): teach decides (:func:`choose_flip_views`): one flip view
    #: (``h`` or ``v``) only when the model without views would be as blind to a mirrored
    #: part anyway.
    flip_views: str = "auto"
    #: ``flip_views="auto"`` admits a flip only if at most this share of the mirrored held-out
    #: goods scores above the threshold of a quick model without views.
    flip_auto_max_flagged: float = 0.1
    #: Goods the image-level Gaussian is finally fitted on: ``all`` (the fitting and the
    #: held-out goods; the default since 2026-12-05) or ``fit`` (the fitting goods only, as
    #: before). Either way the gain and every graph's threshold come from the held-out goods
    #: scored by the Gaussian of the fitting goods alone (out of sample); ``all`` then refits
    #: it on every good (MTD: 685 -> 761 goods, Gaussian alone 0.975-0.982 -> 0.984).
    gaussian_goods: str = "all"
    bank_size: int = 2000
    coreset_candidates: int = 60_000
    holdout_fraction: float = 0.1
    min_holdout: int = 5
    min_images: int = 10
    target_false_reject_rate: float = 0.01
    threshold_margin: float = 1.0
    calibration_images: int = 64
    int8: bool = True
    #: INT8 activations: ``u8`` (fast on ONNX Runtime CPU) or ``s8`` (symmetric, for TensorRT).
    int8_activations: str = "u8"
    fp16: bool = True
    default_graph: str = "auto"
    n_reference: int = 4
    batch_size: int = 16
    seed: int = 0
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # refuse a bad choice now, not after minutes of fitting
        for name, allowed in (
            ("int8_activations", ("u8", "s8")),
            ("default_graph", ("auto", "fp32", "int8")),
            ("global_pool", GLOBAL_POOLS),
            ("flip_views", ("auto", *FLIP_VIEWS)),
            ("gaussian_goods", ("all", "fit")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"TeachSettings.{name} must be one of {', '.join(allowed)}, "
                    f"not {getattr(self, name)!r}"
                )
        if not self.brightness_margin >= 0:
            raise ValueError(
                f"TeachSettings.brightness_margin must be >= 0 (0 = off), not "
                f"{self.brightness_margin}"
            )
        if not 0.0 <= self.flip_auto_max_flagged <= 1.0:
            raise ValueError(
                "TeachSettings.flip_auto_max_flagged must be in [0, 1], not "
                f"{self.flip_auto_max_flagged}"
            )
        if self.projection_dim < 0:
            raise ValueError(
                f"TeachSettings.projection_dim must be >= 0 (0 = off), not {self.projection_dim}"
            )

    def config(self, channels: int) -> PatchCoreConfig:
        """The graph configuration for an input with ``channels`` channels.

        ``flip_views="auto"`` must be resolved first (:func:`choose_flip_views`).
        """
        if self.flip_views == "auto":
            raise ValueError("flip_views='auto' is decided by teach (choose_flip_views) first")
        return PatchCoreConfig(
            backbone=self.backbone,
            input_hw=(self.input_size, self.input_size),
            in_channels=channels,
            stages=self.stages,
            neighbourhood=self.neighbourhood,
            grid_stride=self.grid_stride,
            blur_sigma_cells=self.blur_sigma_cells,
            top_k=self.top_k,
            global_stages=self.global_stages,
            global_weight=self.global_weight,
            projection_dim=self.projection_dim,
            global_pool=self.global_pool,
            standardize_input=self.standardize_input,
            brightness_margin=self.brightness_margin,
            flip_views=self.flip_views,
        )


def _input_spec(s: TeachSettings, color: str) -> InputSpec:
    channels = 1 if color == "gray" else 3
    return InputSpec(
        width=s.input_size,
        height=s.input_size,
        color="gray" if color == "gray" else "rgb",
        channels=channels,
        resize="stretch",
        scale=1.0 / 255.0,
        mean=LITE_MEAN[:channels],
        std=LITE_STD[:channels],
    )


def _split(n: int, s: TeachSettings) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Indices (fit, holdout): a seeded random share of the goods is held out."""
    n_hold = max(s.min_holdout, round(n * s.holdout_fraction))
    if n - n_hold < max(2, s.min_holdout):
        raise ImageSetError(f"{n} good images are too few to fit and hold out {n_hold}")
    order = np.random.default_rng(s.seed).permutation(n)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def _run_torch(
    fn: Any, x: npt.NDArray[np.float32], batch: int, desc: str, progress: bool
) -> list[Any]:
    outs = []
    with torch.no_grad():
        for i in tqdm(range(0, len(x), batch), desc=desc, disable=not progress, unit="batch"):
            outs.append(fn(torch.from_numpy(x[i : i + batch])))
    return outs


def _ort_scores(
    path: Path, x: npt.NDArray[np.float32], threads: int = 2
) -> npt.NDArray[np.float32]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    scores = [sess.run(["score"], {"image": x[i : i + 8]})[0] for i in range(0, len(x), 8)]
    return np.concatenate(scores).astype(np.float32)


def _encode_png(img: npt.NDArray[np.uint8]) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise TeachError("could not encode a reference image as PNG")
    return bytes(buf.tobytes())


def fit_graph(
    images: ImageSet, fit_idx: Sequence[int], s: TeachSettings, spec: InputSpec, progress: bool
) -> tuple[PatchCoreGraph, torch.Tensor | None]:
    """Build the feature extractor and fit the coreset memory bank on ``fit_idx`` images.

    With ``global_stages``, the image-level Gaussian is fitted on the same images; its gain
    is set later by :func:`holdout_scores` (it needs held-out goods). Returns the graph and
    the fitting images' pooled features (None without the Gaussian branch).
    """
    cfg = s.config(spec.channels)
    features = PatchFeatures(cfg).eval()
    if cfg.projection_dim > features.dim:  # refused before the feature pass
        raise TeachError(
            f"projection_dim {cfg.projection_dim} exceeds the {features.dim} feature "
            f"dimensions of stages {list(cfg.stages)}"
        )
    x = preprocess_batch([images.images[i] for i in fit_idx], spec)
    outs = _run_torch(features.forward_all, x, s.batch_size, "features", progress)
    patches = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f, _ in outs])
    gaussian, pooled = None, None
    if cfg.global_stages:
        pooled = torch.cat([g for _, g in outs])
        gaussian = GlobalGaussian.fit(pooled)
    brightness = None
    if cfg.brightness_margin > 0:
        brightness = GlobalGaussian.fit(image_stats(torch.from_numpy(x)))
    projection = None
    if cfg.projection_dim:
        projection = pca_projection(patches, cfg.projection_dim, seed=s.seed)
        patches = patches @ projection
    t0 = time.monotonic()
    bank = greedy_coreset(patches, s.bank_size, seed=s.seed, candidate_limit=s.coreset_candidates)
    log.info("coreset %d of %d patches in %.1f s", len(bank), len(patches), time.monotonic() - t0)
    graph = PatchCoreGraph(
        features,
        bank,
        raw_scale=1.0,
        gaussian=gaussian,
        projection=projection,
        brightness=brightness,
    ).eval()
    return graph, pooled


def refit_gaussian_on_all_goods(
    gain: float,
    hold_dist: npt.NDArray[np.floating[Any]],
    pooled_fit: npt.NDArray[np.floating[Any]],
    pooled_hold: npt.NDArray[np.floating[Any]],
) -> tuple[GlobalGaussian, npt.NDArray[np.float64]]:
    """The image-level Gaussian refitted on the fitting and held-out goods together.

    ``hold_dist`` are the held-out goods' distances under the Gaussian of the fitting goods,
    which chose ``gain`` and the thresholds (out of sample). Returns the Gaussian of all goods
    (same gain) and, per held-out good, how much its raw score moves from the old Gaussian to
    the new one (``gain x (new distance - old distance)``; negative: a good that is now part of
    the fit scores lower). The callers subtract that move from scores the new graph gives the
    held-out goods to get their out-of-sample scores back (for the thresholds and metrics).
    """
    hold = np.asarray(pooled_hold, np.float64)
    both = torch.from_numpy(np.concatenate([np.asarray(pooled_fit, np.float64), hold]))
    new = GlobalGaussian.fit(both)
    new_d = mahalanobis(hold, new.mean.double().numpy(), new.whiten.double().numpy())
    move = gain * (new_d - np.asarray(hold_dist, np.float64))
    return GlobalGaussian(new.mean, new.whiten, gain), move


def choose_flip_views(
    images: ImageSet,
    fit_idx: Sequence[int],
    x_hold: npt.NDArray[np.float32],
    s: TeachSettings,
    spec: InputSpec,
    *,
    progress: bool = False,
) -> tuple[str, dict[str, Any]]:
    """Decide ``flip_views="auto"``: ``h``, ``v`` or ``none``, and the evidence.

    A flip view makes the model blind to a part that is its good self mirrored. A model
    without views is just as blind when the goods look alike mirrored (textures; symmetric
    parts under even light): then the view costs no sensitivity and helps (docs/
    model-method.md, Flip views). So a quick model without views (patch term only, a coreset
    bank of ``FLIP_AUTO_BANK`` patches from up to ``FLIP_AUTO_FIT_IMAGES`` fitting images)
    gets its threshold on the held-out goods by the teach rule, and the held-out goods are
    scored mirrored left-right (``h``) and upside down (``v``). A flip is admitted when at most
    ``s.flip_auto_max_flagged`` of its mirrored goods would be flagged; of two, the one
    flagged less (``h`` on a tie). At most one flip: a second one is a third backbone pass.
    Settings other than ``auto`` are returned as they are.
    """
    if s.flip_views != "auto":
        return s.flip_views, {"rule": "set", "chosen": s.flip_views}
    info: dict[str, Any] = {
        "rule": (
            "auto: a flip is admitted if at most max_flagged of the mirrored held-out goods score"
            " above the threshold of a quick model without views; at most one flip"
        ),
        "max_flagged": s.flip_auto_max_flagged,
    }
    if len(x_hold) < FLIP_AUTO_MIN_HOLDOUT:
        info |= {
            "chosen": "none",
            "reason": f"{len(x_hold)} held-out goods, fewer than {FLIP_AUTO_MIN_HOLDOUT}",
        }
        return "none", info
    t0 = time.monotonic()
    quick = replace(
        s,
        flip_views="none",
        projection_dim=0,
        global_stages=(),
        brightness_margin=0.0,
        bank_size=FLIP_AUTO_BANK,
        coreset_candidates=FLIP_AUTO_CORESET_CANDIDATES,
    )
    rng = np.random.default_rng(s.seed + 2)
    n_fit = min(FLIP_AUTO_FIT_IMAGES, len(fit_idx))
    sub = np.sort(rng.choice(np.asarray(fit_idx), n_fit, replace=False))
    graph, _ = fit_graph(images, sub.tolist(), quick, spec, progress)

    def patch_scores(t: torch.Tensor) -> torch.Tensor:
        return graph.patch_score(graph.patch_distances(t))

    def scored(x_in: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        outs = _run_torch(patch_scores, x_in, s.batch_size, "flip check", False)
        return torch.cat(outs).double().numpy()

    plain = scored(x_hold)
    thr = choose_threshold(plain, ThresholdRule(s.target_false_reject_rate, s.threshold_margin))
    flagged = {}
    for view in FLIP_AUTO_VIEWS:
        (dims,) = FLIP_VIEWS[view]
        mirrored = scored(np.ascontiguousarray(np.flip(x_hold, axis=dims[0])))
        flagged[view] = round(float(np.mean(mirrored > thr.raw_scale)), 4)
    best = min(FLIP_AUTO_VIEWS, key=lambda v: flagged[v])  # first on a tie
    chosen = best if flagged[best] <= s.flip_auto_max_flagged else "none"
    info |= {
        "chosen": chosen,
        "mirrored_goods_flagged": flagged,
        "n_fit": n_fit,
        "n_holdout": len(x_hold),
        "seconds": round(time.monotonic() - t0, 1),
    }
    log.info("flip views auto -> %s (mirrored goods flagged: %s)", chosen, flagged)
    return chosen, info


def holdout_scores(
    graph: PatchCoreGraph,
    x_hold: npt.NDArray[np.float32],
    s: TeachSettings,
    progress: bool,
    pooled_fit: torch.Tensor | None = None,
) -> tuple[npt.NDArray[np.float32], dict[str, float], npt.NDArray[np.float64] | None]:
    """Raw image scores of the held-out goods; with the global branch, also set its gain.

    gain = weight * median(patch score) / median(Mahalanobis distance), both over the
    held-out goods, so that with weight 1 both terms count alike on a typical good part.
    With the brightness check, its gain is ``1 / (brightness_margin x highest held-out good
    distance)`` (recorded as ``brightness_max`` / ``brightness_gain``); it acts on normalised
    scores (a maximum), so the raw scores returned do not include it. With ``pooled_fit``
    (the fitting goods' pooled features) and ``s.gaussian_goods == "all"``, the Gaussian is
    then refitted on every good (:func:`refit_gaussian_on_all_goods`; ``goods`` recorded).
    Returns the raw (unnormalised) scores, out of sample; the medians and gains (recorded in
    the manifest; empty without either); and the held-out goods' score moves under the refit
    (None without one). One pass over the held-out goods.
    """

    def terms(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pmap, g, pooled = graph.branches_and_pooled(t)
        b = graph.brightness_distance(t) if graph.has_brightness else torch.zeros(len(t))
        zero = torch.zeros(len(t))
        return (
            graph.patch_score(pmap),
            g if g is not None else zero,
            b,
            pooled if pooled is not None else zero,
        )

    outs = _run_torch(terms, x_hold, s.batch_size, "holdout", progress)
    patch = torch.cat([o[0] for o in outs]).double()
    raw = patch.clone()
    fit: dict[str, float] = {}
    move = None
    if graph.has_global:
        dist = torch.cat([o[1] for o in outs]).double()
        fit = gaussian_gain(s.global_weight, patch.numpy(), dist.numpy())
        gaussian = GlobalGaussian(graph.g_mean, graph.g_whiten, fit["gain"])
        raw = raw + fit["gain"] * dist
        if pooled_fit is not None and s.gaussian_goods == "all":
            pooled_hold = torch.cat([o[3] for o in outs]).numpy()
            gaussian, move = refit_gaussian_on_all_goods(
                fit["gain"], dist.numpy(), pooled_fit.numpy(), pooled_hold
            )
            fit["goods"] = float(len(pooled_fit) + len(pooled_hold))
        graph.set_gaussian(gaussian)
    if graph.has_brightness:
        bmax = float(torch.cat([o[2] for o in outs]).max())
        bgain = 1.0 / (s.brightness_margin * max(bmax, 1e-12))
        graph.set_brightness(GlobalGaussian(graph.b_mean, graph.b_whiten, bgain))
        fit |= {"brightness_max": bmax, "brightness_gain": bgain}
    return raw.float().numpy(), fit, move


def gaussian_gain(
    weight: float, patch: npt.NDArray[np.floating[Any]], dist: npt.NDArray[np.floating[Any]]
) -> dict[str, float]:
    """The Gaussian term's gain: ``weight * median(patch score) / median(distance)``.

    Both medians over the held-out goods, so that with weight 1 both terms count alike on a
    typical good part. Returns the medians and the gain (as recorded in the manifest).
    """
    p_med = float(np.median(np.asarray(patch, np.float64)))
    g_med = float(np.median(np.asarray(dist, np.float64)))
    return {
        "patch_median": p_med,
        "global_median": g_med,
        "gain": weight * p_med / max(g_med, 1e-12),
    }


def fit_int8(
    int8_path: Path,
    x_fit: npt.NDArray[np.float32],
    x_hold: npt.NDArray[np.float32],
    s: TeachSettings,
    int8: Int8Settings,
    *,
    threads: int = 2,
    hold_move: list[npt.NDArray[np.float64]] | None = None,
) -> dict[str, float]:
    """Refit a freshly quantized graph on the features it computes itself.

    The memory bank is rebuilt from the INT8 graph's patch features of the fitting images
    (quantization noise then hits bank and queries alike; MTD: AUROC 0.67 -> 0.86 when it
    was introduced). With ``int8.gaussian == "refit"`` the image-level Gaussian is refitted
    the same way: mean and Ledoit-Wolf precision on the INT8 graph's pooled features of the
    fitting images, gain by the rule of :func:`holdout_scores` on the held-out goods' INT8
    patch scores and distances. With ``s.gaussian_goods == "all"`` the Gaussian is then
    refitted on the fitting and held-out goods' INT8 pooled features together, with that gain
    (:func:`refit_gaussian_on_all_goods`); the held-out goods' score moves are appended to
    ``hold_move`` when given. Returns that Gaussian fit (medians and gain; empty if none).
    The graph's normalisation (``inv_scale``) is left to the caller.
    """
    fit = graph_features(int8_path, x_fit, threads)
    bank = greedy_coreset(
        torch.from_numpy(fit.patches),
        s.bank_size,
        seed=s.seed,
        candidate_limit=s.coreset_candidates,
    )
    set_bank(int8_path, bank.numpy())
    if fit.pooled is None and s.global_stages:
        raise TeachError(f"{int8_path}: the image-level Gaussian branch was not found")
    if fit.pooled is None or int8.gaussian != "refit":
        return {}
    gaussian = GlobalGaussian.fit(torch.from_numpy(fit.pooled))
    mean, whiten = gaussian.mean.numpy(), gaussian.whiten.numpy()
    hold = graph_features(int8_path, x_hold, threads)  # patch term: with the new bank
    if hold.pooled is None or hold.patch_score is None:
        raise TeachError(f"{int8_path} lost its Gaussian branch's pooled features")
    hold_dist = mahalanobis(hold.pooled, mean, whiten)
    info = gaussian_gain(s.global_weight, hold.patch_score, hold_dist)
    gain = info["gain"]
    if s.gaussian_goods == "all":
        every, move = refit_gaussian_on_all_goods(gain, hold_dist, fit.pooled, hold.pooled)
        mean, whiten = every.mean.numpy(), every.whiten.numpy()
        info["goods"] = float(len(fit.pooled) + len(hold.pooled))
        if hold_move is not None:
            hold_move.append(move)
    set_gaussian(int8_path, mean, whiten, gain)
    return info


def teach(
    data_dir: Path,
    out_dir: Path,
    *,
    name: str = "model",
    version: str = "0.1.0",
    settings: TeachSettings | None = None,
    progress: bool = True,
) -> Path:
    """Teach from the good images in ``data_dir`` and write a model package to ``out_dir``.

    ``data_dir`` is an MVTec-layout folder (``train/good`` is used) or a flat folder of good
    images. ``out_dir`` must be absent or empty. Returns ``out_dir``.

    Raises :class:`models.images.ImageSetError` for unusable input (missing/empty folder, too
    few usable images) and :class:`TeachError` for failures after loading.
    """
    s = settings or TeachSettings()
    t_start = time.monotonic()
    semver_key(version)  # a bad version fails now, not after minutes of teaching
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TeachError(f"{out_dir} is not empty")
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)

    images = load_good_images(Path(data_dir), min_images=s.min_images)
    report = images.report
    msg = f"teach: {report.summary()}; colour mode {images.color}"
    log.info(msg)
    if progress:
        tqdm.write(msg)
    fit_idx, hold_idx = _split(len(images.images), s)
    spec = _input_spec(s, images.color)
    x_hold = preprocess_batch([images.images[i] for i in hold_idx], spec)
    asked = s
    views, flip_choice = choose_flip_views(
        images, fit_idx.tolist(), x_hold, s, spec, progress=progress
    )
    if s.flip_views == "auto":
        msg = f"teach: flip views auto -> {views} (mirrored goods flagged: "
        msg += f"{flip_choice.get('mirrored_goods_flagged', flip_choice.get('reason'))})"
        if progress:
            tqdm.write(msg)
    s = replace(s, flip_views=views)

    graph, pooled_fit = fit_graph(images, fit_idx.tolist(), s, spec, progress)
    raw, global_fit, fp32_move = holdout_scores(graph, x_hold, s, progress, pooled_fit)
    thr_rule = ThresholdRule(s.target_false_reject_rate, margin=s.threshold_margin)
    thr = choose_threshold(raw, thr_rule)
    graph.set_raw_scale(thr.raw_scale)
    # Per graph, how much each held-out good's raw score moved when the Gaussian was refitted
    # on every good: the final graphs score the held-out goods in sample, so thresholds and
    # held-out metrics subtract it to stay out of sample.
    moves: dict[str, npt.NDArray[np.float64]] = {}
    if fp32_move is not None:
        moves["fp32"] = fp32_move
    torch_hold = (raw + moves.get("fp32", 0.0)) / thr.raw_scale
    if graph.has_brightness:  # the check acts on normalised scores (a maximum)
        with torch.no_grad():
            bdist = graph.brightness_distance(torch.from_numpy(x_hold)).numpy()
        torch_hold = np.maximum(torch_hold, float(graph.b_gain) * bdist)

    out_dir.mkdir(parents=True, exist_ok=True)
    graphs = {"fp32": "model_fp32.onnx"}
    int8_global_fit: dict[str, float] = {}
    steps = ["export fp32"] + (["int8"] if s.int8 else []) + (["fp16"] if s.fp16 else [])
    bar = tqdm(total=len(steps), desc="export", disable=not progress)
    export_fp32(graph, out_dir / graphs["fp32"])
    bar.update()
    if s.int8:
        rng = np.random.default_rng(s.seed + 1)
        n_cal = min(s.calibration_images, len(fit_idx))
        cal_idx = np.sort(rng.choice(fit_idx, n_cal, replace=False))
        x_cal = preprocess_batch([images.images[i] for i in cal_idx], spec)
        graphs["int8"] = "model_int8.onnx"
        int8_path = out_dir / graphs["int8"]
        int8_settings = Int8Settings(activations=s.int8_activations)
        quantize_int8(out_dir / graphs["fp32"], int8_path, x_cal, int8_settings)
        # Refit the INT8 graph's bank and Gaussian on the features the quantized backbone
        # produces: quantization noise then affects the fitted constants and queries alike.
        x_fit = preprocess_batch([images.images[i] for i in fit_idx], spec)
        int8_moves: list[npt.NDArray[np.float64]] = []
        int8_global_fit = fit_int8(int8_path, x_fit, x_hold, s, int8_settings, hold_move=int8_moves)
        if int8_moves:
            moves["int8"] = int8_moves[0]
        del x_fit
        bar.update()
    if s.fp16:
        graphs["fp16"] = "model_fp16.onnx"
        export_fp16(out_dir / graphs["fp32"], out_dir / graphs["fp16"])
        if "fp32" in moves:  # the FP32 graph's Gaussian in half precision: its moves
            moves["fp16"] = moves["fp32"]
        bar.update()
    bar.close()

    hold_scores = {k: _ort_scores(out_dir / rel, x_hold) for k, rel in graphs.items()}
    # Each reduced-precision graph gets its own normalisation from the same rule on the same
    # held-out goods, so that 1.0 is its threshold too (INT8 noise raises all distances).
    graph_raw_scale = {"fp32": thr.raw_scale}
    for g in [g for g in graphs if g != "fp32"]:
        g_thr = choose_threshold(hold_scores[g] * thr.raw_scale - moves.get(g, 0.0), thr_rule)
        graph_raw_scale[g] = g_thr.raw_scale
        set_graph_scale(out_dir / graphs[g], 1.0 / g_thr.raw_scale)
        hold_scores[g] = _ort_scores(out_dir / graphs[g], x_hold)
    # the held-out goods' out-of-sample scores (see ``moves``), for the manifest's metrics
    hold_oos = {g: v - moves.get(g, 0.0) / graph_raw_scale[g] for g, v in hold_scores.items()}
    parity = float(np.max(np.abs(hold_scores["fp32"] - torch_hold)))
    if not parity <= FP32_PARITY_TOL:
        raise TeachError(
            f"ONNX FP32 graph disagrees with PyTorch by {parity:.2e} (> {FP32_PARITY_TOL})"
        )

    # Reference images: held-out goods spread over the score range (lowest .. highest).
    order = np.argsort(hold_scores["fp32"])
    picks = np.unique(np.linspace(0, len(order) - 1, min(s.n_reference, len(order))).round())
    ref_files: dict[str, bytes] = {}
    references: list[ReferenceImage] = []
    for j, pos in enumerate(picks.astype(int)):
        k = int(order[pos])
        rel = f"reference/ref_{j:03d}.png"
        ref_files[rel] = _encode_png(images.images[int(hold_idx[k])])
        references.append(
            ReferenceImage(
                file=rel,
                label="good",
                scores={g: round(float(v[k]), 6) for g, v in hold_scores.items()},
            )
        )

    metrics: dict[str, Any] = {
        "holdout_good": {
            g: {
                "n": len(v),
                # float32 round-off of the threshold's own good (1.0000001) is not a reject
                "false_reject_rate": float(np.mean(v > thr.image + 1e-5)),
                "score_median": float(np.median(v)),
                "score_max": float(v.max()),
            }
            for g, v in hold_oos.items()
        },
        "parity": {
            "fp32_vs_torch_max_abs": parity,
            **{
                f"{g}_vs_fp32_max_abs": float(np.max(np.abs(v - hold_scores["fp32"])))
                for g, v in hold_scores.items()
                if g != "fp32"
            },
        },
        "raw_scale_per_graph": graph_raw_scale,
        "teach_seconds": round(time.monotonic() - t_start, 1),
    }
    default_graph = "fp32"
    if "int8" in graphs:
        agree = metrics["parity"]["int8_vs_fp32_max_abs"]
        if s.default_graph == "int8" or (s.default_graph == "auto" and agree <= INT8_DEFAULT_TOL):
            default_graph = "int8"
        metrics["int8_quantization"] = int8_settings.describe()
        if int8_global_fit:
            metrics["int8_global_fit"] = int8_global_fit
        metrics["default_graph_rule"] = (
            f"{s.default_graph}: int8 if its held-out good scores are within {INT8_DEFAULT_TOL} "
            f"of fp32 (measured {agree:.3f}) -> {default_graph}"
        )
    cfg = s.config(spec.channels)
    method: dict[str, Any] = {
        "kind": "patchcore",
        "backbone": s.backbone,
        "stages": list(cfg.stages),
        "neighbourhood": cfg.neighbourhood,
        "grid": list(cfg.grid_hw),
        "grid_stride": cfg.grid_stride,
        "bank_size": int(graph.bank_t.shape[1]),
        "feature_dim": int(graph.bank_t.shape[0]),
        "patch_dim": int(graph.features.dim),
        "projection_dim": cfg.projection_dim,
        "blur_sigma_cells": cfg.blur_sigma_cells,
        "image_score": (
            f"mean of top {cfg.top_k} cells of the smoothed patch map"
            if cfg.top_k > 1
            else "max of the smoothed patch map"
        )
        + (
            f" + gain x Mahalanobis distance of stages {list(cfg.global_stages)} pooled"
            f" ({cfg.global_pool.replace('_', '+')})"
            if cfg.global_stages
            else ""
        )
        + (
            f"; at least the Mahalanobis distance of the image's mean and std over"
            f" {cfg.brightness_margin} x the highest held-out good's (brightness check)"
            if cfg.brightness_margin > 0
            else ""
        )
        + (
            f"; maps and pooled features averaged over the image and its {cfg.flip_views}"
            " flip view(s), bank from every view"
            if cfg.n_views > 1
            else ""
        ),
        "global_stages": list(cfg.global_stages),
        "global_weight": cfg.global_weight,
        "global_pool": cfg.global_pool,
        "standardize_input": cfg.standardize_input,
        "brightness_margin": cfg.brightness_margin,
        "flip_views": cfg.flip_views,
        "flip_choice": flip_choice,
        "gaussian_goods": s.gaussian_goods if cfg.global_stages else None,
        "global_fit": global_fit,
        "settings": {k: v for k, v in asdict(asked).items() if k != "extra"} | asked.extra,
        "images": {
            "found": report.found,
            "used": report.used,
            "fit": len(fit_idx),
            "holdout": len(hold_idx),
            "converted": report.converted,
            "skipped": {k: len(v) for k, v in report.skipped.items()},
        },
    }
    write_package(
        out_dir,
        name=name,
        version=version,
        input_spec=spec,
        graphs=graphs,
        default_graph=default_graph,
        threshold=ThresholdSpec(**thr.to_manifest()),
        method=method,
        metrics=metrics,
        reference=references,
        reference_tolerance={g: REFERENCE_TOLERANCE[g] for g in graphs},
        files=ref_files,
    )
    if progress:
        tqdm.write(f"teach: wrote {out_dir} in {metrics['teach_seconds']:.0f} s")
    return out_dir
