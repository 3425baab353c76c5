"""Static INT8 quantization of a scoring graph in QDQ format with ONNX Runtime.

Only the backbone convolutions are quantized: weights signed int8 symmetric, activations
uint8, both per tensor. Per-channel weights were tried and wrecked the scores on MTD (good-part
scores doubled, image AUROC 0.53; see docs/model-method.md), per-tensor keeps the ranking.
The neighbourhood pooling, the distance to the memory bank, the smoothing and the score stay
float32: they are cheap next to the convolutions and need the precision (distances are
differences of large squared norms). Calibration runs the float graph on preprocessed good images.

No torch here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from models.export import INPUT_NAME

#: Operator types that are quantized, inside the backbone only. Clip (ReLU6) and Add
#: (residuals) must be in: quantizing a Conv output *before* its ReLU6 spends the 8 bits on
#: the unclipped range (hundreds) and leaves the 0..6 that matters a few steps (measured:
#: 54 % feature error with Conv alone).
QUANTIZED_OPS = ("Conv", "Clip", "Add", "Relu")
#: Name prefix of the backbone's nodes in exported graphs (module path features.trunk).
BACKBONE_PREFIX = "/features/trunk/"


def backbone_nodes(path: Path) -> list[str]:
    """Names of the backbone nodes of a scoring graph (the only ones quantized)."""
    import onnx

    names = [n.name for n in onnx.load(str(path)).graph.node if n.name.startswith(BACKBONE_PREFIX)]
    if not names:
        raise ValueError(f"{path} has no nodes named {BACKBONE_PREFIX}*")
    return names


class _GoodImages(CalibrationDataReader):  # type: ignore[misc]
    """Feeds preprocessed good images, a few per call, to the calibrator."""

    def __init__(self, batch: npt.NDArray[np.float32], per_call: int = 8) -> None:
        self._chunks: Iterator[npt.NDArray[np.float32]] = iter(
            [batch[i : i + per_call] for i in range(0, len(batch), per_call)]
        )

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        chunk = next(self._chunks, None)
        return None if chunk is None else {INPUT_NAME: chunk}


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: npt.NDArray[np.float32],
    *,
    method: str = "minmax",
) -> Path:
    """Write the QDQ INT8 variant of ``fp32_path`` calibrated on ``calibration`` (NCHW)."""
    if len(calibration) == 0:
        raise ValueError("calibration needs at least one image")
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    with tempfile.TemporaryDirectory(prefix="li-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out_path),
            _GoodImages(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_quantize=backbone_nodes(pre),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            extra_options={"WeightSymmetric": True},
        )
    return out_path


def set_graph_scale(path: Path, inv_scale: float) -> None:
    """Rewrite the ``inv_scale`` constant (1 / raw_scale) of an exported scoring graph."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name == "inv_scale":
            init.CopyFrom(numpy_helper.from_array(np.array(inv_scale, np.float32), "inv_scale"))
            onnx.save(model, str(path))
            return
    raise ValueError(f"{path} has no inv_scale constant")


def patch_features(
    path: Path, batch: npt.NDArray[np.float32], threads: int = 2
) -> npt.NDArray[np.float32]:
    """Patch features [N * P, D] as a scoring graph computes them (the bank MatMul's input).

    Run on the INT8 graph, this gives the features the quantized backbone really produces,
    so the INT8 graph's memory bank can be rebuilt from them (see ``set_bank``).
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    feat = next(
        n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] == "bank_t"
    )
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(feat))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out = [sess.run([feat], {INPUT_NAME: batch[i : i + 8]})[0] for i in range(0, len(batch), 8)]
    feats = np.concatenate(out)
    return np.ascontiguousarray(feats.reshape(-1, feats.shape[-1]), dtype=np.float32)


def set_bank(path: Path, bank: npt.NDArray[np.float32]) -> None:
    """Replace the memory bank constants (``bank_t``, ``bank_sq``) of a scoring graph."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    new = {
        "bank_t": np.ascontiguousarray(bank.T, dtype=np.float32),
        "bank_sq": (bank.astype(np.float32) ** 2).sum(1).astype(np.float32),
    }
    done = set()
    for init in model.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name], init.name))
            done.add(init.name)
    if done != set(new):
        raise ValueError(f"{path} lacks bank constants {sorted(set(new) - done)}")
    del model.graph.value_info[:]  # inferred shapes may name the old bank size
    onnx.save(model, str(path))
