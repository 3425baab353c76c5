"""PatchCore-style memory-bank anomaly detector on EfficientNet-Lite features.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022), adapted to
a small edge backbone and to a single exportable graph:

1. features of two mid-level stages of an ImageNet-pretrained EfficientNet-Lite;
2. local neighbourhood aggregation: a ``k x k`` average pool (stride 1) on each stage, the
   maps resampled to one patch grid and concatenated per patch;
3. a memory bank of good-patch features, subsampled by greedy k-centre coreset selection;
   optionally (``projection_dim``) the patch features are first projected to fewer dimensions
   by a constant matrix (PCA of the fitting patches, :func:`pca_projection`), and the bank is
   stored projected: the bank product, the graph's largest single cost, shrinks with it;
4. per patch, the Euclidean distance to its nearest bank entry;
5. the patch-distance map is smoothed with a Gaussian (as two constant matrix products, so
   it stays in float when the graph is quantized) and the image score is the mean of its
   ``top_k`` highest cells; the anomaly map is the smoothed map resized to the input;
6. optionally (``global_stages``), an image-level branch: the tapped stage maps are averaged
   over the whole image (``global_pool="mean_std"``: their per-channel standard deviation
   too; ``mean_std_skew``: and skewness), and the Mahalanobis distance of that vector to a
   Gaussian fitted on the good images (Ledoit-Wolf shrinkage covariance; Rippel et al.,
   "Modeling the Distribution of Normal Data in Pre-Trained Deep Features for Anomaly
   Detection", ICPR 2020) is added to the patch score, scaled so that both terms have the
   same held-out-good median (see :class:`GlobalGaussian`). It catches global defects
   (uneven texture, fray) that no single patch shows.

Optionally (``flip_views``) each image is also seen mirrored (test-time augmentation inside
the graph): the image and its horizontal (``h``), vertical (``v``) or both single flips
(``hv``: three views) go through the trunk as one batch; each view's patch-distance map is
flipped back and the maps are averaged, and the pooled features of the global branch are
averaged over the views. The memory bank is built from the patches of every view, so a good
part's mirrored patches are known goods. Meant for parts whose mirror image is as good as the
part itself (textures, symmetric parts); it makes the model blind to a mirrored part.

Optionally (``standardize_input``) each image is standardised (zero mean, unit variance,
then the fixed mean 128 / std 40 in pixel units) inside the graph before the trunk.

Optionally (``brightness_margin`` > 0) a brightness check: the Mahalanobis distance of the
input image's own mean and standard deviation (over all pixels and channels, in the input
normalisation, before any standardisation) to a 2-d Gaussian fitted on the good images,
divided by ``margin x`` the highest held-out good distance, and the normalised score is the
maximum of the two (so 1.0 stays the threshold of both). With ``standardize_input`` it gives
back what the standardisation removes: a part that is only too dark, too bright or too flat
is still flagged. A maximum, not a sum: added, the term's noise on ordinary parts cost AUROC.

Both outputs are divided by ``raw_scale`` (see :mod:`models.threshold`) inside the graph.

Train-only module: it imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from models.backbone import LiteTrunk

#: Pooling choices of the image-level branch (``PatchCoreConfig.global_pool``).
GLOBAL_POOLS = ("mean", "mean_std", "mean_std_skew")
#: Added to a channel's standard deviation before it divides the third moment (skewness).
SKEW_EPS = 1e-3
#: Per-image standardisation target in pixel units (``PatchCoreConfig.standardize_input``).
STANDARD_MEAN, STANDARD_STD = 128.0, 40.0
#: Choices of ``PatchCoreConfig.flip_views`` and the flips (tensor dims of [N, C, H, W]) of
#: each view after the image itself.
FLIP_VIEWS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": (),
    "h": ((3,),),
    "v": ((2,),),
    "hv": ((3,), (2,)),
}
#: Variance floor of the per-image standardisation (normalised units; a flat image maps to
#: the target mean instead of dividing by zero).
STANDARD_EPS = 1e-6


def image_stats(image: torch.Tensor) -> torch.Tensor:
    """Per-image mean and standard deviation over all pixels and channels: [N, 2].

    In the trunk's input normalisation (``pixel / 127.5 - 1``); the brightness check's input.
    """
    mean = image.mean(dim=(1, 2, 3), keepdim=True)
    centred = image - mean
    std = torch.sqrt((centred * centred).mean(dim=(1, 2, 3)))
    return torch.stack([mean.flatten(), std], dim=1)


def standardize(image: torch.Tensor) -> torch.Tensor:
    """Per-image standardisation of a normalised batch [N, C, H, W].

    The input is in the trunk's normalisation (``pixel / 127.5 - 1``); each image is shifted
    and scaled to zero mean and unit variance over all its pixels and channels, then mapped
    to what a pixel mean of 128 and standard deviation of 40 would give.
    """
    mean = image.mean(dim=(1, 2, 3), keepdim=True)
    centred = image - mean
    var = (centred * centred).mean(dim=(1, 2, 3), keepdim=True)
    std = torch.sqrt(var + STANDARD_EPS)
    return centred / std * (STANDARD_STD / 127.5) + (STANDARD_MEAN / 127.5 - 1.0)


@dataclass(frozen=True)
class PatchCoreConfig:
    """Everything that defines the scoring graph except the fitted bank and scale."""

    backbone: str = "efficientnet-lite0"
    input_hw: tuple[int, int] = (256, 256)
    in_channels: int = 3
    stages: tuple[int, ...] = (4, 5)
    neighbourhood: int = 3
    grid_stride: int = 16
    blur_sigma_cells: float = 1.0
    top_k: int = 1
    #: Stages pooled over the whole image for the Gaussian branch; () = no such branch.
    global_stages: tuple[int, ...] = ()
    #: Weight of the Gaussian term relative to the patch term (after median matching).
    global_weight: float = 1.0
    #: Patch features are projected to this many dimensions (a constant matrix, PCA of the
    #: fitting patches) before the nearest-neighbour search; the bank is stored projected.
    #: 0 = no projection.
    projection_dim: int = 0
    #: How the global stages are pooled over the image: ``mean`` (per channel),
    #: ``mean_std`` (per-channel mean and standard deviation, twice the dimensions) or
    #: ``mean_std_skew`` (and the skewness ``mean(c^3) / (std + 1e-3)^3``, three times).
    global_pool: str = "mean"
    #: Standardise each input image inside the graph (per image: zero mean, unit variance
    #: over all pixels and channels, then mapped to mean 128 / std 40 in pixel units) before
    #: the trunk. The graph then no longer sees an image's overall brightness or contrast.
    standardize_input: bool = False
    #: Brightness check: the score is at least the Mahalanobis distance of the image's mean
    #: and standard deviation to the good images' over ``margin x`` the highest held-out good
    #: distance; 0 = no such check (packages without the key).
    brightness_margin: float = 0.0
    #: Mirrored views of each image scored with it (see the module docstring): ``none``,
    #: ``h`` (horizontal flip), ``v`` (vertical) or ``hv`` (both, three views in all).
    flip_views: str = "none"

    def __post_init__(self) -> None:
        if self.flip_views not in FLIP_VIEWS:
            raise ValueError(
                f"flip_views must be one of {', '.join(FLIP_VIEWS)}, not {self.flip_views!r}"
            )
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(
                f"global_pool must be one of {', '.join(GLOBAL_POOLS)}, not {self.global_pool!r}"
            )
        if not self.brightness_margin >= 0:
            raise ValueError(f"brightness_margin must be >= 0, not {self.brightness_margin}")

    @property
    def n_views(self) -> int:
        """How many views of each image the graph scores (1 without flip views)."""
        return 1 + len(FLIP_VIEWS[self.flip_views])

    @property
    def grid_hw(self) -> tuple[int, int]:
        """Patch grid (rows, cols)."""
        return (
            math.ceil(self.input_hw[0] / self.grid_stride),
            math.ceil(self.input_hw[1] / self.grid_stride),
        )


def _gauss_matrix(n: int, sigma: float) -> torch.Tensor:
    """Row-normalised Gaussian smoothing matrix (n x n); identity when sigma <= 0."""
    if sigma <= 0:
        return torch.eye(n)
    idx = torch.arange(n, dtype=torch.float64)
    w = torch.exp(-((idx[:, None] - idx[None, :]) ** 2) / (2.0 * sigma**2))
    return (w / w.sum(1, keepdim=True)).float()


class PatchFeatures(nn.Module):
    """Backbone trunk plus neighbourhood aggregation: image -> [N, D, gh, gw] patch features."""

    def __init__(self, cfg: PatchCoreConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.taps = tuple(sorted(set(cfg.stages) | set(cfg.global_stages)))
        self.trunk = LiteTrunk(cfg.backbone, cfg.input_hw, self.taps)
        if cfg.in_channels == 1:
            # Gray input replicated to RGB equals a stem convolution with summed input weights.
            conv = self.trunk.stem[0]
            assert isinstance(conv, nn.Conv2d)
            with torch.no_grad():
                conv.weight = nn.Parameter(conv.weight.sum(dim=1, keepdim=True))
            conv.in_channels = 1
        elif cfg.in_channels != 3:
            raise ValueError(f"in_channels must be 1 or 3, got {cfg.in_channels}")
        chans = dict(zip(self.taps, self.trunk.channels, strict=True))
        self.dim = sum(chans[s] for s in sorted(set(cfg.stages)))
        per_stage = {"mean": 1, "mean_std": 2, "mean_std_skew": 3}[cfg.global_pool]
        self.global_dim = per_stage * sum(chans[s] for s in sorted(set(cfg.global_stages)))

    @overload
    def forward(self, image: torch.Tensor) -> torch.Tensor: ...

    @overload
    def forward(
        self, image: torch.Tensor, with_pooled: Literal[True]
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def forward(
        self, image: torch.Tensor, with_pooled: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Aggregated patch features on the patch grid [V * N, D, gh, gw].

        V = ``cfg.n_views``: with flip views, the rows are view-major (the N images, then
        their first flipped view, ...), each view's map as the trunk saw it (not flipped
        back). With ``with_pooled``, also the image-pooled features [N, Dg] of the global
        stages, averaged over the views (None without them). Call the module (not a method)
        so that exported node names keep the ``/features/trunk/`` scope the INT8 quantizer
        selects by.
        """
        feat, pooled = self._compute(image)
        return (feat, pooled) if with_pooled else feat

    def forward_all(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch features and pooled features (see :meth:`forward`)."""
        out: tuple[torch.Tensor, torch.Tensor | None] = self(image, True)
        return out

    def _compute(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        k = self.cfg.neighbourhood
        grid = self.cfg.grid_hw
        if self.cfg.standardize_input:
            image = standardize(image)
        views = FLIP_VIEWS[self.cfg.flip_views]
        if views:
            image = torch.cat([image] + [image.flip(dims) for dims in views], dim=0)
        taps = dict(zip(self.taps, self.trunk(image), strict=True))
        pooled = None
        if self.cfg.global_stages:
            parts: list[torch.Tensor] = []
            for s in sorted(set(self.cfg.global_stages)):
                m = taps[s].mean(dim=(2, 3), keepdim=True)
                parts.append(m.flatten(1))
                if self.cfg.global_pool != "mean":
                    c = taps[s] - m
                    sd = torch.sqrt((c * c).mean(dim=(2, 3)))
                    parts.append(sd)
                    if self.cfg.global_pool == "mean_std_skew":
                        parts.append((c * c * c).mean(dim=(2, 3)) / (sd + SKEW_EPS) ** 3)
            pooled = torch.cat(parts, dim=1)
            if views:  # [V * N, Dg] -> the mean over views [N, Dg]
                pooled = pooled.reshape(len(views) + 1, -1, pooled.shape[1]).mean(dim=0)
        maps = []
        for s in sorted(set(self.cfg.stages)):
            f = taps[s]
            if k > 1:
                f = F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
            if tuple(f.shape[-2:]) != grid:
                ratio = int(f.shape[-2]) // grid[0]
                if ratio > 1 and tuple(f.shape[-2:]) == (grid[0] * ratio, grid[1] * ratio):
                    f = F.avg_pool2d(f, ratio)
                else:
                    f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            maps.append(f)
        return torch.cat(maps, dim=1), pooled


@dataclass(frozen=True)
class GlobalGaussian:
    """The fitted image-level Gaussian: Mahalanobis distance ``|(x - mean) @ whiten|``.

    ``whiten`` is the Cholesky factor L of the precision matrix (``P = L L^T``), so the
    distance is one matrix product and a norm in the graph. ``gain`` converts the distance
    to patch-distance units (held-out-good median of the patch score over that of the
    distance) and includes the branch weight.
    """

    mean: torch.Tensor
    whiten: torch.Tensor
    gain: float

    @staticmethod
    def fit(pooled: torch.Tensor) -> GlobalGaussian:
        """Fit mean and Ledoit-Wolf shrinkage covariance on pooled good features [N, D]."""
        from sklearn.covariance import LedoitWolf

        x = pooled.double().numpy()
        lw = LedoitWolf().fit(x)
        prec = np.linalg.inv(lw.covariance_)
        prec = (prec + prec.T) / 2.0
        chol = np.linalg.cholesky(prec)
        return GlobalGaussian(
            mean=torch.from_numpy(lw.location_).float(),
            whiten=torch.from_numpy(chol).float(),
            gain=1.0,
        )

    def distance(self, pooled: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance [N] of pooled features [N, D] (unscaled by ``gain``)."""
        z = torch.matmul(pooled - self.mean, self.whiten)
        return torch.sqrt((z * z).sum(dim=1))


class PatchCoreGraph(nn.Module):
    """The whole scoring graph: image -> (normalised score [N], anomaly map [N, H, W])."""

    bank_t: torch.Tensor
    bank_bias: torch.Tensor
    proj: torch.Tensor
    blur_rows: torch.Tensor
    blur_cols_t: torch.Tensor
    inv_scale: torch.Tensor
    g_mean: torch.Tensor
    g_whiten: torch.Tensor
    g_gain: torch.Tensor
    map_gain: torch.Tensor
    b_mean: torch.Tensor
    b_whiten: torch.Tensor
    b_gain: torch.Tensor

    def __init__(
        self,
        features: PatchFeatures,
        bank: torch.Tensor,
        raw_scale: float = 1.0,
        gaussian: GlobalGaussian | None = None,
        projection: torch.Tensor | None = None,
        *,
        brightness: GlobalGaussian | None = None,
    ) -> None:
        """``bank`` [M, d]: bank entries in the (projected) feature space; ``projection``
        [D, d] with ``cfg.projection_dim`` = d (a random orthonormal placeholder if None, e.g.
        for a graph rebuilt for timing). ``brightness``: the fitted 2-d Gaussian of the images'
        mean and standard deviation (with ``cfg.brightness_margin`` > 0); its ``gain`` is the
        factor that maps the distance to normalised score units (1 / (margin x highest
        held-out good distance))."""
        super().__init__()
        cfg = features.cfg
        if gaussian is not None and not cfg.global_stages:
            raise ValueError("a Gaussian was given but cfg.global_stages is empty")
        if brightness is not None and not cfg.brightness_margin > 0:
            raise ValueError("a brightness Gaussian was given but cfg.brightness_margin is 0")
        self.cfg = cfg
        self.features = features
        self.has_projection = cfg.projection_dim > 0
        if projection is not None and not self.has_projection:
            raise ValueError("a projection was given but cfg.projection_dim is 0")
        if self.has_projection:
            if projection is None:
                projection = random_projection(features.dim, cfg.projection_dim)
            if tuple(projection.shape) != (features.dim, cfg.projection_dim):
                raise ValueError(
                    f"projection of shape {tuple(projection.shape)}, expected "
                    f"({features.dim}, {cfg.projection_dim})"
                )
            self.register_buffer("proj", projection.float().contiguous())
        want = cfg.projection_dim or features.dim
        if bank.ndim != 2 or bank.shape[1] != want:
            raise ValueError(f"bank of shape {tuple(bank.shape)}, expected [M, {want}]")
        self.register_buffer("bank_t", bank.t().contiguous().float())
        # -|b|^2 / 2 per entry: the nearest entry maximises q.b - |b|^2 / 2 (see branches)
        self.register_buffer("bank_bias", -0.5 * (bank.float() ** 2).sum(1))
        gh, gw = cfg.grid_hw
        self.register_buffer("blur_rows", _gauss_matrix(gh, cfg.blur_sigma_cells))
        self.register_buffer(
            "blur_cols_t", _gauss_matrix(gw, cfg.blur_sigma_cells).t().contiguous()
        )
        self.register_buffer("inv_scale", torch.tensor(1.0 / raw_scale, dtype=torch.float32))
        self.has_global = bool(cfg.global_stages)
        if self.has_global:
            # Without a fitted Gaussian (e.g. a graph rebuilt from a manifest for timing), a
            # placeholder with gain 0: same compute, global term 0 until set_gaussian().
            dim = features.global_dim
            self.set_gaussian(gaussian or GlobalGaussian(torch.zeros(dim), torch.eye(dim), 0.0))
        self.has_brightness = cfg.brightness_margin > 0
        if self.has_brightness:
            # placeholder (gain 0) until set_brightness(), like the Gaussian branch's
            self.set_brightness(brightness or GlobalGaussian(torch.zeros(2), torch.eye(2), 0.0))

    def set_gaussian(self, gaussian: GlobalGaussian) -> None:
        """Install (or replace) the fitted image-level Gaussian and its gain."""
        if not self.has_global:
            raise ValueError("this graph has no global branch (cfg.global_stages is empty)")
        self.register_buffer("g_mean", gaussian.mean.float().clone())
        self.register_buffer("g_whiten", gaussian.whiten.float().clone())
        self.register_buffer("g_gain", torch.tensor(gaussian.gain, dtype=torch.float32))
        # The map shows the patch term only; scaled by (1 + weight) so that a patch at the
        # patch term's own threshold reads about 1.0 like the image score does.
        self.register_buffer(
            "map_gain", torch.tensor(1.0 + self.cfg.global_weight, dtype=torch.float32)
        )

    def set_brightness(self, brightness: GlobalGaussian) -> None:
        """Install (or replace) the fitted brightness Gaussian and its gain."""
        if not self.has_brightness:
            raise ValueError("this graph has no brightness check (cfg.brightness_margin is 0)")
        if tuple(brightness.mean.shape) != (2,) or tuple(brightness.whiten.shape) != (2, 2):
            raise ValueError("the brightness Gaussian must be 2-d (image mean and std)")
        self.register_buffer("b_mean", brightness.mean.float().clone())
        self.register_buffer("b_whiten", brightness.whiten.float().clone())
        self.register_buffer("b_gain", torch.tensor(brightness.gain, dtype=torch.float32))

    def brightness_distance(self, image: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance [N] of the images' mean and std, unscaled by the gain."""
        if not self.has_brightness:
            raise ValueError("this graph has no brightness check")
        z = torch.matmul(image_stats(image) - self.b_mean, self.b_whiten)
        return torch.sqrt((z * z).sum(dim=1))

    def set_raw_scale(self, raw_scale: float) -> None:
        """Set the normalisation so that score == 1.0 at the chosen raw threshold."""
        self.inv_scale.fill_(1.0 / raw_scale)

    def patch_distances(self, image: torch.Tensor) -> torch.Tensor:
        """Smoothed nearest-neighbour distance per patch, unnormalised: [N, gh, gw]."""
        return self.branches(image)[0]

    def global_distance(self, image: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of the pooled features, unscaled: [N] (global branch only)."""
        g = self.branches(image)[1]
        if g is None:
            raise ValueError("this graph has no global branch")
        return g

    def branches(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Smoothed patch-distance map [N, gh, gw] and global distance [N] (or None)."""
        pmap, gdist, _ = self.branches_and_pooled(image)
        return pmap, gdist

    def branches_and_pooled(
        self, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """:meth:`branches` and the pooled features [N, Dg] the distance is of (or None)."""
        feat, pooled = self.features(image, True)
        gdist = None
        if self.has_global and pooled is not None:
            z = torch.matmul(pooled - self.g_mean, self.g_whiten)
            gdist = torch.sqrt((z * z).sum(dim=1))
        n, _, gh, gw = feat.shape
        q = feat.flatten(2).transpose(1, 2)  # [N, P, D]
        if self.has_projection:
            q = torch.matmul(q, self.proj)  # [N, P, d]
        # |q - b|^2 = |q|^2 - 2 (q.b - |b|^2 / 2): only one element-wise op (the bias add) runs
        # over the [N, P, M] product, and |q|^2 is added after the reduction (per patch)
        best = (torch.matmul(q, self.bank_t) + self.bank_bias).max(dim=-1).values  # [N, P]
        d2 = (q * q).sum(-1) - 2.0 * best
        dist = torch.sqrt(torch.clamp(d2, min=0.0)).reshape(n, gh, gw)
        views = FLIP_VIEWS[self.cfg.flip_views]
        if views:  # [V * N, gh, gw]: flip each view's map back, average over the views
            per_view = dist.reshape(len(views) + 1, -1, gh, gw)
            dist = per_view[0]
            for i, dims in enumerate(views, start=1):
                dist = dist + per_view[i].flip([d - 1 for d in dims])
            dist = dist / float(len(views) + 1)
        pmap = torch.matmul(torch.matmul(self.blur_rows, dist), self.blur_cols_t)
        return pmap, gdist, pooled

    def patch_score(self, grid_map: torch.Tensor) -> torch.Tensor:
        """Image score of the patch term: max or mean of the ``top_k`` highest cells."""
        flat = grid_map.flatten(1)
        k = self.cfg.top_k
        return flat.max(dim=1).values if k <= 1 else flat.topk(k, dim=1).values.mean(dim=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image score and anomaly map at input resolution."""
        pmap, gdist = self.branches(image)
        score = self.patch_score(pmap)
        grid_map = pmap * self.inv_scale
        if gdist is not None:
            score = score + self.g_gain * gdist
            grid_map = grid_map * self.map_gain
        score = score * self.inv_scale
        if self.has_brightness:
            # in normalised units, after the Gaussian's Add (which the INT8 refit finds by its
            # patch-score input) and the scale (which each graph re-chooses for itself)
            score = torch.maximum(score, self.b_gain * self.brightness_distance(image))
        amap = F.interpolate(
            grid_map.unsqueeze(1), size=self.cfg.input_hw, mode="bilinear", align_corners=False
        ).squeeze(1)
        return score, amap


def random_projection(dim: int, out_dim: int, seed: int = 0) -> torch.Tensor:
    """A random orthonormal [dim, out_dim] matrix (columns orthonormal)."""
    gen = torch.Generator().manual_seed(seed)
    q: torch.Tensor = torch.linalg.qr(
        torch.randn(dim, out_dim, generator=gen, dtype=torch.float64)
    )[0]
    return q.float()


def pca_projection(
    patches: torch.Tensor, out_dim: int, *, seed: int = 0, limit: int = 100_000
) -> torch.Tensor:
    """The ``out_dim`` leading principal axes [D, out_dim] of ``patches`` [P, D].

    An orthonormal projection: distances in the projected space are the distances of the
    features' components along the axes of largest variance of the good patches, so the
    nearest neighbour loses least there. No centring is stored: distances do not depend on
    it. At most ``limit`` random patches are used (bounds CPU time).
    """
    if not 0 < out_dim <= patches.shape[1]:
        raise ValueError(f"projection to {out_dim} of {patches.shape[1]} dimensions")
    gen = torch.Generator().manual_seed(seed)
    x = patches
    if x.shape[0] > limit:
        x = x[torch.randperm(x.shape[0], generator=gen)[:limit]]
    x = x.double()
    x = x - x.mean(0)
    cov = x.T @ x / max(1, x.shape[0] - 1)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    axes = vecs[:, -out_dim:].flip(1)
    # a deterministic sign per axis (eigh's is arbitrary): largest component positive
    signs = torch.sign(axes[axes.abs().argmax(0), torch.arange(out_dim)])
    out: torch.Tensor = (axes * signs).float().contiguous()
    return out


def batches(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of ``x`` along axis 0."""
    for i in range(0, len(x), size):
        yield x[i : i + size]


def greedy_coreset(
    patches: torch.Tensor,
    size: int,
    *,
    seed: int = 0,
    proj_dim: int = 128,
    candidate_limit: int = 200_000,
) -> torch.Tensor:
    """Greedy k-centre coreset (PatchCore's approximate form) of ``patches`` [P, D].

    Candidates beyond ``candidate_limit`` are randomly subsampled first (bounds CPU time), and
    distances are computed in a Johnson-Lindenstrauss random projection to ``proj_dim``.
    Returns the selected rows of ``patches`` (full dimension).
    """
    gen = torch.Generator().manual_seed(seed)
    if patches.shape[0] > candidate_limit:
        patches = patches[torch.randperm(patches.shape[0], generator=gen)[:candidate_limit]]
    if size >= patches.shape[0]:
        return patches.clone()
    x = patches
    if patches.shape[1] > proj_dim:
        x = patches @ (torch.randn(patches.shape[1], proj_dim, generator=gen) / proj_dim**0.5)
    first = int(torch.randint(x.shape[0], (1,), generator=gen))
    chosen = [first]
    min_d = ((x - x[first]) ** 2).sum(1)
    for _ in range(size - 1):
        i = int(torch.argmax(min_d))
        chosen.append(i)
        min_d = torch.minimum(min_d, ((x - x[i]) ** 2).sum(1))
    return patches[torch.tensor(chosen)]
