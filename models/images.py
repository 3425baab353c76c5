"""Loading good images for teaching: discovery, decoding, colour-mode choice, bad files.

Preprocessing is not here: teach uses ``models.package.preprocess_batch``, the one
implementation of the manifest's preprocessing that evaluation and the runtime use too.
No torch here.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

#: File suffixes read as images (lower case).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm"})

#: Smallest side, in pixels, an image may have to be taught from.
MIN_SIDE_PX = 16

ColorMode = Literal["rgb", "gray"]


class ImageSetError(ValueError):
    """The image folder cannot be taught from (missing, empty, too few usable images)."""


@dataclass(frozen=True)
class LoadReport:
    """What happened to every file found: used as is, converted, or skipped (with reasons)."""

    found: int
    used: int
    converted: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        """Number of files not used."""
        return sum(len(v) for v in self.skipped.values())

    def summary(self) -> str:
        """One human-readable line (used in teach's output)."""
        parts = [f"{self.used} of {self.found} images used"]
        for reason, n in sorted(self.converted.items()):
            parts.append(f"{n} converted ({reason})")
        for reason, files in sorted(self.skipped.items()):
            shown = ", ".join(files[:3]) + (" ..." if len(files) > 3 else "")
            parts.append(f"{len(files)} skipped ({reason}: {shown})")
        return "; ".join(parts)


@dataclass(frozen=True)
class ImageSet:
    """Decoded good images as captured (gray HxW or BGR HxWx3) and the colour mode to teach in.

    ``color`` is ``gray`` when every image is gray, else ``rgb``; conversion to that mode
    happens in preprocessing (``models.package.preprocess_batch``), exactly as at run time.
    """

    paths: tuple[Path, ...]
    images: tuple[npt.NDArray[np.uint8], ...]
    color: ColorMode
    report: LoadReport


def good_image_dir(data_dir: Path) -> Path:
    """The folder holding good images: ``train/good`` of an MVTec layout, else ``data_dir``."""
    for cand in (data_dir / "train" / "good", data_dir / "good"):
        if cand.is_dir():
            return cand
    return data_dir


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (sorted; hidden files ignored)."""
    if not folder.is_dir():
        raise ImageSetError(f"{folder} is not a folder")
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def decode(path: Path) -> npt.NDArray[np.uint8] | str:
    """The image as uint8 HxW (gray) or HxWx3 (BGR), or the reason it cannot be used.

    16-bit images are scaled to 8 bit, alpha is dropped, single-channel colour images become
    gray. The reason string is stable so callers can count files by reason.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file"
    except OSError:
        return "unreadable"
    raw = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        return "not a decodable image"
    if img.dtype == np.uint16:
        img = (img / 257.0).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        return f"unsupported pixel type {img.dtype}"
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    elif img.ndim != 2 and not (img.ndim == 3 and img.shape[2] == 3):
        return f"unsupported shape {img.shape}"
    if min(img.shape[:2]) < MIN_SIDE_PX:
        return f"smaller than {MIN_SIDE_PX} px"
    return np.ascontiguousarray(img)


def is_gray(img: npt.NDArray[np.uint8]) -> bool:
    """True for single-channel images and 3-channel images whose channels are equal."""
    if img.ndim == 2:
        return True
    return bool(
        np.array_equal(img[:, :, 0], img[:, :, 1]) and np.array_equal(img[:, :, 1], img[:, :, 2])
    )


def load_good_images(data_dir: Path, *, min_images: int = 10) -> ImageSet:
    """Decode every good image under ``data_dir``; skip and count what cannot be used.

    The colour mode is gray when every usable image is gray (single channel or equal
    channels), else RGB, with the gray ones converted (and counted). Odd sizes are fine: all
    images are resized when preprocessed. Fewer than ``min_images`` usable images is an error.
    """
    folder = good_image_dir(Path(data_dir))
    files = list_images(folder)
    if not files:
        raise ImageSetError(
            f"no image files in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    skipped: dict[str, list[str]] = {}
    decoded: list[tuple[Path, npt.NDArray[np.uint8]]] = []
    for path in files:
        res = decode(path)
        if isinstance(res, str):
            skipped.setdefault(res, []).append(path.name)
            log.warning("skipping %s: %s", path, res)
        else:
            decoded.append((path, res))
    grays = [is_gray(img) for _, img in decoded]
    color: ColorMode = "gray" if all(grays) else "rgb"
    converted: Counter[str] = Counter()
    images: list[npt.NDArray[np.uint8]] = []
    for (_, img), gray in zip(decoded, grays, strict=True):
        if color == "rgb" and gray:
            converted["gray to rgb"] += 1
        elif color == "gray" and img.ndim == 3:
            converted["3-channel gray to gray"] += 1
        images.append(img)
    sizes = Counter(img.shape[:2] for img in images)
    if len(sizes) > 1:
        converted["resized from mixed sizes"] = sum(sizes.values())
    report = LoadReport(
        found=len(files), used=len(images), converted=dict(converted), skipped=skipped
    )
    if len(images) < min_images:
        raise ImageSetError(
            f"only {len(images)} usable good images in {folder}, need at least {min_images} "
            f"({report.summary()})"
        )
    return ImageSet(
        paths=tuple(p for p, _ in decoded), images=tuple(images), color=color, report=report
    )
