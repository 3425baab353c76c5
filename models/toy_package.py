"""A tiny but real model package whose score is local brightness (no torch, no teaching).

It follows the graph contract exactly (``image`` [N,C,H,W] float32 ->
``score`` [N], ``anomaly_map`` [N,H,W]) so tests of the runtime, the device
agent and the evaluation can use real ONNX Runtime sessions and real signed
packages without waiting for a taught model:

    anomaly_map = mean over channels of the preprocessed image / raw_scale
    score       = max of anomaly_map

With the default preprocessing (scale 1/255, mean 0, std 1) a pixel of grey
level g contributes ``g / 255 / raw_scale``; with ``raw_scale = 0.5`` a part
is NG when some pixel is brighter than 127.5.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper

from models.package import (
    InputSpec,
    ReferenceImage,
    ThresholdSpec,
    preprocess_batch,
    write_package,
)

TOY_OPSET = 17
TOY_IR_VERSION = 8


def brightness_graph(channels: int, height: int, width: int, raw_scale: float) -> onnx.ModelProto:
    """The brightness scoring graph as an ONNX model (dynamic batch)."""
    image = helper.make_tensor_value_info(
        "image", TensorProto.FLOAT, ["N", channels, height, width]
    )
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])
    amap = helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", height, width])
    scale = helper.make_tensor("inv_scale", TensorProto.FLOAT, [], [1.0 / raw_scale])
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["gray"], axes=[1], keepdims=0),
        helper.make_node("Mul", ["gray", "inv_scale"], ["anomaly_map"]),
        helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "toy_brightness", [image], [score, amap], [scale])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", TOY_OPSET)],
        producer_name="lineinspect-toy",
    )
    model.ir_version = TOY_IR_VERSION
    onnx.checker.check_model(model)
    return model


def build_toy_package(
    out_dir: Path,
    *,
    name: str = "toy-brightness",
    version: str = "1.0.0",
    width: int = 64,
    height: int = 64,
    color: Literal["rgb", "bgr", "gray"] = "gray",
    raw_scale: float = 0.5,
    sign_key: Ed25519PrivateKey | None = None,
    created: datetime | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a complete toy package (fp32 + int8 graphs, 2 reference images) to ``out_dir``.

    The "int8" graph is the same float graph (the toy has nothing worth
    quantizing); reference scores are measured with ONNX Runtime so
    :func:`models.package.check_references` passes. Returns ``out_dir``.
    """
    import onnxruntime as ort

    channels = 1 if color == "gray" else 3
    spec = InputSpec(
        width=width,
        height=height,
        color=color,
        channels=channels,
        scale=1.0 / 255.0,
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
    )
    model_bytes = brightness_graph(channels, height, width, raw_scale).SerializeToString()
    good = np.full((height, width, 3), 60, np.uint8)
    bad = good.copy()
    cv2.circle(bad, (width // 2, height // 2), max(2, width // 8), (230, 230, 230), -1)
    refs_png = {
        "reference/ref_000.png": cv2.imencode(".png", good)[1].tobytes(),
        "reference/ref_001.png": cv2.imencode(".png", bad)[1].tobytes(),
    }
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    reference = []
    for (rel, _), (label, img) in zip(
        refs_png.items(), (("good", good), ("defective", bad)), strict=True
    ):
        x = preprocess_batch([img], spec)
        s = float(session.run(["score"], {"image": x})[0][0])
        reference.append(ReferenceImage(file=rel, label=label, scores={"fp32": s, "int8": s}))
    files: dict[str, Path | bytes] = {
        "model_fp32.onnx": model_bytes,
        "model_int8.onnx": model_bytes,
        **refs_png,
    }
    return write_package(
        out_dir,
        name=name,
        version=version,
        input_spec=spec,
        graphs={"fp32": "model_fp32.onnx", "int8": "model_int8.onnx"},
        default_graph="int8",
        threshold=ThresholdSpec(
            image=1.0, pixel=1.0, raw_scale=raw_scale, rule="fixed", params={"toy": True}
        ),
        method={"kind": "toy-brightness"},
        metrics=metrics or {},
        reference=reference,
        reference_tolerance={"fp32": 1e-4, "int8": 1e-4},
        files=files,
        created=created or datetime(2026, 1, 1, tzinfo=UTC),
        sign_key=sign_key,
    )


def write_toy_dataset(root: Path, seed: int = 0, size: int = 64) -> Path:
    """A small MVTec-layout folder with exactly known metrics under the toy package.

    Good parts are noise in 70..90 (peak exactly 90: score 0.706 with the
    default ``raw_scale`` 0.5); 10 in ``train/good``, 10 in ``test/good``.
    Five parts per defect class, each with a disc of radius 6 and its mask:
    ``bright`` (level 200, caught), ``faint`` (110: ranks above every good
    part but escapes the threshold; written as 3-channel images) and ``dark``
    (flat 60 with a disc at 20: ranks below every good part). So image AUROC,
    pixel AUROC and AUPRO are 10/15, escape rate 10/15, F1 0.5.
    """
    rng = np.random.default_rng(seed)

    def write(path: Path, image: np.ndarray[Any, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), image):
            raise OSError(f"cannot write {path}")

    def noise() -> np.ndarray[Any, Any]:
        img = (80 + rng.integers(-10, 11, (size, size))).astype(np.uint8)
        img[0, 0] = 90  # every good part peaks at exactly 90
        return img

    for i in range(10):
        write(root / "train" / "good" / f"{i:03d}.png", noise())
        write(root / "test" / "good" / f"{i:03d}.png", noise())
    for cls, level in (("bright", 200), ("faint", 110), ("dark", 20)):
        for i in range(5):
            img = noise() if cls != "dark" else np.full((size, size), 60, np.uint8)
            mask = np.zeros((size, size), np.uint8)
            centre = (int(rng.integers(12, size - 12)), int(rng.integers(12, size - 12)))
            cv2.circle(mask, centre, 6, 255, -1)
            img[mask > 0] = level
            out = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if cls == "faint" else img
            write(root / "test" / cls / f"{i:03d}.png", out)
            write(root / "ground_truth" / cls / f"{i:03d}_mask.png", mask)
    return root
