"""Static INT8 quantization of a scoring graph in QDQ format with ONNX Runtime.

What is quantized, and how, is :class:`Int8Settings`; its defaults are the shipped
configuration, chosen by the measurements in ``docs/model-method.md`` (section INT8):

- backbone nodes (names with ``/trunk/``): ``Conv``, ``Clip`` (ReLU6) and ``Add``
  (residuals), except the stem convolution (the backbone's first ``Conv``), which stays
  float: with 1 or 3 input channels the int8 kernels have little to work on, and quantizing
  the raw image costs a QuantizeLinear over the whole input;
- the bank product ``q . bank``: the bank is an int8 constant with one scale per entry, the
  queries are quantized like any activation, and the product comes out in float (ONNX
  Runtime's ``MatMulIntegerToFloat``): it is a quarter of the INT8 graph's time otherwise.
  In the ``u8`` graph (ONNX Runtime's) the product is written as that contrib operator with
  ``bank_bias`` as its bias input (:func:`fuse_bank_product`): ONNX Runtime's own QDQ fusion
  leaves the bias add as a separate pass over the patches x bank product.
  ``|q|^2``, ``|b|^2``, the minimum, the smoothing and the score stay float32;
- weights signed int8, symmetric, per output channel (per tensor lost 0.02 AUROC on MTD);
- activations uint8, asymmetric, calibrated on good images by the 99.99th percentile (MinMax
  let a few extreme activations stretch the ranges: 0.0025 AUROC loss instead of 0.0055 on
  MTD). ONNX Runtime then removes
  every ReLU6 into the quantization range and fuses the whole backbone into ``QLinearConv`` /
  ``QLinearAdd``. ``activations="s8"`` (symmetric, zero point 0) is what TensorRT's explicit
  INT8 needs; ONNX Runtime's CPU provider fuses it far less (depthwise convolutions, ReLU6 and
  residual additions run in float between Q/DQ pairs) and it is slower than FP32 there.
  With ``s8`` every ``Conv -> Clip`` pair is calibrated on the clipped range (see
  :func:`calibrate`).

No torch here.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
#: Name fragment of the backbone's nodes in exported graphs: the exporter names nodes by
#: module path, and the backbone is the ``trunk`` module (``/features/trunk/...`` or
#: ``/trunk/...`` depending on how the graph calls it).
BACKBONE_SCOPE = "/trunk/"
#: The bank product ``q . bank`` (``MatMul`` with the constant ``bank_t``).
BANK_NAME = "bank_t"
#: ``-|b|^2 / 2`` per bank entry, added to the bank product before the max over entries.
BANK_BIAS_NAME = "bank_bias"
#: The fused int8 bank product of a ``u8`` graph (ONNX Runtime contrib operator).
FUSED_PRODUCT_OP = "MatMulIntegerToFloat"
FUSED_PRODUCT_DOMAIN = "com.microsoft"

#: Calibration images per ``collect_data`` call (bounds the calibrator's memory).
CALIBRATION_CHUNK = 8

_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


@dataclass(frozen=True)
class Int8Settings:
    """How :func:`quantize_int8` quantizes a scoring graph; the defaults are shipped."""

    #: ``u8``: unsigned int8, asymmetric (fast on ONNX Runtime CPU; TensorRT refuses it).
    #: ``s8``: signed int8, symmetric (zero point 0; what TensorRT explicit INT8 needs).
    activations: str = "u8"
    #: One weight scale per output channel (else one per tensor).
    per_channel: bool = True
    #: Activation range estimator: ``minmax``, ``percentile`` or ``entropy`` (ORT calibrators).
    calibration: str = "percentile"
    #: ``calibration="percentile"`` keeps this share of each tensor's calibration values
    #: (ORT's calibrator: (100 - p) / 2 % cut from each tail; of |x| when symmetric).
    percentile: float = 99.99
    #: Keep the backbone's first convolution (the stem) in float.
    float_stem: bool = True
    #: Backbone node name fragments (e.g. ``"blocks.14/"``) whose nodes stay float.
    keep_float: tuple[str, ...] = ()
    #: ``int8``: ``q . bank`` runs on int8 inputs with a float output (bank a per-entry int8
    #: constant, queries calibrated like any activation). ``float``: it stays float32.
    bank: str = "int8"
    #: The image-level Gaussian's constants (``g_mean``, ``g_whiten``, ``g_gain``) of the INT8
    #: graph. ``refit``: refitted on the pooled features the INT8 graph itself computes, like
    #: its bank (done after quantization by ``models.teach.fit_int8`` with :func:`set_gaussian`).
    #: ``fp32``: kept as fitted on FP32 features.
    gaussian: str = "refit"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("activations", ("u8", "s8")),
            ("calibration", tuple(_METHODS)),
            ("bank", ("float", "int8")),
            ("gaussian", ("refit", "fp32")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"Int8Settings.{name} must be one of {', '.join(allowed)}, "
                    f"not {getattr(self, name)!r}"
                )
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"Int8Settings.percentile must be in (0, 100], not {self.percentile}")

    def describe(self) -> dict[str, Any]:
        """JSON-safe form for the package manifest."""
        return {
            "format": "QDQ",
            "activations": self.activations,
            "weights": "s8 symmetric " + ("per channel" if self.per_channel else "per tensor"),
            "calibration": self.calibration
            + (f" {self.percentile}" if self.calibration == "percentile" else ""),
            "float_stem": self.float_stem,
            "keep_float": list(self.keep_float),
            "bank": self.bank,
            "bank_product": self.bank_product(),
            "gaussian": self.gaussian,
        }

    def bank_product(self) -> str:
        """How the INT8 graph computes ``q . bank + bank_bias`` (see :func:`fuse_bank_product`)."""
        if self.bank == "float":
            return "float MatMul + Add"
        if self.activations == "u8":
            return f"{FUSED_PRODUCT_DOMAIN}.{FUSED_PRODUCT_OP} with the bias fused (ONNX Runtime)"
        return "QDQ MatMul + Add"


def backbone_nodes(path: Path) -> list[str]:
    """Names of the backbone nodes of a scoring graph (the ones eligible for quantization)."""
    import onnx

    names = [n.name for n in onnx.load(str(path)).graph.node if BACKBONE_SCOPE in n.name]
    if not names:
        raise ValueError(f"{path} has no nodes named *{BACKBONE_SCOPE}*")
    return names


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def nodes_to_quantize(model: Any, settings: Int8Settings) -> list[str]:
    """Names of the nodes of ``model`` (an ``onnx.ModelProto``) that ``settings`` quantizes."""
    nodes = [n for n in model.graph.node if BACKBONE_SCOPE in n.name]
    if not nodes:
        raise ValueError(f"the graph has no nodes named *{BACKBONE_SCOPE}*")
    skip: set[str] = set()
    convs = [n for n in nodes if n.op_type == "Conv"]
    if settings.float_stem and convs:
        skip.add(convs[0].name)
    for frag in settings.keep_float:
        skip.update(n.name for n in nodes if frag in n.name)
    names = [n.name for n in nodes if n.name not in skip and n.op_type in QUANTIZED_OPS]
    if settings.bank == "int8":
        names += [
            n.name
            for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] == BANK_NAME
        ]
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


def _clip_bounds(model: Any, node: Any) -> tuple[float, float] | None:
    """(min, max) of a Clip node when both are constants of the graph."""
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] in node.input[1:]:
            consts[n.output[0]] = numpy_helper.to_array(_attr(n, "value", None))
    if len(node.input) < 3 or node.input[1] not in consts or node.input[2] not in consts:
        return None
    return float(consts[node.input[1]]), float(consts[node.input[2]])


def calibrate(pre_path: Path, calibration: npt.NDArray[np.float32], settings: Int8Settings) -> Any:
    """Activation ranges (ORT ``TensorsData``) of the graph at ``pre_path`` on ``calibration``.

    With symmetric activations ONNX Runtime keeps every ReLU6 (``Clip``) and quantizes the
    convolution output before it on its own range; the range of a ``Clip`` input is therefore
    narrowed to the clip bounds (values beyond are clipped next anyway), so a ReLU6 output
    keeps 7 bits over 0..6 instead of a few steps of the unclipped range.
    """
    import onnx
    from onnxruntime.quantization.calibrate import TensorData, create_calibrator

    symmetric = settings.activations == "s8"
    options: dict[str, Any] = {"symmetric": symmetric}
    if settings.calibration == "percentile":
        options["percentile"] = settings.percentile
    with tempfile.TemporaryDirectory(prefix="li-calib-") as tmp:
        calibrator = create_calibrator(
            pre_path,
            list(QUANTIZED_OPS) + (["MatMul"] if settings.bank == "int8" else []),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=_METHODS[settings.calibration],
            extra_options=options,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # ORT's histogram calibrators print
            # A calibrator keeps every intermediate tensor of the images of one collect_data
            # call until its end (64 MTD images: 5.3 GB); the histogram calibrators merge
            # calls, so images go in chunks and memory stays bounded by one chunk.
            for start in range(0, len(calibration), CALIBRATION_CHUNK):
                calibrator.collect_data(_GoodImages(calibration[start : start + CALIBRATION_CHUNK]))
            ranges = calibrator.compute_data()
        del calibrator
    model = onnx.load(str(pre_path))
    for node in model.graph.node:
        if node.op_type != "Clip" or node.input[0] not in ranges:
            continue
        bounds = _clip_bounds(model, node)
        if bounds is None:
            continue
        old = ranges[node.input[0]]
        lo, hi = old.range_value
        lo = np.asarray(np.maximum(lo, bounds[0]), dtype=np.asarray(lo).dtype)
        hi = np.asarray(np.minimum(hi, bounds[1]), dtype=np.asarray(hi).dtype)
        ranges[node.input[0]] = TensorData(lowest=lo, highest=hi)
    return ranges


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: npt.NDArray[np.float32],
    settings: Int8Settings | None = None,
    *,
    fuse: bool = True,
) -> Path:
    """Write the QDQ INT8 variant of ``fp32_path`` calibrated on ``calibration`` (NCHW).

    ``fuse``: a ``u8`` graph's int8 bank product is written as one ``MatMulIntegerToFloat``
    with its bias (:func:`fuse_bank_product`); False keeps the plain QDQ form.
    """
    import onnx
    from onnxruntime.quantization.calibrate import save_tensors_data

    s = settings or Int8Settings()
    if len(calibration) == 0:
        raise ValueError("calibration needs at least one image")
    with tempfile.TemporaryDirectory(prefix="li-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        names = nodes_to_quantize(onnx.load(str(pre)), s)
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(calibrate(pre, calibration, s), cache)
        extra: dict[str, Any] = {
            "WeightSymmetric": True,
            "ActivationSymmetric": s.activations == "s8",
        }
        if s.bank == "int8":
            # one scale per bank entry; the product stays float (no Q/DQ on its output, so
            # ORT runs MatMulIntegerToFloat): distances are small differences of large terms
            extra["QDQOpTypePerChannelSupportToAxis"] = {"MatMul": 1}
            extra["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
        quantize_static(
            str(pre),
            str(out_path),
            None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS) + (["MatMul"] if s.bank == "int8" else []),
            nodes_to_quantize=names,
            per_channel=s.per_channel,
            activation_type=QuantType.QInt8 if s.activations == "s8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=_METHODS[s.calibration],
            extra_options=extra,
            calibration_cache_path=str(cache),
        )
    if fuse and s.bank == "int8" and s.activations == "u8":
        fuse_bank_product(out_path)
    return out_path


def _is_bank_dq(node: Any) -> bool:
    """Whether ``node`` (or None) is the ``DequantizeLinear`` of the quantized memory bank."""
    return (
        node is not None
        and node.op_type == "DequantizeLinear"
        and str(node.input[0]).startswith(BANK_NAME)
    )


def fuse_bank_product(path: Path) -> bool:
    """Rewrite the QDQ bank product + bias of an INT8 graph as one ``MatMulIntegerToFloat``.

    ``DQ(q) @ DQ(bank) + bank_bias`` becomes ONNX Runtime's contrib operator
    ``MatMulIntegerToFloat(q_u8, bank_s8, q_scale, bank_scales, q_zp, bank_zps, bank_bias)``,
    the same arithmetic with the bias added inside the int8 GEMM's output stage. ONNX Runtime
    fuses the QDQ product into that operator itself but leaves the bias ``Add`` as a separate
    pass over the patches x bank matrix (demo model: 1 024 x 1 000 floats per image, ~6 % of
    the INT8 graph's time). Only for graphs that ONNX Runtime runs: TensorRT does not parse
    ``com.microsoft`` operators (its ``s8`` graphs are never fused). False if there is nothing
    to fuse (already fused, or a float bank).
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for mm in graph.node:
        if mm.op_type != "MatMul" or len(mm.input) != 2:
            continue
        dq_a, dq_b = producers.get(mm.input[0]), producers.get(mm.input[1])
        if dq_a is None or dq_a.op_type != "DequantizeLinear" or not _is_bank_dq(dq_b):
            continue
        assert dq_b is not None
        users = consumers.get(mm.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add" or BANK_BIAS_NAME not in users[0].input:
            raise ValueError(f"{path}: the bank product does not feed the {BANK_BIAS_NAME} Add")
        add = users[0]
        if len(dq_a.input) < 3 or len(dq_b.input) < 3:
            raise ValueError(f"{path}: the bank product's DequantizeLinear lacks a zero point")
        fused = onnx.helper.make_node(
            FUSED_PRODUCT_OP,
            [
                dq_a.input[0],
                dq_b.input[0],
                dq_a.input[1],
                dq_b.input[1],
                dq_a.input[2],
                dq_b.input[2],
                BANK_BIAS_NAME,
            ],
            [add.output[0]],
            name="bank_product",
            domain=FUSED_PRODUCT_DOMAIN,
        )
        at = list(graph.node).index(mm)
        graph.node.insert(at, fused)
        graph.node.remove(mm)
        graph.node.remove(add)
        if len(consumers[dq_b.output[0]]) == 1:
            graph.node.remove(dq_b)
        if not any(o.domain == FUSED_PRODUCT_DOMAIN for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(FUSED_PRODUCT_DOMAIN, 1))
        onnx.save(model, str(path))
        return True
    return False


def _set_constant(model: Any, name: str, value: npt.NDArray[Any]) -> bool:
    """Give the constant ``name`` of ``model`` a new value; False if there is no such constant.

    The TorchScript exporter merges equal constants: a buffer may then be an ``Identity`` of
    another one (e.g. ``g_gain`` of ``inv_scale`` when both are 1.0). Such an ``Identity`` is
    replaced by an initializer of its own, so that the other constant keeps its value.
    """
    from onnx import numpy_helper

    tensor = numpy_helper.from_array(np.asarray(value), name)
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(tensor)
            return True
    inits = {i.name for i in model.graph.initializer}
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Identity" and node.output[0] == name and node.input[0] in inits:
            del model.graph.node[i]
            model.graph.initializer.append(tensor)
            return True
    return False


def set_graph_scale(path: Path, inv_scale: float) -> None:
    """Rewrite the ``inv_scale`` constant (1 / raw_scale) of an exported scoring graph."""
    import onnx

    model = onnx.load(str(path))
    if not _set_constant(model, "inv_scale", np.array(inv_scale, np.float32)):
        raise ValueError(f"{path} has no inv_scale constant")
    onnx.save(model, str(path))


def _bank_matmul_input(model: Any) -> str:
    """The query-feature tensor multiplied with the bank (float or quantized bank)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type == FUSED_PRODUCT_OP and n.input[1].startswith(BANK_NAME):
            q = producers.get(n.input[0])  # the query's QuantizeLinear
            if q is None or q.op_type != "QuantizeLinear":
                raise ValueError(f"the fused bank product's query comes from {q}")
            return str(q.input[0])
        if n.op_type != "MatMul" or len(n.input) != 2:
            continue
        if n.input[1] == BANK_NAME or _is_bank_dq(producers.get(n.input[1])):
            a = producers.get(n.input[0])
            # a quantized query: read the float tensor before its QuantizeLinear
            if a is not None and a.op_type == "DequantizeLinear":
                q = producers.get(a.input[0])
                if q is not None and q.op_type == "QuantizeLinear":
                    return str(q.input[0])
            return str(n.input[0])
    raise ValueError("the graph has no MatMul with the memory bank")


@dataclass(frozen=True)
class _GaussianChain:
    """Tensor names of the image-level Gaussian branch of a scoring graph."""

    pooled: str  # image-pooled features [N, Dg], the input of ``- g_mean``
    distance: str  # Mahalanobis distance [N], the ``Sqrt`` output
    gain_node: str | None  # the ``Mul`` by the gain (None if an optimizer folded a gain of 1)
    add_node: str  # ``patch score + gain x distance``
    patch_score: str  # the patch term [N], the other input of that ``Add``


def _gaussian_chain(model: Any) -> _GaussianChain | None:
    """Find ``sqrt(sum(((pooled - g_mean) @ g_whiten)^2)) -> [x gain] -> + patch score``."""
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in dict.fromkeys(n.input):  # x * x consumes x once
            consumers.setdefault(i, []).append(n)
    sub = next(
        (n for n in model.graph.node if n.op_type == "Sub" and list(n.input[1:]) == ["g_mean"]),
        None,
    )
    if sub is None:
        return None
    node = sub
    while node.op_type != "Sqrt":  # Sub -> MatMul(g_whiten) -> Mul (square) -> ReduceSum -> Sqrt
        nxt = consumers.get(node.output[0], [])
        if len(nxt) != 1 or nxt[0].op_type not in {"MatMul", "Mul", "ReduceSum", "Sqrt"}:
            raise ValueError("unexpected image-level Gaussian branch after g_mean")
        node = nxt[0]
    dist = str(node.output[0])
    (user,) = consumers[dist]
    gain_node = None
    if user.op_type == "Mul":
        gain_node = user
        (user,) = consumers[user.output[0]]
    if user.op_type != "Add":
        raise ValueError(f"the Gaussian term feeds a {user.op_type}, not the score's Add")
    term = gain_node.output[0] if gain_node is not None else dist
    other = [i for i in user.input if i != term]
    if len(other) != 1:
        raise ValueError("the score's Add has no patch-score input")
    return _GaussianChain(
        pooled=str(sub.input[0]),
        distance=dist,
        gain_node=None if gain_node is None else str(gain_node.name),
        add_node=str(user.name),
        patch_score=str(other[0]),
    )


@dataclass(frozen=True)
class GraphFeatures:
    """Intermediate tensors of a scoring graph, read from the graph itself (see
    :func:`graph_features`)."""

    #: Patch features [N * P, D], the bank product's query input.
    patches: npt.NDArray[np.float32]
    #: Image-pooled features [N, Dg] of the Gaussian branch (None without one).
    pooled: npt.NDArray[np.float32] | None
    #: The patch term of the raw image score [N], before the Gaussian term (None without one).
    patch_score: npt.NDArray[np.float32] | None


def graph_features(path: Path, batch: npt.NDArray[np.float32], threads: int = 2) -> GraphFeatures:
    """Patch features, pooled features and patch scores as a scoring graph computes them.

    One pass: the tensors are added as extra outputs of the graph. Run on the INT8 graph, this
    gives what the quantized backbone really produces, so the INT8 graph's memory bank and
    Gaussian can be refitted on it (:func:`set_bank`, :func:`set_gaussian`).
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    chain = _gaussian_chain(model)
    names = [_bank_matmul_input(model)]
    if chain is not None:
        names += [chain.pooled, chain.patch_score]
    for name in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outs = [sess.run(names, {INPUT_NAME: batch[i : i + 8]}) for i in range(0, len(batch), 8)]

    def cat(j: int) -> npt.NDArray[np.float32]:
        return np.ascontiguousarray(np.concatenate([o[j] for o in outs]), dtype=np.float32)

    feats = cat(0)
    return GraphFeatures(
        patches=feats.reshape(-1, feats.shape[-1]),
        pooled=None if chain is None else cat(1).reshape(len(batch), -1),
        patch_score=None if chain is None else cat(2).reshape(len(batch)),
    )


def patch_features(
    path: Path, batch: npt.NDArray[np.float32], threads: int = 2
) -> npt.NDArray[np.float32]:
    """Patch features [N * P, D] as a scoring graph computes them (the bank MatMul's input).

    Run on the INT8 graph, this gives the features the quantized backbone really produces,
    so the INT8 graph's memory bank can be rebuilt from them (see ``set_bank``).
    """
    return graph_features(path, batch, threads).patches


def mahalanobis(
    pooled: npt.NDArray[np.floating[Any]],
    mean: npt.NDArray[np.floating[Any]],
    whiten: npt.NDArray[np.floating[Any]],
) -> npt.NDArray[np.float64]:
    """``|(pooled - mean) @ whiten|`` per row, as the graph computes it (in float64)."""
    z = (np.asarray(pooled, np.float64) - mean) @ np.asarray(whiten, np.float64)
    return np.asarray(np.sqrt((z * z).sum(axis=1)), dtype=np.float64)


def set_gaussian(
    path: Path,
    mean: npt.NDArray[np.floating[Any]],
    whiten: npt.NDArray[np.floating[Any]],
    gain: float,
) -> None:
    """Replace the image-level Gaussian's constants of a scoring graph (FP32 or INT8).

    ``mean`` [Dg] and ``whiten`` [Dg, Dg] (Cholesky factor of the precision) replace ``g_mean``
    and ``g_whiten``; ``gain`` becomes the factor of the Mahalanobis distance in the score. The
    gain gets a constant of its own (``g_gain``) even where the exporter shared one with an
    equal constant or an optimizer folded a gain of 1 away.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    chain = _gaussian_chain(model)
    if chain is None:
        raise ValueError(f"{path} has no image-level Gaussian branch (no g_mean constant)")
    inits = {i.name: i for i in model.graph.initializer}
    old = numpy_helper.to_array(inits["g_mean"]) if "g_mean" in inits else None
    mean = np.asarray(mean, np.float32)
    whiten = np.asarray(whiten, np.float32)
    dim = mean.shape[0] if mean.ndim == 1 else -1
    if old is None or old.shape != mean.shape or whiten.shape != (dim, dim):
        raise ValueError(
            f"Gaussian of shape {mean.shape}, {whiten.shape} does not fit {path} "
            f"(g_mean {None if old is None else old.shape})"
        )
    for name, value in (("g_mean", mean), ("g_whiten", whiten)):
        if not _set_constant(model, name, value):
            raise ValueError(f"{path} has no {name} constant")
    gain_name = "g_gain"
    gain_init = numpy_helper.from_array(np.array(gain, np.float32), gain_name)
    if gain_name in inits:
        inits[gain_name].CopyFrom(gain_init)
    else:
        model.graph.initializer.append(gain_init)
    nodes = list(model.graph.node)
    if chain.gain_node is not None:
        mul = next(n for n in nodes if n.name == chain.gain_node)
        keep = [i for i in mul.input if i != chain.distance]
        if len(keep) != 1:
            raise ValueError("the Gaussian gain Mul has no constant input")
        mul.input[list(mul.input).index(keep[0])] = gain_name
    else:  # a gain of 1 was folded away: put the Mul back, just before the Add
        add = next(n for n in nodes if n.name == chain.add_node)
        term = chain.distance + "_gained"
        mul = onnx.helper.make_node("Mul", [chain.distance, gain_name], [term], name="/g_gain_Mul")
        add.input[list(add.input).index(chain.distance)] = term
        pos = nodes.index(add)
        model.graph.node.insert(pos, mul)
    # drop an Identity that still defines g_gain (the name now has an initializer)
    for i, n in enumerate(model.graph.node):
        if n.op_type == "Identity" and n.output[0] == gain_name:
            del model.graph.node[i]
            break
    onnx.save(model, str(path))


def _quantize_bank(
    bank_t: npt.NDArray[np.float32], dtype: type[np.integer[Any]], per_column: bool
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32]]:
    """Symmetric int8 codes and scale(s) of ``bank_t`` [D, M] (one scale per column/entry)."""
    amax = np.abs(bank_t).max(axis=0) if per_column else np.abs(bank_t).max(keepdims=True)
    scale = (np.maximum(amax, 1e-12) / 127.0).astype(np.float32)
    codes = np.clip(np.rint(bank_t / scale), -127, 127).astype(dtype)
    return codes, scale.reshape(-1) if per_column else scale.reshape(())


def set_bank(path: Path, bank: npt.NDArray[np.float32]) -> None:
    """Replace the memory bank constants (``bank_t``, ``bank_bias``) of a scoring graph.

    A quantized bank (``bank="int8"``) is re-quantized with the same layout; ``bank_bias``
    (``-|b|^2 / 2``) is then computed from the dequantized entries, so
    ``|q|^2 - 2 (q.b - |b|^2 / 2)`` stays the squared distance to what the graph multiplies.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    bank_t = np.ascontiguousarray(bank.T, dtype=np.float32)
    inits = {i.name: i for i in model.graph.initializer}
    new: dict[str, npt.NDArray[Any]] = {}
    deq = bank_t
    if BANK_NAME in inits:
        new[BANK_NAME] = bank_t
    else:
        q_name = next((n for n in inits if n.startswith(BANK_NAME) and "quantized" in n), None)
        if q_name is not None:
            # the bank's scale and zero point: inputs 1, 2 of its DequantizeLinear, or 3, 5
            # of the fused product (see fuse_bank_product)
            user = next(n for n in model.graph.node if q_name in n.input[:2])
            if user.op_type == FUSED_PRODUCT_OP:
                scale_name, zp_name = user.input[3], user.input[5]
            else:
                scale_name = user.input[1]
                zp_name = user.input[2] if len(user.input) > 2 else ""
            old_scale = numpy_helper.to_array(inits[scale_name])
            dtype = numpy_helper.to_array(inits[q_name]).dtype.type
            codes, scale = _quantize_bank(bank_t, dtype, per_column=old_scale.ndim == 1)
            new[q_name] = codes
            new[scale_name] = scale
            if zp_name:
                new[zp_name] = np.zeros(scale.shape, dtype)
            deq = codes.astype(np.float32) * scale
    new[BANK_BIAS_NAME] = (-0.5 * (deq.astype(np.float32) ** 2).sum(0)).astype(np.float32)
    done = set()
    for init in model.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name], init.name))
            done.add(init.name)
    if BANK_NAME not in done and not any(n.startswith(BANK_NAME) for n in done):
        raise ValueError(f"{path} lacks bank constants {[BANK_NAME, BANK_BIAS_NAME]}")
    if BANK_BIAS_NAME not in done:
        raise ValueError(f"{path} lacks bank constants [{BANK_BIAS_NAME!r}]")
    del model.graph.value_info[:]  # inferred shapes may name the old bank size
    onnx.save(model, str(path))


def quantized_op_types(path: Path) -> dict[str, int]:
    """Op types running on int8 data, with counts: the ones fed by a ``DequantizeLinear``,
    and the fused bank product (``MatMulIntegerToFloat``, fed by the quantized tensors)."""
    import onnx

    model = onnx.load(str(path))
    producers = {o: n for n in model.graph.node for o in n.output}
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in {"QuantizeLinear", "DequantizeLinear"}:
            continue
        if n.op_type == FUSED_PRODUCT_OP:  # int8 inputs without a DequantizeLinear
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
            continue
        p = producers.get(n.input[0]) if n.input else None
        if p is not None and p.op_type == "DequantizeLinear":
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


__all__: Sequence[str] = (
    "BACKBONE_SCOPE",
    "QUANTIZED_OPS",
    "GraphFeatures",
    "Int8Settings",
    "backbone_nodes",
    "calibrate",
    "fuse_bank_product",
    "graph_features",
    "mahalanobis",
    "nodes_to_quantize",
    "patch_features",
    "quantize_int8",
    "quantized_op_types",
    "set_bank",
    "set_gaussian",
    "set_graph_scale",
)
