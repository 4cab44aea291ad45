"""The quantized ImageNet MobileNetV2 TFLite files (../shared/weights) converted to medjax variables.

Two independent checks: the documented top-1 of the three test pictures (../shared/data/README.md), and
the class probabilities of the reference LiteRT interpreter on the same uint8 pictures (ours get the
graph's own input dequantization, so both see identical real inputs).

Tolerance. The interpreter runs in int8/uint8: every layer's output is requantized (rounding to one step
of its scale, e.g. 0.0235 after each ReLU6), and the softmax output itself has steps of 1/256. Ours is
float32 on the dequantized weights, i.e. the network the quantized weights define without activation
rounding. So probabilities are compared, not bits: the top-1 must agree, the classes the interpreter
gives at least 5 output steps (0.02) must lead our ranking in its order (below that, its ties and
one-step noise make ranks arbitrary), and the largest probability difference must stay within
:data:`MAX_PROB_DIFF`: 0.02 for the quantization-aware-trained file (trained with those roundings in the
forward pass, measured 0.009) and 0.1 for the post-training-quantized one (its activation roundings were
never trained against; measured 0.063, on the cat's 0.61 vs 0.67 'Egyptian cat').
A corrupted mapping (two blocks swapped, a spatially transposed stem kernel, the folded bias lost) breaks
these criteria.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from medjax.data.transforms import ScaleAndNormalize
from medjax.models import convert, get_model
from medjax.models.convert import tables, tflite
from tests.conftest import shared_weights_dir

WEIGHTS = shared_weights_dir() / "imagenet_mobilenet_v2"
QAT, PTQ = "mobilenet_v2_1.0_224_quant.tflite", "tf2_mobilenet_v2_1.0_224_ptq.tflite"
PICTURES = {"cat.bmp": "Egyptian cat", "grace_hopper.bmp": "military uniform", "bird.bmp": "chickadee"}
MAX_PROB_DIFF = {QAT: 0.02, PTQ: 0.1}
CLEAR = 0.02  # Interpreter probabilities above this (5 output steps) must lead our ranking in order.

pytestmark = pytest.mark.skipif(not WEIGHTS.is_dir(), reason=f"no pretrained weights at {WEIGHTS}")


def _model(**overrides):
    # depthwise_impl='xla' compiles the 224-px forward pass faster than the patch convolutions; both are
    # pinned equal in test_depthwise.py.
    kwargs = dict(padding_style="tf", dropout_rate=0.0, depthwise_impl="xla") | overrides
    return get_model("mobilenet_v2", num_classes=kwargs.pop("num_classes", 1001), **kwargs)


def _target(model) -> dict:
    """Arrays shaped like ``model``'s variables (filled with 0.5: tracing the init is enough)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
    return jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes)


def _load(path, model, target) -> dict:
    return convert.load_pretrained(str(path), model_name="mobilenet_v2", target_variables=target, model=model)


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def target(model) -> dict:
    return _target(model)


@pytest.fixture(scope="module")
def converted(model, target) -> dict:
    return {name: _load(WEIGHTS / name, model, target) for name in (QAT, PTQ)}


@pytest.fixture(scope="module")
def pictures() -> np.ndarray:
    """The three pictures, RGB, resized to 224x224, uint8."""
    return np.stack(
        [
            np.asarray(Image.open(WEIGHTS / name).convert("RGB").resize((224, 224), Image.BILINEAR))
            for name in PICTURES
        ]
    )


@pytest.fixture(scope="module")
def probabilities(model):
    return jax.jit(lambda variables, x: jax.nn.softmax(model.apply(variables, x, train=False)[0]))


@pytest.fixture(scope="module")
def reference(pictures) -> dict:
    """LiteRT's dequantized output probabilities, per file."""
    interpreter_lib = pytest.importorskip("ai_edge_litert.interpreter")
    out = {}
    for name in (QAT, PTQ):
        interpreter = interpreter_lib.Interpreter(model_path=str(WEIGHTS / name))
        interpreter.allocate_tensors()
        (inp,), (output,) = interpreter.get_input_details(), interpreter.get_output_details()
        scale, zero_point = output["quantization"]
        rows = []
        for picture in pictures:
            interpreter.set_tensor(inp["index"], picture[None])
            interpreter.invoke()
            rows.append((interpreter.get_tensor(output["index"])[0].astype(np.float32) - zero_point) * scale)
        out[name] = np.stack(rows)
    return out


def _graph_input(name: str, pictures: np.ndarray) -> np.ndarray:
    graph = tflite.read_graph(WEIGHTS / name)
    return graph.tensors[graph.inputs[0]].dequantize(pictures)


def _disagreements(ours: np.ndarray, expected: np.ndarray, max_diff: float) -> list[str]:
    """Where ``ours`` violates the module's criterion against the interpreter's probabilities."""
    problems = []
    for i, (o, e) in enumerate(zip(ours, expected, strict=True)):
        clear = [c for c in np.argsort(-e, kind="stable") if e[c] >= CLEAR]
        if list(np.argsort(-o)[: len(clear)]) != clear:
            problems.append(f"picture {i}: our ranking {np.argsort(-o)[:5]} vs interpreter's {clear}")
    diff = float(np.abs(ours - expected).max())
    if diff > max_diff:
        problems.append(f"max |probability difference| {diff:.4f} > {max_diff}")
    return problems


@pytest.mark.parametrize("name", [QAT, PTQ])
def test_documented_top1(name, converted, pictures, probabilities):
    """With medjax's own input scaling (mean 0.5, std 0.5 after [0, 1]) as SOURCE_EXPECTS says."""
    x = ScaleAndNormalize(mean=0.5, std=0.5).map({"image": pictures})["image"]
    labels = (WEIGHTS / "imagenet_labels.txt").read_text().splitlines()
    assert len(labels) == 1001 and labels[0] == "background"
    top1 = np.asarray(probabilities(converted[name], x)).argmax(-1)
    assert [labels[i] for i in top1] == list(PICTURES.values())


@pytest.mark.parametrize("name", [QAT, PTQ])
def test_probabilities_agree_with_litert(name, converted, pictures, probabilities, reference):
    ours = np.asarray(probabilities(converted[name], _graph_input(name, pictures)))
    np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-5)
    assert _disagreements(ours, reference[name], MAX_PROB_DIFF[name]) == []


def _swap_blocks(flat: dict) -> dict:
    """block_14 <-> block_15 (same shapes: 160 channels, expansion 6)."""
    renamed = {}
    for path, value in flat.items():
        block = {"block_14": "block_15", "block_15": "block_14"}.get(path[1], path[1])
        renamed[(path[0], block, *path[2:])] = value
    return renamed


def _transpose_stem(flat: dict) -> dict:
    return {**flat, ("params", "stem", "kernel"): flat["params", "stem", "kernel"].transpose(1, 0, 2, 3)}


def _drop_folded_bias(flat: dict) -> dict:
    path = ("params", "block_3", "project_bn", "bias")
    return {**flat, path: jnp.zeros_like(flat[path])}


@pytest.mark.parametrize("corrupt", [_swap_blocks, _transpose_stem, _drop_folded_bias])
def test_wrong_mapping_fails(corrupt, converted, pictures, probabilities, reference):
    flat = traverse_util.flatten_dict(converted[QAT])
    wrong = traverse_util.unflatten_dict(corrupt(flat))
    ours = np.asarray(probabilities(wrong, _graph_input(QAT, pictures)))
    assert _disagreements(ours, reference[QAT], MAX_PROB_DIFF[QAT])


@pytest.mark.parametrize("epsilon", [1e-3, 1e-5, 0.1])
def test_folded_batch_norm_is_an_exact_identity_plus_bias(epsilon):
    """Evaluation-mode BatchNorm (what MobileNetV2 evaluates with) computes exactly ``x + bias``."""
    bias = np.array([0.25, -1.5, 3.0], np.float32)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32) * 7
    scale, beta, mean, var = tflite._identity_batch_norm(bias, epsilon)
    variables = {"params": {"scale": scale, "bias": beta}, "batch_stats": {"mean": mean, "var": var}}
    y = nn.BatchNorm(use_running_average=True, epsilon=epsilon).apply(variables, x)
    np.testing.assert_array_equal(np.asarray(y), x + bias)


def test_dequantize_per_channel_and_per_tensor():
    q = np.array([[[[0, 10]], [[-5, 127]]]], np.int8)  # (1, 2, 1, 2): channels on the last axis
    per_channel = tflite.Tensor("w", q.shape, np.int8, q, np.float32([0.5, 0.25]), np.int64([0, 2]), 3)
    np.testing.assert_array_equal(per_channel.dequantize(), [[[[0.0, 2.0]], [[-2.5, 31.25]]]])
    u = np.array([0, 128, 255], np.uint8)
    per_tensor = tflite.Tensor("x", u.shape, np.uint8, u, np.float32([1 / 128]), np.int64([128]), 0)
    np.testing.assert_array_equal(per_tensor.dequantize(), [-1.0, 0.0, 127 / 128])


def test_another_class_count_reinitialises_the_head(model, target, capsys):
    two = jax.tree.map(np.copy, target)
    two["params"]["classifier"] = {
        "kernel": np.full((1280, 2), 0.5, np.float32),
        "bias": np.zeros(2, np.float32),
    }
    variables = _load(WEIGHTS / QAT, dataclasses.replace(model, num_classes=2), two)
    np.testing.assert_array_equal(
        variables["params"]["classifier"]["kernel"], two["params"]["classifier"]["kernel"]
    )
    assert not np.array_equal(variables["params"]["stem"]["kernel"], target["params"]["stem"]["kernel"])
    out = capsys.readouterr().out
    assert "classifier/kernel (source (1280, 1001), model (1280, 2))" in out
    assert "(scheme 'tflite')" in out and "padding_style='tf'" in out and "mean=0.5, std=0.5" in out


def test_clear_errors(model, target, tmp_path):
    junk = tmp_path / "weights.tflite"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(tflite.TFLiteError, match="is not a TFLite model"):
        _load(junk, model, target)
    with pytest.raises(tflite.TFLiteError, match="set --config.model.padding_style=tf"):
        _load(WEIGHTS / QAT, dataclasses.replace(model, padding_style="torch"), target)
    narrow = _model(width_multiplier=0.5)
    with pytest.raises(convert.PretrainedMismatchError) as error:
        _load(WEIGHTS / QAT, narrow, _target(narrow))
    assert "(scheme 'tflite') do not fit mobilenet_v2" in str(error.value)
    assert "params/stem/kernel <- Conv1[0]: source (3, 3, 3, 32), model (3, 3, 3, 16)" in str(error.value)
    with pytest.raises(ValueError, match="mobilenet_v2 only"):
        convert.load_pretrained(str(WEIGHTS / QAT), model_name="convnext", target_variables={"params": {}})


def test_graph_that_is_not_mobilenet_v2():
    """The real graph altered: the first expansion without its ReLU6, then the last layers removed."""
    graph = tflite.read_graph(WEIGHTS / QAT)
    slots = tables.mobilenet_v2_slots({})
    ops = list(graph.operators)
    i = next(i for i, op in enumerate(ops) if "expanded_conv_1/expand" in graph.tensors[op.inputs[1]].name)
    ops[i] = dataclasses.replace(ops[i], activation="none")
    with pytest.raises(tflite.TFLiteError, match=r"block_1/expand .*fused activation none, expected relu6"):
        tflite.graph_layers(dataclasses.replace(graph, operators=ops), slots, bn_epsilon=1e-3)
    with pytest.raises(tflite.TFLiteError, match="has 52 weight layers .*; MobileNetV2 has 53"):
        tflite.graph_layers(dataclasses.replace(graph, operators=ops[:-4]), slots, bn_epsilon=1e-3)
