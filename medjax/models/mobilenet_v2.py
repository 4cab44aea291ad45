"""MobileNetV2 (Sandler et al. 2018), the canonical torchvision definition, for study C.

3,504,872 parameters with 1000 classes at width 1.0 (PAPERS.md, "Canonical baselines"). Two switches keep
both families of pretrained weights loadable: ``padding_style='torch'`` pads the stride-2 convolutions
symmetrically like torchvision; ``padding_style='tf'`` pads them like TensorFlow/Keras, and together with
``bn_epsilon=1e-3, bn_momentum=0.999`` reproduces ``keras.applications.MobileNetV2``. The Keras model has
no dropout before its classifier; set ``dropout_rate=0.0`` for exact parity in training mode.

Parameter names mirror Keras layer names so converters are a table, not a search:

==========================  ===========================  =======================================
medjax                      Keras                        torchvision
==========================  ===========================  =======================================
stem, stem_bn               Conv1, bn_Conv1              features.0.0, features.0.1
block_i/expand[_bn]         block_i_expand[_BN]          features.{i+1}.conv.0.{0,1}
block_i/depthwise[_bn]      block_i_depthwise[_BN]       features.{i+1}.conv.1.{0,1}
block_i/project[_bn]        block_i_project[_BN]         features.{i+1}.conv.{2,3}
head_conv, head_bn          Conv_1, Conv_1_bn            features.18.0, features.18.1
classifier                  predictions                  classifier.1
==========================  ===========================  =======================================

``block_0`` has no expansion (t = 1): Keras calls it ``expanded_conv_``, and in torchvision its
depthwise/project layers sit one index earlier (``features.1.conv.0.{0,1}``, ``features.1.conv.{1,2}``).
"""

import flax.linen as nn
import jax

from medjax.models.layers import Conv, DepthwiseConv, GlobalPool, batch_norm, remat

# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper / torchvision.
INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
PADDING_STYLES = ("torch", "tf")

Padding = tuple[tuple[int, int], tuple[int, int]]

# torchvision initialises convolutions Kaiming-normal (fan_out), BatchNorm ones/zeros (as Flax does).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds a channel count to the nearest multiple of ``divisor``, never going below 90 % of it.

    torchvision's ``_make_divisible`` (also Keras'), so widths such as 0.35 or 1.4 give the same layer
    sizes as the published pretrained checkpoints.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv_padding(spatial: tuple[int, int], *, kernel: int, stride: int, style: str) -> Padding:
    """Explicit ((top, bottom), (left, right)) padding of a ``kernel`` x ``kernel`` convolution.

    'torch' pads ``kernel // 2`` on every side. 'tf' is TensorFlow's 'SAME': at stride 2 and even sizes it
    is ((0, 1), (0, 1)), at odd sizes ((1, 1), (1, 1)) -- exactly what Keras' ``correct_pad`` +
    'valid' (depthwise) and ``padding='same'`` (stem) produce, so Keras weights match at every input size.
    """
    if style == "torch" or stride == 1:
        return ((kernel // 2, kernel // 2),) * 2
    pads = []
    for size in spatial:
        total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


class InvertedResidual(nn.Module):
    """Expansion 1x1 + BN + ReLU6 (skipped when ``expansion == 1``), depthwise 3x3 + BN + ReLU6, linear
    1x1 projection + BN, and a residual when the block keeps stride 1 and the channel count."""

    out_channels: int
    expansion: int
    stride: int
    padding_style: str = "torch"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    depthwise_impl: str = "fast"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_channels = x.shape[-1]

        def bn(name: str, activation: str | None = None, then: DepthwiseConv | None = None):
            return batch_norm(
                train, activation, then, momentum=self.bn_momentum, epsilon=self.bn_epsilon, name=name
            )

        pad = conv_padding(x.shape[1:3], kernel=3, stride=self.stride, style=self.padding_style)
        depthwise = DepthwiseConv(
            3,
            strides=self.stride,
            padding=pad,
            use_bias=False,
            impl=self.depthwise_impl,
            kernel_init=_conv_init,
            name="depthwise",
        )
        if self.expansion == 1:
            y = depthwise(x)
        else:
            y = Conv(
                in_channels * self.expansion,
                use_bias=False,
                kernel_init=_conv_init,
                impl=self.depthwise_impl,
                name="expand",
            )(x)
            # The normalized map goes straight into the depthwise convolution (BatchNorm's `then`).
            y = bn("expand_bn", "relu6", then=depthwise)(y)
        y = bn("depthwise_bn", "relu6")(y)
        y = Conv(
            self.out_channels,
            use_bias=False,
            kernel_init=_conv_init,
            impl=self.depthwise_impl,
            name="project",
        )(y)
        y = bn("project_bn")(y)
        if self.stride == 1 and in_channels == self.out_channels:
            y = x + y
        return y


class Model(nn.Module):
    """MobileNetV2 classifier returning ``(logits, aux)``.

    Attributes:
      num_classes: classifier outputs.
      width_multiplier: scales every channel count (0.35 .. 1.4), rounded with :func:`make_divisible`;
        the last 1x1 convolution keeps 1280 channels unless the multiplier exceeds 1.
      dropout_rate: dropout before the classifier (torchvision 0.2; Keras has none).
      bn_momentum, bn_epsilon: Flax convention (running = momentum * running + (1 - momentum) * batch);
        torchvision 0.9 / 1e-5, Keras 0.999 / 1e-3.
      padding_style: 'torch' (symmetric) or 'tf' (TensorFlow 'SAME'), see :func:`conv_padding`.
      head_zero_init: zero the classifier kernel and bias (big_vision), so fine-tuning starts from
        uniform predictions; False uses torchvision's normal(0, 0.01).
      depthwise_impl: :class:`DepthwiseConv` implementation, 'fast' or 'xla' (the reference); 'xla' also
        computes the dense convolutions with XLA's (:class:`Conv`).
      pooling, fusion: the global pooling of :class:`medjax.models.layers.GlobalPool`; 'avg' is the
        canonical head, 'avg+max' study A's dual pooling (max pooling keeps small, local findings such
        as a lesion from being averaged away).
      remat: rematerialisation of each inverted residual (:data:`medjax.models.layers.REMAT_POLICIES`,
        from ``train.remat``): less memory for a longer backward pass, same parameters.

    ``aux['features']`` is the pooled 1280-vector (2560 with 'avg+max' concat; before dropout),
    ``aux['feature_map']`` the map after the last 1x1 convolution (Grad-CAM's target layer).
    """

    num_classes: int
    width_multiplier: float = 1.0
    dropout_rate: float = 0.2
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    padding_style: str = "torch"
    head_zero_init: bool = True
    depthwise_impl: str = "fast"
    pooling: str = "avg"
    fusion: str = "concat"
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        if self.padding_style not in PADDING_STYLES:
            raise ValueError(f"padding_style must be one of {PADDING_STYLES}, got {self.padding_style!r}")
        bn_kwargs = dict(momentum=self.bn_momentum, epsilon=self.bn_epsilon)
        width = self.width_multiplier

        pad = conv_padding(x.shape[1:3], kernel=3, stride=2, style=self.padding_style)
        x = Conv(
            make_divisible(STEM_CHANNELS * width),
            (3, 3),
            strides=2,
            padding=pad,
            use_bias=False,
            kernel_init=_conv_init,
            impl=self.depthwise_impl,
            name="stem",
        )(x)
        x = batch_norm(train, "relu6", **bn_kwargs, name="stem_bn")(x)

        block = remat(InvertedResidual, self.remat)
        index = 0
        for expansion, channels, repeats, stride in INVERTED_RESIDUAL_SETTINGS:
            for r in range(repeats):
                x = block(
                    out_channels=make_divisible(channels * width),
                    expansion=expansion,
                    stride=stride if r == 0 else 1,
                    padding_style=self.padding_style,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    depthwise_impl=self.depthwise_impl,
                    name=f"block_{index}",
                )(x, train)
                index += 1

        last_channels = make_divisible(LAST_CHANNELS * max(1.0, width))
        x = Conv(
            last_channels, use_bias=False, kernel_init=_conv_init, impl=self.depthwise_impl, name="head_conv"
        )(x)
        feature_map = batch_norm(train, "relu6", **bn_kwargs, name="head_bn")(x)
        feature_map = feature_map if self.is_initializing() else self.perturb("feature_map", feature_map)

        features = GlobalPool(self.pooling, self.fusion)(feature_map)
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
        head_init = nn.initializers.zeros_init() if self.head_zero_init else nn.initializers.normal(0.01)
        logits = nn.Dense(self.num_classes, kernel_init=head_init, name="classifier")(y)
        return logits, {"features": features, "feature_map": feature_map}
