"""Pretrained-weight conversion (:mod:`medjax.models.convert`) pinned against independent sources.

Keras 3 (JAX backend) is the independent implementation: its ``keras.applications`` MobileNetV2 and
ConvNeXtTiny, randomly initialised with every 1-D weight (BatchNorm statistics, LayerNorm, biases, layer
scale) drawn at random too, must give the same logits as medjax after conversion: **max |logit
difference| <= 1e-4 x max(1, std of the Keras logits)**, i.e. 1e-4 absolute for unit-scale logits and
1e-4 relative to the logit scale beyond. The logits have a standard deviation of 1.5 to 3.2 and their
input-dependent part one of at least 0.1 (asserted), so no constant offset can pass for agreement.
Measured (2 cores, jax 0.10.2): MobileNetV2 3.6e-5 (224) / 5.1e-5 (64); ConvNeXt-T 2.6e-6 / 5.1e-6.
PyTorch layouts are checked on state dicts written from torchvision's / the official repository's module
structure, with hand-picked elements for every transpose.
keras, h5py and safetensors are test-only dependencies; the module skips without keras.
"""

import os
import re

os.environ.setdefault("KERAS_BACKEND", "jax")  # Must precede the keras import.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import pytest

from medjax.models import convert, convnext, mobilenet_v2

keras = pytest.importorskip("keras")

TOLERANCE = 1e-4


def _assert_logits_close(ours: np.ndarray, expected: np.ndarray) -> None:
    """The module's criterion: 1e-4 absolute, relative to the logit scale when that exceeds 1."""
    assert _input_spread(expected) > 0.1
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOLERANCE * max(1.0, float(expected.std())))


TORCHVISION_MOBILENET_V2_PARAMS = 3_504_872  # PAPERS.md, "Canonical baselines"


def _leaf_layers(model):
    for layer in model.layers:
        yield from _leaf_layers(layer) if hasattr(layer, "layers") else (layer,)


def _randomise(model, rng: np.random.Generator):
    """Draws every weight at random so that each one reaches the logits and a mis-mapping shows.

    Keras initialises BatchNorm/LayerNorm to identity, biases to 0 and layer scale to 1e-6, and its Glorot
    init shrinks depthwise kernels (it counts all channels as fan-in), so the input barely reaches the
    logits of a deep stack. Kernels are drawn He-normal over their true fan-in instead, 1-D weights around
    their role (scales and variances positive).
    """
    for layer in _leaf_layers(model):
        for w in layer.weights:
            if len(w.shape) == 1:
                positive = any(s in w.path for s in ("gamma", "moving_variance", "layer_scale"))
                value = rng.uniform(0.5, 1.5, w.shape) if positive else rng.normal(0.0, 0.2, w.shape)
            else:
                depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
                fan_in = np.prod(w.shape[:2] if depthwise else w.shape[:-1])
                value = rng.normal(0.0, np.sqrt(2.0 / fan_in), w.shape)
            w.assign(value.astype("float32"))
    return model


def _images(seed: int, batch: int, size: int) -> np.ndarray:
    """Distinct images: a coarse 4x4 random pattern blown up to ``size`` plus fine noise. White noise alone
    averages out in the global pooling, leaving logits that hardly depend on the input."""
    rng = np.random.default_rng(seed)
    coarse = np.repeat(np.repeat(rng.normal(size=(batch, 4, 4, 3)), size // 4, axis=1), size // 4, axis=2)
    return (coarse + 0.3 * rng.normal(size=(batch, size, size, 3))).astype(np.float32)


def _input_spread(logits: np.ndarray) -> float:
    """Standard deviation of the part of the logits that depends on the input (batch of 2 or more)."""
    return float((logits - logits.mean(axis=0)).std())


def _abstract(model, image_size: int = 32, channels: int = 3):
    """Target shapes without computing anything (load_pretrained needs values only for kept head layers)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), np.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros(x.shape, x.dtype), train=False))


def _logits(model, variables, x):
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False)[0])(variables, x))


def _same(a, b) -> bool:
    return jax.tree.all(jax.tree.map(lambda p, q: bool(np.array_equal(p, q)), a, b))


@pytest.fixture(scope="module")
def keras_mobilenet():
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(224, 224, 3), classifier_activation=None
    )
    return _randomise(model, np.random.default_rng(0))


@pytest.fixture(scope="module")
def keras_mobilenet_model():
    return mobilenet_v2.Model(num_classes=1000, padding_style="tf", bn_epsilon=1e-3, bn_momentum=0.999)


@pytest.fixture(scope="module")
def keras_mobilenet_variables(keras_mobilenet, keras_mobilenet_model):
    return convert.load_pretrained(
        keras_mobilenet, model_name="mobilenet_v2", target_variables=_abstract(keras_mobilenet_model)
    )


@pytest.mark.parametrize(("size", "batch"), [(224, 2), (64, 2)])
def test_mobilenet_v2_matches_keras(
    keras_mobilenet, keras_mobilenet_model, keras_mobilenet_variables, size, batch
):
    x = _images(size, batch, size)
    expected = keras_mobilenet.predict(x, verbose=0)
    ours = _logits(keras_mobilenet_model, keras_mobilenet_variables, x)
    _assert_logits_close(ours, expected)
    # The test can fail: torchvision-style padding with the same weights is visibly different.
    torch_padded = keras_mobilenet_model.clone(padding_style="torch")
    assert np.abs(_logits(torch_padded, keras_mobilenet_variables, x) - expected).max() > 1e-2


def test_convnext_tiny_matches_keras(tmp_path):
    # include_preprocessing=False: Keras' Normalization layer (ImageNet mean/std on 0..255) is not part of
    # medjax, whose pipeline normalises (data.normalize); both models here see the same normalised input.
    keras_model = keras.applications.ConvNeXtTiny(
        weights=None, input_shape=(224, 224, 3), include_preprocessing=False, classifier_activation=None
    )
    _randomise(keras_model, np.random.default_rng(1))
    model = convnext.Model(num_classes=1000)
    variables = convert.load_pretrained(keras_model, model_name="convnext", target_variables=_abstract(model))
    for size, batch in ((224, 2), (64, 2)):
        x = _images(size, batch, size)
        expected = keras_model.predict(x, verbose=0)
        _assert_logits_close(_logits(model, variables, x), expected)
    # The Keras 3 weights file addresses layers by class and position: same variables as the live model.
    keras_model.save_weights(tmp_path / "convnext.weights.h5")
    from_file = convert.load_pretrained(
        tmp_path / "convnext.weights.h5", model_name="convnext", target_variables=_abstract(model)
    )
    assert _same(from_file, variables)


def test_keras_weight_files_round_trip(
    keras_mobilenet, keras_mobilenet_model, keras_mobilenet_variables, tmp_path
):
    keras_mobilenet.save_weights(tmp_path / "m.weights.h5")  # Keras 3 format
    keras_mobilenet.save(tmp_path / "m.keras")  # zip archive holding model.weights.h5
    keras_mobilenet.save(
        tmp_path / "m.h5"
    )  # legacy HDF5, layers by name (like the keras.applications downloads)
    target = _abstract(keras_mobilenet_model)
    for name in ("m.weights.h5", "m.keras", "m.h5"):
        loaded = convert.load_pretrained(tmp_path / name, model_name="mobilenet_v2", target_variables=target)
        assert _same(loaded, keras_mobilenet_variables), name


def test_other_class_count_keeps_the_fresh_head(keras_mobilenet, keras_mobilenet_variables, capsys):
    model = mobilenet_v2.Model(num_classes=3, padding_style="tf", bn_epsilon=1e-3, bn_momentum=0.999)
    target = _abstract(model)  # Shapes; the head needs values, which stand in for a fresh initialisation:
    target["params"]["classifier"] = {
        "kernel": np.full((1280, 3), 0.5, np.float32),
        "bias": np.ones(3, np.float32),
    }
    loaded = convert.load_pretrained(keras_mobilenet, model_name="mobilenet_v2", target_variables=target)
    assert "classifier/kernel (source (1280, 1000), model (1280, 3))" in capsys.readouterr().out
    assert _same(loaded["params"]["classifier"], target["params"]["classifier"])
    rest = {k: v for k, v in loaded["params"].items() if k != "classifier"}
    assert _same(rest, {k: keras_mobilenet_variables["params"][k] for k in rest})
    assert _same(loaded["batch_stats"], keras_mobilenet_variables["batch_stats"])
    with pytest.raises(
        convert.PretrainedMismatchError, match=r"(?s)2 mis-shaped.*classifier/bias.*classifier/kernel"
    ):
        convert.load_pretrained(
            keras_mobilenet, model_name="mobilenet_v2", target_variables=target, reinit_head=False
        )


# ------------------------------------------------------------------------ PyTorch layouts (no torch)


def torchvision_mobilenet_v2_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A state dict laid out like torchvision's ``mobilenet_v2()``, written from its module structure:
    ``features.0`` ConvBNReLU, ``features.1..17`` InvertedResidual (``conv`` = [ConvBNReLU expand] +
    ConvBNReLU depthwise + Conv2d + BatchNorm2d), ``features.18`` ConvBNReLU, ``classifier.1`` Linear."""
    state = {}

    def conv_bn(prefix_conv: str, prefix_bn: str, out: int, inp: int, k: int, groups: int = 1) -> None:
        state[f"{prefix_conv}.weight"] = rng.normal(size=(out, inp // groups, k, k))
        state[f"{prefix_bn}.weight"], state[f"{prefix_bn}.bias"] = (
            rng.uniform(0.5, 1.5, out),
            rng.normal(size=out),
        )
        state[f"{prefix_bn}.running_mean"] = rng.normal(size=out)
        state[f"{prefix_bn}.running_var"] = rng.uniform(0.5, 1.5, out)
        state[f"{prefix_bn}.num_batches_tracked"] = np.array(7)

    conv_bn("features.0.0", "features.0.1", 32, 3, 3)
    inp, index = 32, 1
    for t, c, n, _ in mobilenet_v2.INVERTED_RESIDUAL_SETTINGS:
        for _ in range(n):
            p, hidden = f"features.{index}.conv", inp * t
            if t != 1:
                conv_bn(f"{p}.0.0", f"{p}.0.1", hidden, inp, 1)
            d = 1 if t != 1 else 0
            conv_bn(f"{p}.{d}.0", f"{p}.{d}.1", hidden, hidden, 3, groups=hidden)
            conv_bn(f"{p}.{d + 1}", f"{p}.{d + 2}", c, hidden, 1)
            inp, index = c, index + 1
    conv_bn("features.18.0", "features.18.1", 1280, 320, 1)
    state["classifier.1.weight"], state["classifier.1.bias"] = (
        rng.normal(size=(1000, 1280)),
        rng.normal(size=1000),
    )
    return {k: v.astype(np.float32) for k, v in state.items()}


@pytest.fixture(scope="module")
def torchvision_state():
    return torchvision_mobilenet_v2_state(np.random.default_rng(2))


def test_torchvision_state_dict_layout(torchvision_state, tmp_path, capsys):
    state = torchvision_state
    trainable = [v.size for k, v in state.items() if not re.search(r"running_|num_batches", k)]
    assert (len(state), sum(trainable)) == (314, TORCHVISION_MOBILENET_V2_PARAMS)  # the generator is right
    save_file = pytest.importorskip("safetensors.numpy").save_file
    save_file(state, str(tmp_path / "mnv2.safetensors"))
    target = _abstract(mobilenet_v2.Model(num_classes=1000))
    v = convert.load_pretrained(
        tmp_path / "mnv2.safetensors", model_name="mobilenet_v2", target_variables=target
    )
    assert "scheme 'torchvision'" in capsys.readouterr().out
    assert _same(v, convert.load_pretrained(state, model_name="mobilenet_v2", target_variables=target))
    p, stats = v["params"], v["batch_stats"]
    # OIHW -> HWIO: kernel[kh, kw, i, o] == weight[o, i, kh, kw].
    assert p["stem"]["kernel"][2, 0, 1, 5] == state["features.0.0.weight"][5, 1, 2, 0]
    # Depthwise (C, 1, kh, kw) -> (kh, kw, 1, C); block_1 is the first with expansion (features.2).
    assert p["block_1"]["depthwise"]["kernel"].shape == (3, 3, 1, 96)
    assert p["block_1"]["depthwise"]["kernel"][0, 2, 0, 7] == state["features.2.conv.1.0.weight"][7, 0, 0, 2]
    # block_0 has no expansion: its projection and BN sit one index earlier.
    assert p["block_0"]["project"]["kernel"][0, 0, 4, 3] == state["features.1.conv.1.weight"][3, 4, 0, 0]
    np.testing.assert_array_equal(
        stats["block_0"]["project_bn"]["var"], state["features.1.conv.2.running_var"]
    )
    # Linear (out, in) -> (in, out).
    assert p["classifier"]["kernel"][11, 900] == state["classifier.1.weight"][900, 11]
    # A 1-channel model gets the RGB stem filters summed.
    gray = convert.load_pretrained(
        state,
        model_name="mobilenet_v2",
        target_variables=_abstract(mobilenet_v2.Model(num_classes=1000), channels=1),
    )
    np.testing.assert_allclose(
        gray["params"]["stem"]["kernel"][..., 0, :], p["stem"]["kernel"].sum(axis=2), rtol=1e-6
    )


def test_mangled_state_dict_lists_every_problem(torchvision_state):
    state = dict(torchvision_state)
    del state["features.5.conv.1.0.weight"], state["features.18.1.running_var"]
    state["features.19.0.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    state["features.3.conv.2.weight"] = np.zeros((24, 143, 1, 1), np.float32)
    target = _abstract(mobilenet_v2.Model(num_classes=1000))
    with pytest.raises(convert.PretrainedMismatchError) as error:
        convert.load_pretrained(state, model_name="mobilenet_v2", target_variables=target)
    message = str(error.value)
    for expected in (
        "2 missing",
        "params/block_4/depthwise/kernel (looked for 'features.5.conv.1.0.weight')",
        "batch_stats/head_bn/var (looked for 'features.18.1.running_var')",
        "1 unexpected",
        "features.19.0.weight",
        "1 mis-shaped",
        "params/block_2/project/kernel <- features.3.conv.2.weight: "
        "source (1, 1, 143, 24), model (1, 1, 144, 24)",
    ):
        assert expected in message


def official_convnext_state(rng, depths, widths, num_classes) -> dict[str, np.ndarray]:
    """State dict with the official repository's names (facebookresearch/ConvNeXt ``models/convnext.py``)."""
    state = {}

    def add(key: str, *shape: int) -> None:
        state[key] = rng.normal(size=shape).astype(np.float32)

    add("downsample_layers.0.0.weight", widths[0], 3, 4, 4), add("downsample_layers.0.0.bias", widths[0])
    for s, (depth, c) in enumerate(zip(depths, widths, strict=True)):
        if s:
            (
                add(f"downsample_layers.{s}.0.weight", widths[s - 1]),
                add(f"downsample_layers.{s}.0.bias", widths[s - 1]),
            )
            (
                add(f"downsample_layers.{s}.1.weight", c, widths[s - 1], 2, 2),
                add(f"downsample_layers.{s}.1.bias", c),
            )
        else:
            add("downsample_layers.0.1.weight", c), add("downsample_layers.0.1.bias", c)
        for b in range(depth):
            p = f"stages.{s}.{b}"
            add(f"{p}.dwconv.weight", c, 1, 7, 7), add(f"{p}.dwconv.bias", c), add(f"{p}.gamma", c)
            add(f"{p}.norm.weight", c), add(f"{p}.norm.bias", c)
            add(f"{p}.pwconv1.weight", 4 * c, c), add(f"{p}.pwconv1.bias", 4 * c)
            add(f"{p}.pwconv2.weight", c, 4 * c), add(f"{p}.pwconv2.bias", c)
    add("norm.weight", widths[-1]), add("norm.bias", widths[-1])
    add("head.weight", num_classes, widths[-1]), add("head.bias", num_classes)
    return state


def timm_names(key: str) -> str:
    """timm's renaming of official ConvNeXt checkpoints (``timm.models.convnext.checkpoint_filter_fn``)."""
    for pattern, repl in (
        (r"^downsample_layers\.0\.", "stem."),
        (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
        (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
        (r"dwconv", "conv_dw"),
        (r"pwconv(\d)", r"mlp.fc\1"),
        (r"^norm\.", "head.norm."),
        (r"^head\.(weight|bias)$", r"head.fc.\1"),
    ):
        key = re.sub(pattern, repl, key)
    return key


def test_official_and_timm_convnext_layouts(capsys):
    depths, widths = (1, 1, 2, 1), (8, 16, 24, 32)
    official = official_convnext_state(np.random.default_rng(3), depths, widths, num_classes=5)
    # {'model': ...} is how the official checkpoints are stored.
    wrapped = {"model": official, "epoch": np.array(300)}
    target = _abstract(convnext.Model(num_classes=5, depths=depths, widths=widths))
    v = convert.load_pretrained(wrapped, model_name="convnext", target_variables=target)
    timm = convert.load_pretrained(
        {timm_names(k): a for k, a in official.items()}, model_name="convnext", target_variables=target
    )
    out = capsys.readouterr().out
    assert "scheme 'official'" in out and "scheme 'timm'" in out
    assert _same(v, timm)
    p = v["params"]
    assert p["stem_conv"]["kernel"][3, 1, 2, 6] == official["downsample_layers.0.0.weight"][6, 2, 3, 1]
    assert (
        p["stage_2_block_1"]["dwconv"]["kernel"][5, 0, 0, 9]
        == official["stages.2.1.dwconv.weight"][9, 0, 5, 0]
    )
    assert p["stage_1_block_0"]["pwconv1"]["kernel"][3, 40] == official["stages.1.0.pwconv1.weight"][40, 3]
    np.testing.assert_array_equal(p["stage_3_block_0"]["gamma"], official["stages.3.0.gamma"])
    np.testing.assert_array_equal(p["downsample_2_norm"]["scale"], official["downsample_layers.2.0.weight"])
    np.testing.assert_array_equal(p["head_norm"]["bias"], official["norm.bias"])
    # Study A's head (GAP||GMP -> 2C, SEVector) keeps its fresh values; the backbone still loads.
    study_a = convnext.Model(num_classes=2, depths=depths, widths=widths, pooling="avg+max", sevector_ratio=4)
    a = convert.load_pretrained(official, model_name="convnext", target_variables=_abstract(study_a))
    out = capsys.readouterr().out
    for kept in (
        "head_norm/scale (source (32,), model (64,))",
        "classifier/kernel (source (32, 5), model (64, 2))",
    ):
        assert kept in out
    assert "params/sevector/" in out and "(not in source)" in out
    assert _same(a["params"]["stage_3_block_0"], p["stage_3_block_0"])


def test_pth_files(torchvision_state, tmp_path):
    target = _abstract(mobilenet_v2.Model(num_classes=1000))
    try:
        import torch
    except ImportError:
        (tmp_path / "w.pth").write_bytes(b"not read")
        with pytest.raises(ImportError, match="safetensors"):
            convert.load_pretrained(tmp_path / "w.pth", model_name="mobilenet_v2", target_variables=target)
        return
    torch.save({k: torch.from_numpy(v) for k, v in torchvision_state.items()}, tmp_path / "w.pth")
    loaded = convert.load_pretrained(tmp_path / "w.pth", model_name="mobilenet_v2", target_variables=target)
    assert _same(
        loaded, convert.load_pretrained(torchvision_state, model_name="mobilenet_v2", target_variables=target)
    )
