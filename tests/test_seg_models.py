"""Tests for the segmentation architectures: study B's MedNeXt U-shaped network and the plain U-Net.

Parameter counts and shapes come from ``jax.eval_shape`` (nothing compiled); one real forward pass per
model runs a narrow configuration at 32x32, compiled once.
"""

import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models import get_model, mednext_plos
from medjax.models.layers import ConvTranspose
from tests.test_mednext_plos import block_count, encoder_count
from tests.test_models import _host_variables

TINY = {
    "unet": {"widths": (4, 8, 16), "norm": "group", "groups": 2, "head_zero_init": False},
    "mednext_plos_seg": {
        "widths": (8, 16, 16, 32),
        "depths": (1, 1, 1, 1),
        "decoder_depths": (1, 1, 1),
        "head_dim": 8,
        "layer_scale_init": 1.0,
        "head_zero_init": False,
    },
}


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _variables(model, shape):
    """Variable shapes only. 'xla' convolutions trace as one op each (the parameters do not depend on it)."""
    model = model.clone(depthwise_impl="xla")
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _outputs(model, shape):
    model = model.clone(depthwise_impl="xla")
    return jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros(shape), train=False))[0]


def _unet_count(widths, in_ch, num_classes, upsample) -> int:
    """milesial/Pytorch-UNet's layers written out: bias-free 3x3 convs + BatchNorm, 2x2 up-convs."""

    def double_conv(c_in, c_out):
        return 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out + 2 * c_out

    total = double_conv(in_ch, widths[0]) + sum(double_conv(a, b) for a, b in itertools.pairwise(widths))
    up_taps = 4 if upsample == "transposed" else 1
    for fine, coarse in itertools.pairwise(widths):
        total += up_taps * coarse * fine + fine + double_conv(2 * fine, fine)
    return total + widths[0] * num_classes + num_classes


def _mednext_seg_count(in_ch, num_classes, skip_fusion, upsample) -> int:
    """Encoder (``test_mednext_plos``'s hand count) + the decoder of the module docstring, tiny variant."""
    widths, depths, ffn = (48, 96, 192, 384), (2, 2, 6, 2), ("smooth", "smooth", "la", "la")
    taps = {"transposed": lambda f: f * f, "bilinear": lambda f: 1}[upsample]
    total = encoder_count(widths, depths, ffn, in_ch)
    for s in (2, 1, 0):
        c_in, c = widths[s + 1], widths[s]
        total += 2 * c_in + taps(2) * c_in * c + c + 2 * block_count(c, ffn[s])
        total += (2 * c * c + c) if skip_fusion == "concat" else 0
    head = widths[0] // 2
    return total + 2 * widths[0] + taps(4) * widths[0] * head + head + head * num_classes + num_classes


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("unet", {}, 31_037_698),  # milesial UNet(3, 2, bilinear=False)
        ("unet", {"upsample": "bilinear"}, 28_948_738),
        ("unet", {"norm": "group"}, 31_037_698),
        ("mednext_plos_seg", {"channels": 1, "num_classes": 9}, 6_583_929),  # Synapse: CT, 8 organs
        ("mednext_plos_seg", {"channels": 1, "num_classes": 9, "skip_fusion": "concat"}, 6_681_033),
        ("mednext_plos_seg", {"channels": 1, "num_classes": 9, "upsample": "bilinear"}, 6_276_345),
    ],
)
def test_golden_parameter_counts(name, kwargs, expected):
    kwargs = {"channels": 3, "num_classes": 2, **kwargs}
    channels, num_classes = kwargs.pop("channels"), kwargs.pop("num_classes")
    variables = _variables(get_model(name, num_classes=num_classes, **kwargs), (1, 64, 64, channels))
    if name == "unet":
        hand = _unet_count(
            (64, 128, 256, 512, 1024), channels, num_classes, kwargs.get("upsample", "transposed")
        )
    else:
        hand = _mednext_seg_count(
            channels, num_classes, kwargs.get("skip_fusion", "add"), kwargs.get("upsample", "transposed")
        )
    assert _count(variables["params"]) == expected == hand


def test_mednext_seg_encoder_takes_the_classifier_parameters_unchanged():
    seg = _variables(get_model("mednext_plos_seg", num_classes=4), (1, 64, 64, 3))
    cls = _variables(mednext_plos.Model(num_classes=2), (1, 64, 64, 3))
    chex.assert_trees_all_equal_shapes_and_dtypes(seg["params"]["encoder"], cls["params"]["encoder"])


@pytest.mark.parametrize("name", ["unet", "mednext_plos_seg"])
@pytest.mark.parametrize("size", [(32, 32), (36, 52), (20, 20)])
def test_logits_have_the_input_size_for_any_size(name, size):
    model = get_model(name, num_classes=5, **TINY[name])
    logits, aux = _outputs(model, (2, *size, 1))
    assert logits.shape == (2, *size, 5)
    assert aux["features"].shape == (2, aux["stage_features"][-1].shape[-1])
    strides = (1, 2, 4) if name == "unet" else (4, 8, 16, 32)
    assert [f.shape[1:3] for f in aux["stage_features"]] == [tuple(-(-n // s) for n in size) for s in strides]
    assert aux["feature_map"].shape[1:3] == aux["stage_features"][0].shape[1:3]


@pytest.mark.parametrize("name", ["unet", "mednext_plos_seg"])
def test_forward_compiles_once_and_every_output_pixel_sees_its_input(name):
    model = get_model(name, num_classes=3, depthwise_impl="xla", **TINY[name])
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = _host_variables(model, x)
    chex.clear_trace_counter()
    forward = jax.jit(chex.assert_max_traces(lambda v, x: model.apply(v, x, train=False)[0], n=1))
    logits = forward(variables, x)
    assert logits.shape == (2, 32, 32, 3) and bool(jnp.all(jnp.isfinite(logits)))
    # Changing one corner pixel of image 0 changes the logits there, and nothing in image 1.
    changed = forward(variables, x.at[0, 31, 31].add(5.0))
    assert float(jnp.abs(changed[0, 31, 31] - logits[0, 31, 31]).max()) > 1e-4
    np.testing.assert_array_equal(changed[1], logits[1])


def test_segmentation_models_reject_unknown_choices():
    bad = [
        ("unet", {"norm": "instance"}, "norm must be one of"),
        ("unet", {"upsample": "nearest"}, "upsample must be one of"),
        ("unet", {"norm": "group", "groups": 3}, "not divisible by groups=3"),
        ("mednext_plos_seg", {"skip_fusion": "max"}, "skip_fusion must be one of"),
        ("mednext_plos_seg", {"decoder_depths": (1, 1)}, "decoder_depths needs 3 entries"),
        ("mednext_plos_seg", {"upsample": "nearest"}, "upsample must be one of"),
    ]
    for name, kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            _variables(get_model(name, num_classes=2, **{**TINY[name], **kwargs}), (1, 32, 32, 1))


@pytest.mark.parametrize("stride", [2, 4])
def test_conv_transpose_equals_flax_conv_transpose(stride):
    rng = np.random.default_rng(stride)
    x = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    params = {"kernel": rng.normal(size=(stride, stride, 4, 6)), "bias": rng.normal(size=6)}
    variables = {"params": jax.tree.map(lambda a: a.astype(np.float32), params)}
    reference = nn.ConvTranspose(6, (stride, stride), strides=(stride, stride), padding="VALID")

    @jax.jit
    def outputs(variables, x):
        impls = ("fast", "xla")
        return reference.apply(variables, x), [
            ConvTranspose(6, stride, impl=i).apply(variables, x) for i in impls
        ]

    expected, got = outputs(variables, x)
    for y in got:
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
