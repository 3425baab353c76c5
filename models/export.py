"""Export the whole PatchCore scoring graph to ONNX (float32, and a float16 variant).

The graph has the input and outputs of ``docs/model-package.md``: ``image`` [N, C, H, W]
float32 in, ``score`` [N] and ``anomaly_map`` [N, H, W] float32 out; the batch dimension is
dynamic, the spatial size fixed. The memory bank is a constant initializer of the graph.

Train-only module: it imports torch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from models.patchcore import PatchCoreGraph

#: Opset of exported graphs (ONNX Runtime >= 1.14 and TensorRT 10 both support it).
OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "anomaly_map")

#: Ops kept in float32 in the FP16 graph: the nearest-neighbour distance part, where a
#: difference of large squared norms loses too much precision in half floats.
FP16_FLOAT_OPS = [
    "MatMul",
    "ReduceMin",
    "ReduceMax",
    "Sqrt",
    "Sub",
    "Add",
    "Mul",
    "ReduceSum",
    "Max",
    "Clip",
]


def export_fp32(graph: PatchCoreGraph, path: Path) -> Path:
    """Write the float32 scoring graph to ``path`` (one self-contained .onnx file)."""
    graph.eval()
    cfg = graph.cfg
    dummy = torch.zeros(1, cfg.in_channels, *cfg.input_hw, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="li-export-") as tmp, torch.no_grad():
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            graph,
            (dummy,),
            str(raw),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {0: "N"}, "score": {0: "N"}, "anomaly_map": {0: "N"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
        model = onnx.load(str(raw))
    model.producer_name = "lineinspect"
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def export_fp16(fp32_path: Path, path: Path) -> Path:
    """Convert a float32 graph to float16 with float32 input/output and a float32 NN part.

    Input and outputs stay float32 (the contract); the backbone runs in float16; the bank
    distance ops listed in :data:`FP16_FLOAT_OPS` stay float32 (a difference of large squared
    norms is not precise enough in half floats).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    half = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=FP16_FLOAT_OPS, disable_shape_infer=False
    )
    _toposort(half.graph)
    onnx.checker.check_model(half)
    onnx.save(half, str(path))
    return path


def _toposort(graph: onnx.GraphProto) -> None:
    """Drop duplicated casts and reorder ``graph.node`` topologically (float16 converter fix)."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    # The converter may emit the same Cast twice (same input, same output name): keep one.
    seen: set[str] = set()
    pending = []
    for n in graph.node:
        key = f"{n.op_type}|{','.join(n.input)}|{','.join(n.output)}"
        if key not in seen:
            seen.add(key)
            pending.append(n)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ValueError("graph has a cycle or a dangling input")
        for n in ready:
            known.update(n.output)
        ordered.extend(ready)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def torch_scores(graph: PatchCoreGraph, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores and maps of the PyTorch graph for a preprocessed batch (for parity checks)."""
    with torch.no_grad():
        score, amap = graph(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
    return score.numpy(), amap.numpy()
