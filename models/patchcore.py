"""PatchCore-style memory-bank anomaly detector on EfficientNet-Lite features.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022), adapted to
a small edge backbone and to a single exportable graph:

1. features of two mid-level stages of an ImageNet-pretrained EfficientNet-Lite;
2. local neighbourhood aggregation: a ``k x k`` average pool (stride 1) on each stage, the
   maps resampled to one patch grid and concatenated per patch;
3. a memory bank of good-patch features, subsampled by greedy k-centre coreset selection;
4. per patch, the Euclidean distance to its nearest bank entry;
5. the patch-distance map is smoothed with a Gaussian (as two constant matrix products, so
   it stays in float when the graph is quantized) and the image score is the mean of its
   ``top_k`` highest cells; the anomaly map is the smoothed map resized to the input.

Both outputs are divided by ``raw_scale`` (see :mod:`models.threshold`) inside the graph.

Train-only module: it imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from models.backbone import LiteTrunk


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
        self.trunk = LiteTrunk(cfg.backbone, cfg.input_hw, cfg.stages)
        if cfg.in_channels == 1:
            # Gray input replicated to RGB equals a stem convolution with summed input weights.
            conv = self.trunk.stem[0]
            assert isinstance(conv, nn.Conv2d)
            with torch.no_grad():
                conv.weight = nn.Parameter(conv.weight.sum(dim=1, keepdim=True))
            conv.in_channels = 1
        elif cfg.in_channels != 3:
            raise ValueError(f"in_channels must be 1 or 3, got {cfg.in_channels}")
        self.dim = sum(self.trunk.channels)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Aggregated patch features on the patch grid."""
        k = self.cfg.neighbourhood
        grid = self.cfg.grid_hw
        maps = []
        for tap in self.trunk(image):
            f = tap
            if k > 1:
                f = F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
            if tuple(f.shape[-2:]) != grid:
                ratio = int(f.shape[-2]) // grid[0]
                if ratio > 1 and tuple(f.shape[-2:]) == (grid[0] * ratio, grid[1] * ratio):
                    f = F.avg_pool2d(f, ratio)
                else:
                    f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            maps.append(f)
        return torch.cat(maps, dim=1)


class PatchCoreGraph(nn.Module):
    """The whole scoring graph: image -> (normalised score [N], anomaly map [N, H, W])."""

    bank_t: torch.Tensor
    bank_sq: torch.Tensor
    blur_rows: torch.Tensor
    blur_cols_t: torch.Tensor
    inv_scale: torch.Tensor

    def __init__(self, features: PatchFeatures, bank: torch.Tensor, raw_scale: float = 1.0) -> None:
        super().__init__()
        cfg = features.cfg
        self.cfg = cfg
        self.features = features
        self.register_buffer("bank_t", bank.t().contiguous().float())
        self.register_buffer("bank_sq", (bank.float() ** 2).sum(1))
        gh, gw = cfg.grid_hw
        self.register_buffer("blur_rows", _gauss_matrix(gh, cfg.blur_sigma_cells))
        self.register_buffer(
            "blur_cols_t", _gauss_matrix(gw, cfg.blur_sigma_cells).t().contiguous()
        )
        self.register_buffer("inv_scale", torch.tensor(1.0 / raw_scale, dtype=torch.float32))

    def set_raw_scale(self, raw_scale: float) -> None:
        """Set the normalisation so that score == 1.0 at the chosen raw threshold."""
        self.inv_scale.fill_(1.0 / raw_scale)

    def patch_distances(self, image: torch.Tensor) -> torch.Tensor:
        """Smoothed nearest-neighbour distance per patch, unnormalised: [N, gh, gw]."""
        feat = self.features(image)
        n, _, gh, gw = feat.shape
        q = feat.flatten(2).transpose(1, 2)  # [N, P, D]
        sq = (q * q).sum(-1, keepdim=True)  # [N, P, 1]
        d2 = sq - 2.0 * torch.matmul(q, self.bank_t) + self.bank_sq  # [N, P, M]
        dist = torch.sqrt(torch.clamp(d2.min(dim=-1).values, min=0.0)).reshape(n, gh, gw)
        return torch.matmul(torch.matmul(self.blur_rows, dist), self.blur_cols_t)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image score and anomaly map at input resolution."""
        grid_map = self.patch_distances(image) * self.inv_scale
        flat = grid_map.flatten(1)
        k = self.cfg.top_k
        score = flat.max(dim=1).values if k <= 1 else flat.topk(k, dim=1).values.mean(dim=1)
        amap = F.interpolate(
            grid_map.unsqueeze(1), size=self.cfg.input_hw, mode="bilinear", align_corners=False
        ).squeeze(1)
        return score, amap


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
