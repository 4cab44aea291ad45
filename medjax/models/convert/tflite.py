"""Quantized TFLite MobileNetV2 (BatchNorm folded, ReLU6 fused) -> Keras-named float arrays.

A TFLite file is a FlatBuffer of the ``tflite/schema.fbs`` schema; this reader walks its tables through
their vtables with ``flatbuffers.table.Table`` (no TensorFlow / LiteRT at run time) and reads only:

==========================  ==============================================================================
table                       fields (schema id)
==========================  ==============================================================================
Model                       operator_codes (1), subgraphs (2), buffers (4)
OperatorCode                deprecated_builtin_code (0), builtin_code (3): the op is the larger of the two
SubGraph                    tensors (0), inputs (1), outputs (2), operators (3)
Tensor                      shape (0), type (1), buffer (2), name (3), quantization (4)
QuantizationParameters      scale (2), zero_point (3), quantized_dimension (6)
Buffer                      data (0); offset (1) and size (2) for data stored after the FlatBuffer
Operator                    opcode_index (0), inputs (1), outputs (2), builtin_options (4)
Conv2DOptions               padding (0), stride_w (1), stride_h (2), fused_activation_function (3),
                            dilation_w_factor (4), dilation_h_factor (5)
DepthwiseConv2DOptions      padding (0), stride_w (1), stride_h (2), depth_multiplier (3),
                            fused_activation_function (4), dilation_w_factor (5), dilation_h_factor (6)
FullyConnectedOptions       fused_activation_function (0)
==========================  ==============================================================================

Constant tensors are dequantized as ``scale * (q - zero_point)``, per tensor or per channel along
``quantized_dimension`` (int8 per-channel weights of post-training quantization, uint8 per-tensor weights
with a zero point of quantization-aware training, int32 biases with scale ``input_scale * weight_scale``).

The weight layers (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED) of a MobileNetV2 form one chain, so in
execution order they are exactly the slots of :func:`medjax.models.convert.tables.mobilenet_v2_slots`;
each is checked against its slot (op type, stride, fused activation) and delivered under the slot's Keras
name, so the generic Keras mapper and its mismatch report do the rest. Layouts: TFLite convolutions are
OHWI and depthwise (1, kh, kw, C), so ``transpose(1, 2, 3, 0)`` gives Keras' HWIO and (kh, kw, C, 1);
FULLY_CONNECTED is (out, in); TF-slim's classifier is a 1x1 CONV_2D on the pooled vector.

Folded BatchNorm. The files hold ``kernel * gamma / sigma`` and ``beta - mean * gamma / sigma``; gamma,
beta and the statistics cannot be recovered separately. Each medjax BatchNorm becomes the identity plus
the folded bias: ``scale = 1, bias = b, mean = 0, var = 1 - epsilon`` (rounded so that
``var + epsilon == 1`` in float32), so in evaluation the model computes exactly ``conv(x) + b``, the
network the file describes, at any BatchNorm epsilon. Not chosen: ``var = 1`` (off by ``sqrt(1 + eps)``
per layer, compounding over 52 layers), or guessing statistics without data.

What it means for fine-tuning: in training mode medjax's BatchNorm normalises with the batch's statistics,
frozen or not, and those of a folded convolution's output are far from (0, 1): the training pass would
standardise every channel (losing gamma's magnitude and the learned shift) and not compute the pretrained
network, while evaluation does; a frozen BatchNorm would keep that mismatch for the whole run. So a
``.tflite`` start re-measures the statistics on the task's training images before training
(:func:`medjax.models.convert.calibrate.calibrate_batch_norm`, ``init_from.calibrate_images``): evaluation
is unchanged, and the training pass computes the pretrained network on batches like those. Freezing the
calibrated statistics (``optim.freeze_batch_stats`` for frozen blocks) is then the usual transfer choice.
"""

import dataclasses
import itertools
import mmap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flatbuffers import number_types as N
from flatbuffers.table import Table

from medjax.errors import MedjaxError
from medjax.models.convert.tables import Slot
from medjax.models.mobilenet_v2 import INVERTED_RESIDUAL_SETTINGS, conv_padding

FILE_IDENTIFIER = b"TFL3"
# BuiltinOperator codes (schema.fbs) of the ops a MobileNetV2 classifier graph is made of.
BUILTIN_OPS = {
    0: "ADD",
    1: "AVERAGE_POOL_2D",
    3: "CONV_2D",
    4: "DEPTHWISE_CONV_2D",
    6: "DEQUANTIZE",
    9: "FULLY_CONNECTED",
    21: "RELU6",
    22: "RESHAPE",
    25: "SOFTMAX",
    34: "PAD",
    40: "MEAN",
    43: "SQUEEZE",
    114: "QUANTIZE",
}
WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
TENSOR_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 7: np.int16, 9: np.int8}
ACTIVATIONS = {0: "none", 1: "relu", 2: "relu_n1_to_1", 3: "relu6", 4: "tanh"}
PADDINGS = {0: "SAME", 1: "VALID"}
# Option field ids per op: (padding, stride_w, stride_h, fused activation, dilation_w, dilation_h).
OPTION_FIELDS = {"CONV_2D": (0, 1, 2, 3, 4, 5), "DEPTHWISE_CONV_2D": (0, 1, 2, 4, 5, 6)}


class TFLiteError(MedjaxError, ValueError):
    """A TFLite file that is not a MobileNetV2 this converter reads (the message says what differs)."""


class _Node:
    """A FlatBuffer table: fields by schema id (vtable slot ``4 + 2 * id``), defaults when absent."""

    def __init__(self, buf, pos: int):
        self.t = Table(buf, pos)

    def _at(self, field: int) -> int:
        return self.t.Offset(4 + 2 * field)

    def scalar(self, field: int, flags, default=0):
        off = self._at(field)
        return self.t.Get(flags, self.t.Pos + off) if off else default

    def node(self, field: int) -> "_Node | None":
        off = self._at(field)
        return _Node(self.t.Bytes, self.t.Indirect(self.t.Pos + off)) if off else None

    def nodes(self, field: int) -> list["_Node"]:
        off = self._at(field)
        if not off:
            return []
        start = self.t.Vector(off)
        return [_Node(self.t.Bytes, self.t.Indirect(start + 4 * i)) for i in range(self.t.VectorLen(off))]

    def array(self, field: int, dtype) -> np.ndarray:
        off = self._at(field)
        if not off:
            return np.zeros(0, dtype)
        return np.frombuffer(self.t.Bytes, dtype, self.t.VectorLen(off), self.t.Vector(off))

    def string(self, field: int) -> str:
        off = self._at(field)
        return self.t.String(self.t.Pos + off).decode() if off else ""


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A graph tensor; ``data`` holds the raw constant (None for activations)."""

    name: str
    shape: tuple[int, ...]
    dtype: type
    data: np.ndarray | None
    scale: np.ndarray
    zero_point: np.ndarray
    quantized_dimension: int

    def dequantize(self, values: np.ndarray | None = None) -> np.ndarray:
        """``scale * (q - zero_point)`` (per channel along ``quantized_dimension``) as float32; float
        tensors as they are. ``values`` defaults to the constant."""
        q = self.data if values is None else values
        if q is None:
            raise TFLiteError(f"Tensor {self.name!r} is not a constant.")
        if not self.scale.size:
            return q.astype(np.float32)
        shape = [1] * q.ndim
        if self.scale.size > 1:
            shape[self.quantized_dimension] = -1
        scale = self.scale.astype(np.float64).reshape(shape)
        zero_point = self.zero_point.astype(np.float64).reshape(shape) if self.zero_point.size else 0.0
        return (scale * (q.astype(np.float64) - zero_point)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Operator:
    """An op: its builtin name, tensor indices (-1: absent optional input) and the options read."""

    op: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    padding: str = "SAME"
    strides: tuple[int, int] = (1, 1)
    activation: str = "none"
    dilation: tuple[int, int] = (1, 1)
    depth_multiplier: int = 1


@dataclasses.dataclass(frozen=True)
class Graph:
    """The first subgraph of a TFLite model."""

    tensors: list[Tensor]
    operators: list[Operator]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    def producer(self, tensor: int) -> Operator | None:
        return next((op for op in self.operators if tensor in op.outputs), None)


def _buffer_data(buffer: _Node, buf) -> np.ndarray | None:
    data = buffer.array(0, np.uint8)
    offset, size = buffer.scalar(1, N.Uint64Flags), buffer.scalar(2, N.Uint64Flags)
    if offset > 1:  # Large models keep constants after the FlatBuffer, addressed from the file start.
        data = np.frombuffer(buf, np.uint8, size, offset)
    return data if data.size else None


def _operator(node: _Node, codes: list[str]) -> Operator:
    op = codes[node.scalar(0, N.Uint32Flags)]
    fields = dict(
        op=op,
        inputs=tuple(int(i) for i in node.array(1, np.int32)),
        outputs=tuple(int(i) for i in node.array(2, np.int32)),
    )
    options = node.node(4)
    if op in OPTION_FIELDS and options is not None:
        pad, sw, sh, act, dw, dh = OPTION_FIELDS[op]
        fields.update(
            padding=PADDINGS[options.scalar(pad, N.Int8Flags)],
            strides=(options.scalar(sh, N.Int32Flags), options.scalar(sw, N.Int32Flags)),
            activation=ACTIVATIONS.get(options.scalar(act, N.Int8Flags), "other"),
            dilation=(options.scalar(dh, N.Int32Flags, 1), options.scalar(dw, N.Int32Flags, 1)),
        )
        if op == "DEPTHWISE_CONV_2D":
            fields["depth_multiplier"] = options.scalar(3, N.Int32Flags)
    elif op == "FULLY_CONNECTED" and options is not None:
        fields["activation"] = ACTIVATIONS.get(options.scalar(0, N.Int8Flags), "other")
    return Operator(**fields)


def read_graph(path: str | Path) -> Graph:
    """The first subgraph of a ``.tflite`` file, its constants dequantizable (module docstring).

    Raises:
      TFLiteError: for a file that is not a TFLite model, or one with ops outside :data:`BUILTIN_OPS`.
    """
    path = Path(path)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if len(buf) < 8 or buf[4:8] != FILE_IDENTIFIER:
        raise TFLiteError(
            f"{path} is not a TFLite model (no {FILE_IDENTIFIER.decode()!r} FlatBuffer identifier at byte 4)."
        )
    model = _Node(buf, int.from_bytes(buf[0:4], "little"))
    codes = []
    for code in model.nodes(1):
        number = max(code.scalar(0, N.Int8Flags), code.scalar(3, N.Int32Flags))
        codes.append(BUILTIN_OPS.get(number, f"builtin op {number}" if number != 32 else code.string(1)))
    unsupported = sorted(set(codes) - set(BUILTIN_OPS.values()))
    if unsupported:
        raise TFLiteError(
            f"{path} uses ops this converter does not read: {unsupported}; a MobileNetV2 classifier is "
            f"made of {sorted(BUILTIN_OPS.values())}."
        )
    subgraphs = model.nodes(2)
    if not subgraphs:
        raise TFLiteError(f"{path} has no subgraph.")
    buffers = [_buffer_data(b, buf) for b in model.nodes(4)]
    tensors = []
    for node in subgraphs[0].nodes(0):
        dtype = TENSOR_TYPES.get(node.scalar(1, N.Int8Flags))
        shape = tuple(int(d) for d in node.array(0, np.int32))
        raw = buffers[node.scalar(2, N.Uint32Flags)]
        quant = node.node(4)
        tensors.append(
            Tensor(
                name=node.string(3),
                shape=shape,
                dtype=dtype,
                data=None if raw is None or dtype is None else raw.view(dtype).reshape(shape),
                scale=quant.array(2, np.float32) if quant else np.zeros(0, np.float32),
                zero_point=quant.array(3, np.int64) if quant else np.zeros(0, np.int64),
                quantized_dimension=quant.scalar(6, N.Int32Flags) if quant else 0,
            )
        )
    return Graph(
        tensors=tensors,
        operators=[_operator(op, codes) for op in subgraphs[0].nodes(3)],
        inputs=tuple(int(i) for i in subgraphs[0].array(1, np.int32)),
        outputs=tuple(int(i) for i in subgraphs[0].array(2, np.int32)),
    )


def _identity_batch_norm(bias: np.ndarray, epsilon: float) -> list[np.ndarray]:
    """Keras-ordered (gamma, beta, moving mean, moving variance) of a BatchNorm computing ``x + bias``:
    the variance is ``1 - epsilon`` nudged until ``var + epsilon`` is exactly 1 in float32."""
    eps = np.float32(epsilon)
    var = np.float32(1) - eps
    while var + eps != np.float32(1):
        var = np.nextafter(var, np.float32(2) if var + eps < 1 else np.float32(0))
    n = bias.shape[0]
    return [np.ones(n, np.float32), bias, np.zeros(n, np.float32), np.full(n, var, np.float32)]


def _expected_strides(slots: Sequence[Slot]) -> dict[tuple[str, ...], int]:
    """Stride of each strided slot's convolution: the stem and each stage's first depthwise."""
    strides = {("stem",): 2}
    index = 0
    for _, _, repeats, stride in INVERTED_RESIDUAL_SETTINGS:
        strides[(f"block_{index}", "depthwise")] = stride
        index += repeats
    return {s.path: strides.get(s.path, 1) for s in slots if s.kind in ("conv", "depthwise")}


def _padding_style(graph: Graph, op: Operator, path: Sequence[str]) -> str | None:
    """'tf' or 'torch' for a stride-2 3x3 convolution (None when both styles pad alike)."""
    x = graph.tensors[op.inputs[0]]
    size = x.shape[1:3]
    if op.padding == "SAME":
        pads = conv_padding(size, kernel=3, stride=op.strides[0], style="tf")
    else:  # VALID after an explicit PAD (Keras' ZeroPadding2D, or a PyTorch export).
        pad_op = graph.producer(op.inputs[0])
        pads = ((0, 0), (0, 0))
        if pad_op is not None and pad_op.op == "PAD":
            pads = tuple(map(tuple, graph.tensors[pad_op.inputs[1]].data[1:3].tolist()))
            size = graph.tensors[pad_op.inputs[0]].shape[1:3]
    styles = [s for s in ("tf", "torch") if conv_padding(size, kernel=3, stride=2, style=s) == pads]
    if not styles:
        raise TFLiteError(f"{'/'.join(path)} ({op.op}) pads {pads} at size {size}: neither 'tf' nor 'torch'.")
    return styles[0] if len(styles) == 1 else None


def _check(graph: Graph, op: Operator, slot: Slot, stride: int) -> None:
    """Raises when ``op`` cannot be the layer of ``slot``."""
    name = "/".join(slot.path)
    weight = graph.tensors[op.inputs[1]]
    wanted = {
        "depthwise": ("DEPTHWISE_CONV_2D",),
        "conv": ("CONV_2D",),
        "dense": ("FULLY_CONNECTED", "CONV_2D"),
    }
    # Every convolution is followed by ReLU6 except the linear bottleneck projections and the classifier.
    activation = "none" if slot.path[-1] == "project" or slot.kind == "dense" else "relu6"
    problems = []
    if op.op not in wanted[slot.kind]:
        problems.append(f"op {op.op}, expected {' or '.join(wanted[slot.kind])}")
    if op.activation != activation:
        problems.append(f"fused activation {op.activation}, expected {activation}")
    if slot.kind != "dense" and op.strides != (stride, stride):
        problems.append(f"strides {op.strides}, expected {(stride, stride)}")
    if op.dilation != (1, 1) or op.depth_multiplier != 1:
        problems.append(f"dilation {op.dilation} / depth multiplier {op.depth_multiplier}, expected 1")
    if weight.data is None:
        problems.append("its weights are not a constant")
    if problems:
        raise TFLiteError(f"The layer for {name} ({weight.name!r}) does not fit: {'; '.join(problems)}.")


def mobilenet_v2_layers(
    path: str | Path, slots: Sequence[Slot], *, bn_epsilon: float, padding_style: str | None = None
) -> dict[str, list[np.ndarray]]:
    """Keras layer name -> weights in Keras layout, from a quantized MobileNetV2 ``.tflite``.

    Args:
      path: the ``.tflite`` file.
      slots: :func:`medjax.models.convert.tables.mobilenet_v2_slots`.
      bn_epsilon: the target model's BatchNorm epsilon, for the identity BatchNorms (module docstring).
      padding_style: the target model's; raises if the graph pads its stride-2 convolutions otherwise.

    Raises:
      TFLiteError: not a TFLite file, or not MobileNetV2 (another op, layer count, stride or activation),
        or another padding convention.
    """
    return graph_layers(
        read_graph(path), slots, bn_epsilon=bn_epsilon, padding_style=padding_style, path=path
    )


def graph_layers(
    graph: Graph,
    slots: Sequence[Slot],
    *,
    bn_epsilon: float,
    padding_style: str | None = None,
    path: str | Path = "the graph",
) -> dict[str, list[np.ndarray]]:
    """:func:`mobilenet_v2_layers` of a graph already read (``path`` names it in errors)."""
    ops = [op for op in graph.operators if op.op in WEIGHT_OPS]
    weighted = [s for s in slots if s.kind in ("conv", "depthwise", "dense")]
    if len(ops) != len(weighted):
        raise TFLiteError(
            f"{path} has {len(ops)} weight layers ({', '.join(WEIGHT_OPS)}); MobileNetV2 has {len(weighted)} "
            "(stem, 17 inverted residual blocks, last 1x1 convolution, classifier)."
        )
    strides = _expected_strides(slots)
    bn_after = {a.path: b for a, b in itertools.pairwise(slots) if b.kind == "bn"}
    layers: dict[str, list[np.ndarray]] = {}
    styles = set()
    for op, slot in zip(ops, weighted, strict=True):
        _check(graph, op, slot, strides.get(slot.path, 1))
        if op.strides == (2, 2):
            styles.add(_padding_style(graph, op, slot.path))
        weight = graph.tensors[op.inputs[1]]
        kernel = weight.dequantize()
        bias_index = op.inputs[2] if len(op.inputs) > 2 else -1
        n = kernel.shape[0] if op.op != "DEPTHWISE_CONV_2D" else kernel.shape[-1]
        bias = graph.tensors[bias_index].dequantize() if bias_index >= 0 else np.zeros(n, np.float32)
        if slot.kind == "dense":
            layers[slot.names["keras"]] = [kernel.reshape(kernel.shape[0], -1).T, bias]
            continue
        layers[slot.names["keras"]] = [kernel.transpose(1, 2, 3, 0)]
        layers[bn_after[slot.path].names["keras"]] = _identity_batch_norm(bias, bn_epsilon)
    styles.discard(None)
    if len(styles) > 1:
        raise TFLiteError(f"{path} mixes padding conventions {sorted(styles)}.")
    if padding_style is not None and styles and styles != {padding_style}:
        (found,) = styles
        raise TFLiteError(
            f"{path} pads its stride-2 convolutions {found!r}-style ('tf': TensorFlow 'SAME', one pixel "
            f"bottom/right at even sizes; 'torch': one on every side) but the model has "
            f"padding_style={padding_style!r}: set --config.model.padding_style={found}."
        )
    return layers
