"""The synthetic line: images of a machined flange with socket-head bolts.

Pure numpy + OpenCV, deterministic for a given :class:`numpy.random.Generator`
state. Each part is a turned steel flange on a conveyor belt: a central bore,
six socket-head cap screws on a bolt circle, concentric turning marks, an
anisotropic sheen that follows the light, low-frequency surface blotches and
sensor noise. Good parts vary in pose (shift, rotation, scale), lighting
(direction, gain, gradient, vignette), tint, texture and focus, so a useful
detector has to learn the part rather than memorise pixels.

Defects (:data:`DEFECT_TYPES`) vary in size and contrast, from obvious to
faint:

- ``missing_bolt``: one screw absent, its counterbore and threaded hole visible;
- ``scratch``: a thin, slightly curved bright or dark line;
- ``crack``: a dark, jagged, sometimes branching line starting at an edge;
- ``stain``: a soft, irregular oil, rust or residue blot;
- ``dent``: a shallow depression, shaded by the light.

The mask returned with each image marks the defect's pixels (0 or 255).
Images are rendered at twice the requested size and reduced with area
averaging, so edges are anti-aliased like a real lens would make them.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from edge.types import ImageArray

DEFECT_TYPES: tuple[str, ...] = ("missing_bolt", "scratch", "crack", "stain", "dent")
"""Every defect the generator can draw (also the MVTec test/<defect> folder names)."""

MaskArray = npt.NDArray[np.uint8]
"""HxW uint8 mask, 255 on defect pixels and 0 elsewhere."""

FloatImage = npt.NDArray[np.float32]

GENERATOR_VERSION = 2
"""Bumped whenever the same seed would give different pixels."""

_SUPERSAMPLE = 2
_N_BOLTS = 6
_MIN_MASK_PX = 6
"""Smallest defect (in output pixels) the generator accepts; smaller draws are redone."""


def _f32(a: object) -> FloatImage:
    return np.asarray(a, dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[FloatImage, FloatImage]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return xx, yy


@dataclass(frozen=True, slots=True)
class _Scene:
    """Pose and lighting of one part, in supersampled canvas pixels."""

    size: int
    cx: float
    cy: float
    radius: float
    angle: float
    """Part rotation in radians."""
    light: tuple[float, float]
    """Unit vector pointing towards the light in image coordinates."""
    bore_radius: float
    bolt_circle: float
    head_radius: float

    def bolt_centres(self) -> list[tuple[float, float]]:
        return [
            (
                self.cx + self.bolt_circle * math.cos(self.angle + k * 2 * math.pi / _N_BOLTS),
                self.cy + self.bolt_circle * math.sin(self.angle + k * 2 * math.pi / _N_BOLTS),
            )
            for k in range(_N_BOLTS)
        ]


def _window(
    scene: _Scene, cx: float, cy: float, reach: float
) -> tuple[tuple[slice, slice], FloatImage, FloatImage]:
    """A slice around (cx, cy) and the pixel offsets from that point inside it."""
    s = scene.size
    x0, x1 = max(int(cx - reach) - 2, 0), min(int(cx + reach) + 3, s)
    y0, y1 = max(int(cy - reach) - 2, 0), min(int(cy + reach) + 3, s)
    xx, yy = _grid(s)
    win = (slice(y0, y1), slice(x0, x1))
    return win, xx[win] - np.float32(cx), yy[win] - np.float32(cy)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> FloatImage:
    """Zero-mean, unit-ish low-frequency noise (bicubic upscale of a coarse grid)."""
    coarse = rng.normal(0.0, 1.0, (cells, cells)).astype(np.float32)
    return _f32(cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC))


def _make_scene(rng: np.random.Generator, size: int) -> _Scene:
    # A fixtured station: the nest holds the part to a few pixels and a degree or two,
    # the lamp is mounted (its direction drifts slightly), the part is made to tolerance.
    radius = size * 0.40 * float(rng.uniform(0.995, 1.005))
    light_angle = -1.9 + float(rng.uniform(-0.06, 0.06))  # from the upper left
    return _Scene(
        size=size,
        cx=size / 2 + float(rng.uniform(-0.012, 0.012)) * size,
        cy=size / 2 + float(rng.uniform(-0.012, 0.012)) * size,
        radius=radius,
        angle=float(rng.uniform(-0.03, 0.03)),
        light=(math.cos(light_angle), math.sin(light_angle)),
        bore_radius=radius * float(rng.uniform(0.278, 0.282)),
        bolt_circle=radius * 0.66,
        head_radius=radius * 0.085,
    )


def _normal(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> FloatImage:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _draw_background(rng: np.random.Generator, scene: _Scene) -> FloatImage:
    s = scene.size
    # The nest under the part: a ribbed plate, the ribs wherever the belt stopped it.
    base = float(rng.uniform(47, 53))
    stripe_period = 7.0 * s / 512
    rows = np.arange(s, dtype=np.float32) + float(rng.uniform(0, stripe_period))
    stripes = (base + 1.5 * np.sin(2 * np.pi * rows / stripe_period)).astype(np.float32)
    belt = np.repeat(stripes[:, None], s, axis=1)
    belt += 2.0 * _smooth_noise(rng, s, 12)
    # Soft shadow of the part, cast away from the light.
    shadow = np.zeros((s, s), np.float32)
    off = scene.radius * 0.05
    cv2.circle(
        shadow,
        (int(scene.cx - scene.light[0] * off), int(scene.cy - scene.light[1] * off)),
        int(scene.radius),
        1.0,
        -1,
    )
    shadow = _f32(cv2.GaussianBlur(shadow, (0, 0), scene.radius * 0.04))
    return _f32(belt * (1.0 - 0.45 * shadow))


def _draw_body(rng: np.random.Generator, scene: _Scene, img: FloatImage) -> None:
    """The turned flange: body, turning marks, sheen, chamfers and the bore."""
    win, dx, dy = _window(scene, scene.cx, scene.cy, scene.radius)
    shape = dx.shape
    r2 = dx * dx + dy * dy
    r = np.sqrt(r2)
    inv_r2 = 1.0 / np.maximum(r2, np.float32(1.0))
    lx, ly = scene.light

    # One part number from one process: the same material and finish every time,
    # with the small spread of a real batch.
    body = np.full(shape, float(rng.uniform(151, 159)), np.float32)
    # Concentric turning marks (one tool, one feed), their depth modulated by chatter.
    period = float(rng.uniform(2.9, 3.1))
    depth = 2.5 + 1.5 * (1 + np.sin(r / float(rng.uniform(14, 18)) + float(rng.uniform(0, 6.3))))
    body += depth * np.sin(r * np.float32(2 * np.pi / period) + float(rng.uniform(0, 6.3)))
    # Anisotropic "bow-tie" sheen of a turned surface, aligned with the light:
    # cos(2(phi - light)) from the offsets, without trigonometry per pixel.
    cos2 = ((dx * dx - dy * dy) * (lx * lx - ly * ly) + 4 * dx * dy * lx * ly) * inv_r2
    lobe = 0.5 + 0.5 * cos2
    body += float(rng.uniform(17, 21)) * lobe * lobe * lobe
    # Natural, harmless surface variation: low-frequency blotches and grain.
    blotch = _smooth_noise(rng, scene.size, int(rng.integers(8, 11)))[win]
    body += float(rng.uniform(1.0, 2.0)) * blotch

    radial_light = (dx * lx + dy * ly) / np.maximum(r, np.float32(1.0))
    # Outer chamfer: lit on the light side, dark on the other.
    chamfer_w = scene.radius * 0.035
    outer = (r > scene.radius - chamfer_w) & (r <= scene.radius)
    body[outer] = 150 + 60 * radial_light[outer]
    # The bore: a dark through-hole with its chamfer lit on the far side.
    bore_w = scene.radius * 0.04
    bore_ch = (r > scene.bore_radius) & (r <= scene.bore_radius + bore_w)
    body[bore_ch] = 140 - 60 * radial_light[bore_ch]
    bore = r <= scene.bore_radius
    body[bore] = float(rng.uniform(22, 28)) + 3.0 * _smooth_noise(rng, scene.size, 8)[win][bore]

    inside = r <= scene.radius
    sub = img[win]
    sub[inside] = body[inside]


def _draw_bolt(
    rng: np.random.Generator, scene: _Scene, img: FloatImage, cx: float, cy: float
) -> None:
    """A socket-head cap screw seated in a shallow counterbore."""
    rh = scene.head_radius
    win, dx, dy = _window(scene, cx, cy, rh * 1.3)
    r = np.hypot(dx, dy)
    lx, ly = scene.light
    sub = img[win]
    # Counterbore shadow ring.
    ring = (r > rh) & (r <= rh * 1.18)
    sub[ring] = (sub[ring] * 0.55).astype(np.float32)
    # Head: a dome lit from the light direction, with a chamfered rim.
    head = r <= rh
    shade = (dx * lx + dy * ly) / rh
    head_val = float(rng.uniform(122, 130)) + 34 * shade - 18 * (r / rh) ** 4
    sub[head] = head_val[head].astype(np.float32)
    # Hex socket, randomly oriented (screws are tightened to any angle).
    theta = float(rng.uniform(0, np.pi / 3))
    a = rh * float(rng.uniform(0.50, 0.53))
    corners = [theta + k * np.pi / 3 for k in range(6)]
    pts = np.array([[cx + a * math.cos(t), cy + a * math.sin(t)] for t in corners], np.float32)
    sock = np.zeros(sub.shape, np.uint8)
    off = np.array([win[1].start, win[0].start], np.float32)
    cv2.fillPoly(sock, [np.round(pts - off).astype(np.int32)], 1)
    inner = sock.astype(bool)
    sub[inner] = (float(rng.uniform(28, 34)) - 10 * shade[inner]).astype(np.float32)


def _bolt_footprint(scene: _Scene) -> FloatImage:
    fp = np.zeros((scene.size, scene.size), np.float32)
    for bx, by in scene.bolt_centres():
        cv2.circle(fp, (round(bx), round(by)), round(scene.head_radius * 1.18), 1.0, -1)
    return fp


def _surface_point(
    rng: np.random.Generator, scene: _Scene, margin: float, avoid_bolts: bool = True
) -> tuple[float, float]:
    """A random point on the flat flange surface, away from edges (and bolts)."""
    bolts = scene.bolt_centres()
    for _ in range(200):
        rr = float(
            rng.uniform(
                scene.bore_radius + scene.radius * 0.06 + margin, scene.radius * 0.94 - margin
            )
        )
        aa = float(rng.uniform(0, 2 * np.pi))
        x, y = scene.cx + rr * math.cos(aa), scene.cy + rr * math.sin(aa)
        if not avoid_bolts or all(
            math.hypot(x - bx, y - by) > scene.head_radius * 1.25 + margin for bx, by in bolts
        ):
            return x, y
    return scene.cx + (scene.bore_radius + scene.radius) / 2, scene.cy


def _draw_scratch(
    rng: np.random.Generator, scene: _Scene, img: FloatImage, mask: FloatImage
) -> None:
    length = scene.radius * float(rng.uniform(0.15, 0.5))
    x, y = _surface_point(rng, scene, 0.0, avoid_bolts=False)
    heading = float(rng.uniform(0, 2 * np.pi))
    bend = float(rng.uniform(-1.2, 1.2)) / max(length, 1.0)
    n = max(int(length / 3), 4)
    pts = []
    for _ in range(n):
        pts.append((x, y))
        x += math.cos(heading) * length / n
        y += math.sin(heading) * length / n
        heading += bend * length / n + float(rng.normal(0, 0.03))
    poly = np.round(np.array(pts)).astype(np.int32)
    thickness = int(rng.integers(2, 5))  # 1-2 output pixels: faint, never invisible
    delta = float(rng.uniform(25, 60)) * (1 if rng.random() < 0.6 else -1)
    layer = np.zeros_like(img)
    cv2.polylines(layer, [poly], False, 1.0, thickness, cv2.LINE_AA)
    inside = _part_surface(scene)
    layer *= inside
    img += delta * layer
    mask[layer > 0.3] = 1.0


@functools.lru_cache(maxsize=4)
def _part_surface(scene: _Scene) -> FloatImage:
    """1 on the flat flange surface (between bore chamfer and rim), 0 elsewhere; read-only."""
    surface = np.zeros((scene.size, scene.size), np.float32)
    centre = (round(scene.cx), round(scene.cy))
    cv2.circle(surface, centre, round(scene.radius * 0.96), 1.0, -1)
    cv2.circle(surface, centre, round(scene.bore_radius + scene.radius * 0.04), 0.0, -1)
    surface.flags.writeable = False
    return surface


def _draw_crack(rng: np.random.Generator, scene: _Scene, img: FloatImage, mask: FloatImage) -> None:
    # Cracks start where stress concentrates: the bore, a bolt hole or the rim.
    origin = int(rng.integers(0, 3))
    if origin == 0:
        a = float(rng.uniform(0, 2 * np.pi))
        rr = scene.bore_radius + scene.radius * 0.045
        x, y, heading = scene.cx + rr * math.cos(a), scene.cy + rr * math.sin(a), a
    elif origin == 1:
        bx, by = scene.bolt_centres()[int(rng.integers(0, _N_BOLTS))]
        a = float(rng.uniform(0, 2 * np.pi))
        rr = scene.head_radius * 1.2
        x, y, heading = bx + rr * math.cos(a), by + rr * math.sin(a), a
    else:
        a = float(rng.uniform(0, 2 * np.pi))
        rr = scene.radius * 0.95
        x, y, heading = scene.cx + rr * math.cos(a), scene.cy + rr * math.sin(a), a + math.pi
    length = scene.radius * float(rng.uniform(0.12, 0.35))
    layer = np.zeros_like(img)
    branches = [(x, y, heading, length)]
    drawn = 0
    while branches and drawn < 3:
        bx0, by0, h, ln = branches.pop()
        drawn += 1
        pts = [(bx0, by0)]
        step = 2.5
        px, py = bx0, by0
        for _ in range(max(int(ln / step), 3)):
            h += float(rng.normal(0, 0.35))
            px += math.cos(h) * step
            py += math.sin(h) * step
            pts.append((px, py))
            if drawn == 1 and rng.random() < 0.015:
                branches.append((px, py, h + float(rng.choice([-0.7, 0.7])), ln * 0.4))
        poly = np.round(np.array(pts)).astype(np.int32)
        cv2.polylines(layer, [poly], False, 1.0, int(rng.integers(2, 4)), cv2.LINE_AA)
    layer *= _part_surface(scene)
    img -= float(rng.uniform(45, 95)) * layer
    mask[layer > 0.3] = 1.0


def _blob(
    rng: np.random.Generator, scene: _Scene, cx: float, cy: float, radius: float
) -> FloatImage:
    """A soft, irregular blob (several overlapping ellipses, blurred), peak 1."""
    layer = np.zeros((scene.size, scene.size), np.float32)
    for _ in range(int(rng.integers(3, 7))):
        ox, oy = rng.normal(0, radius * 0.35, 2)
        ax = max(radius * float(rng.uniform(0.3, 0.7)), 2.0)
        ay = max(ax * float(rng.uniform(0.4, 1.0)), 2.0)
        cv2.ellipse(
            layer,
            (round(cx + ox), round(cy + oy)),
            (round(ax), round(ay)),
            float(rng.uniform(0, 180)),
            0,
            360,
            1.0,
            -1,
        )
    layer = _f32(cv2.GaussianBlur(layer, (0, 0), max(radius * 0.15, 1.0)))
    peak = float(layer.max())
    return layer / peak if peak > 0 else layer


def _draw_stain(
    rng: np.random.Generator,
    scene: _Scene,
    img: FloatImage,
    color_delta: FloatImage,
    mask: FloatImage,
) -> None:
    radius = scene.radius * float(rng.uniform(0.06, 0.16))
    cx, cy = _surface_point(rng, scene, radius * 0.5)
    alpha = _blob(rng, scene, cx, cy, radius) * _part_surface(scene)
    strength = float(rng.uniform(0.25, 0.6))
    kind = int(rng.integers(0, 3))
    # Target tone (BGR) the stain pulls the metal towards.
    tone = [(30.0, 45.0, 60.0), (40.0, 80.0, 135.0), (205.0, 205.0, 200.0)][kind]
    a = alpha * strength
    gray = img.copy()
    for c in range(3):
        color_delta[..., c] += a * (tone[c] - gray)
    mask[alpha > 0.35] = 1.0


def _draw_dent(rng: np.random.Generator, scene: _Scene, img: FloatImage, mask: FloatImage) -> None:
    rx = scene.radius * float(rng.uniform(0.06, 0.12))
    ry = rx * float(rng.uniform(0.6, 1.0))
    cx, cy = _surface_point(rng, scene, rx)
    win, dx, dy = _window(scene, cx, cy, rx * 1.3)
    rot = float(rng.uniform(0, np.pi))
    u = (dx * math.cos(rot) + dy * math.sin(rot)) / rx
    v = (-dx * math.sin(rot) + dy * math.cos(rot)) / ry
    rho = np.sqrt(u * u + v * v)
    # A smooth bowl: its slope faces the light on one side, away on the other.
    bowl = np.clip(1 - rho * rho, 0, None) ** 2
    lx, ly = scene.light
    slope = (dx * lx + dy * ly) / rx
    depth = float(rng.uniform(30, 60))
    sub = img[win]
    sub += (depth * bowl * slope - 0.25 * depth * bowl).astype(np.float32)
    sub_mask = mask[win]
    sub_mask[bowl > 0.12] = 1.0


def _draw_missing_bolt(
    rng: np.random.Generator,
    scene: _Scene,
    img: FloatImage,
    mask: FloatImage,
    centre: tuple[float, float],
) -> None:
    """An empty counterbore with its threaded hole."""
    cx, cy = centre
    rh = scene.head_radius
    win, dx, dy = _window(scene, cx, cy, rh * 1.3)
    r = np.hypot(dx, dy)
    lx, ly = scene.light
    sub = img[win]
    floor = r <= rh * 1.18
    sub[floor] = (float(rng.uniform(60, 90)) + 4 * np.sin(r * 1.3)[floor]).astype(np.float32)
    wall = (r > rh * 1.05) & (r <= rh * 1.18)
    sub[wall] = (90 - 45 * (dx * lx + dy * ly)[wall] / (rh * 1.18)).astype(np.float32)
    hole_r = rh * float(rng.uniform(0.55, 0.65))
    thread = (r > hole_r * 0.8) & (r <= hole_r)
    sub[thread] = (45 + 12 * np.sin(r * 3.0)[thread]).astype(np.float32)
    sub[r <= hole_r * 0.8] = float(rng.uniform(10, 22))
    sub_mask = mask[win]
    sub_mask[r <= rh * 1.18] = 1.0


def _finish(
    rng: np.random.Generator,
    scene: _Scene,
    gray: FloatImage,
    color_delta: FloatImage | None,
    size_px: int,
) -> ImageArray:
    """Downscale, then lighting, tint, focus and sensor noise: the camera's share."""
    small_gray = _f32(cv2.resize(gray, (size_px, size_px), interpolation=cv2.INTER_AREA))
    # Surface grain (metal and belt alike), at the camera's own resolution.
    small_gray += _f32(cv2.GaussianBlur(_normal(rng, small_gray.shape, 2.5), (0, 0), 0.6))
    xx, yy = _grid(size_px)
    nx, ny = xx / size_px - 0.5, yy / size_px - 0.5
    # Controlled lighting: a few percent of drift in level, gradient and colour.
    gain = float(rng.uniform(0.97, 1.03))
    gx, gy = rng.uniform(-0.03, 0.03, 2)
    vignette = 1.0 - float(rng.uniform(0.13, 0.17)) * (nx * nx + ny * ny) * 2
    light = gain * (1 + float(gx) * nx + float(gy) * ny) * vignette
    tint = rng.uniform(0.99, 1.01, 3)
    small = np.empty((size_px, size_px, 3), np.float32)
    small_delta = (
        None
        if color_delta is None
        else _f32(cv2.resize(color_delta, (size_px, size_px), interpolation=cv2.INTER_AREA))
    )
    for c in range(3):
        channel = small_gray if small_delta is None else small_gray + small_delta[..., c]
        small[..., c] = channel * light * float(tint[c])
    # Fixed focus, a little breathing with the part's height in the nest.
    small = _f32(cv2.GaussianBlur(small, (0, 0), float(rng.uniform(0.35, 0.5))))
    small += _normal(rng, small.shape, float(rng.uniform(1.5, 2.0)))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def render_part(
    rng: np.random.Generator, defect: str | None, size_px: int = 256
) -> tuple[ImageArray, MaskArray]:
    """Render one part: a BGR uint8 image and its defect mask (0/255, all 0 when good).

    ``defect`` is one of :data:`DEFECT_TYPES` or None for a good part. The
    result depends only on ``rng``'s state, ``defect`` and ``size_px``.
    """
    if defect is not None and defect not in DEFECT_TYPES:
        raise ValueError(f"unknown defect {defect!r}; choose one of {', '.join(DEFECT_TYPES)}")
    if size_px < 32:
        raise ValueError(f"size_px must be at least 32, got {size_px}")
    s = size_px * _SUPERSAMPLE
    scene = _make_scene(rng, s)
    gray = _draw_background(rng, scene)
    _draw_body(rng, scene, gray)
    color_delta: FloatImage | None = None
    mask = np.zeros((s, s), np.float32)
    missing = int(rng.integers(0, _N_BOLTS)) if defect == "missing_bolt" else -1

    # Surface defects go under the screws; retry until the visible part is big enough.
    if defect in {"scratch", "crack", "stain", "dent"}:
        footprint = _bolt_footprint(scene)
        for _ in range(10):
            trial_gray = gray.copy()
            trial_delta = np.zeros((s, s, 3), np.float32) if defect == "stain" else None
            trial_mask = np.zeros_like(mask)
            if defect == "scratch":
                _draw_scratch(rng, scene, trial_gray, trial_mask)
            elif defect == "crack":
                _draw_crack(rng, scene, trial_gray, trial_mask)
            elif trial_delta is not None:
                _draw_stain(rng, scene, trial_gray, trial_delta, trial_mask)
                trial_delta *= (1.0 - footprint)[..., None]  # screws sit on top of the stain
            else:
                _draw_dent(rng, scene, trial_gray, trial_mask)
            trial_mask *= 1.0 - footprint
            if trial_mask.sum() >= _MIN_MASK_PX * _SUPERSAMPLE**2:
                break
        gray, color_delta, mask = trial_gray, trial_delta, trial_mask

    for k, (bx, by) in enumerate(scene.bolt_centres()):
        if k == missing:
            _draw_missing_bolt(rng, scene, gray, mask, (bx, by))
        else:
            _draw_bolt(rng, scene, gray, bx, by)

    image = _finish(rng, scene, gray, color_delta, size_px)
    small_mask = cv2.resize(mask, (size_px, size_px), interpolation=cv2.INTER_AREA)
    out_mask = np.where(small_mask >= 0.5, 255, 0).astype(np.uint8)
    if defect is not None and not out_mask.any():
        # Thin defects may average below 0.5 everywhere: keep their strongest pixels.
        out_mask = np.where(small_mask >= 0.5 * float(small_mask.max()), 255, 0).astype(np.uint8)
    return image, out_mask


def part_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one image: independent of how many others are made."""
    code = sum(ord(c) * 31**i for i, c in enumerate(split)) % (2**32)
    return np.random.default_rng([seed % (2**63), code, index])


def _write_png(path: Path, image: npt.NDArray[np.uint8]) -> None:
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise OSError(f"cannot encode {path}")
    path.write_bytes(buf.tobytes())


_LAYOUT = ("train", "test", "ground_truth", "synth.json")


def write_dataset(
    out: Path,
    good: int,
    defective: int,
    seed: int,
    *,
    size_px: int = 256,
    train_fraction: float = 0.8,
    defects: tuple[str, ...] = DEFECT_TYPES,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a reproducible dataset in the MVTec AD layout and return its summary.

    ``good`` good parts are split into ``train/good`` (``train_fraction`` of
    them, at least one) and ``test/good``; ``defective`` parts go round-robin
    over ``defects`` into ``test/<defect>`` with masks in
    ``ground_truth/<defect>/<stem>_mask.png``. A ``synth.json`` at the top
    records the parameters and counts. Same arguments, same bytes.

    A folder that already holds a dataset is refused (``FileExistsError``),
    since leftover images would silently join the new one; ``overwrite=True``
    deletes its ``train``, ``test``, ``ground_truth`` and ``synth.json`` first.
    """
    if good < 1:
        raise ValueError("good must be at least 1 (the training split needs good parts)")
    if defective < 0:
        raise ValueError("defective must be 0 or more")
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError("train_fraction must be in (0, 1]")
    unknown = [d for d in defects if d not in DEFECT_TYPES]
    if unknown or not defects:
        raise ValueError(f"defects must be a non-empty subset of {DEFECT_TYPES}, got {defects}")
    existing = [out / n for n in _LAYOUT if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a dataset ({', '.join(p.name for p in existing)}); "
            "choose an empty folder or overwrite it"
        )
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    n_train = min(max(1, round(good * train_fraction)), good)
    (out / "train" / "good").mkdir(parents=True, exist_ok=True)
    (out / "test" / "good").mkdir(parents=True, exist_ok=True)

    for i in range(good):
        image, _ = render_part(part_rng(seed, "good", i), None, size_px)
        if i < n_train:
            _write_png(out / "train" / "good" / f"{i:03d}.png", image)
        else:
            _write_png(out / "test" / "good" / f"{i - n_train:03d}.png", image)

    per_defect = dict.fromkeys(defects, 0)
    for j in range(defective):
        name = defects[j % len(defects)]
        stem = f"{per_defect[name]:03d}"
        per_defect[name] += 1
        image, mask = render_part(part_rng(seed, name, j), name, size_px)
        (out / "test" / name).mkdir(parents=True, exist_ok=True)
        (out / "ground_truth" / name).mkdir(parents=True, exist_ok=True)
        _write_png(out / "test" / name / f"{stem}.png", image)
        _write_png(out / "ground_truth" / name / f"{stem}_mask.png", mask)

    summary: dict[str, Any] = {
        "generator": "lineinspect-synth",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size_px": size_px,
        "train_good": n_train,
        "test_good": good - n_train,
        "test_defective": {k: v for k, v in per_defect.items() if v},
        "defect_types": list(defects),
    }
    (out / "synth.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
