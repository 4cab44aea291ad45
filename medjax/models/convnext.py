"""ConvNeXt (Liu et al. 2022) with study A's improved head as a configuration.

With the defaults (``variant='tiny'``, ``pooling='avg'``, ``sevector_ratio=None``) this is the canonical
ConvNeXt-Tiny of PAPERS.md: 28,589,128 parameters with 1000 classes. Study A's improved ConvNeXt-Tiny is
``pooling='avg+max', fusion='concat', sevector_ratio=16``. The study does not say where the SEVector sits
or how the pooled vectors are fused; the order GAP||GMP -> LayerNorm -> SEVector -> Dense is **our
documented choice** (PAPERS.md, study A): the LayerNorm puts the average- and max-pooled halves on one
scale before the gate compares them, and the classifier reads the gated vector, which is also what the
feature-smoothing loss reads (``aux['features']``).

Parameter names follow Keras' ``convnext_tiny_*`` layer names and the official PyTorch module names:

==========================  =========================================  ===============================
medjax                      Keras (prefix ``convnext_tiny_``)          official PyTorch
==========================  =========================================  ===============================
stem_conv, stem_norm        stem_conv, stem_layernorm                  downsample_layers.0.{0,1}
downsample_s_norm, _conv    downsampling_layernorm_{s-1}, _conv_{s-1}  downsample_layers.s.{0,1}
stage_s_block_b/dwconv      stage_s_block_b_depthwise_conv             stages.s.b.dwconv
stage_s_block_b/norm        stage_s_block_b_layernorm                  stages.s.b.norm
stage_s_block_b/pwconv1, 2  stage_s_block_b_pointwise_conv_1, _2       stages.s.b.pwconv1, pwconv2
stage_s_block_b/gamma       stage_s_block_b_layer_scale (gamma)        stages.s.b.gamma
head_norm, classifier       head_layernorm, head_dense                 norm, head
==========================  =========================================  ===============================

One deliberate deviation: the 2x2 stride-2 downsampling convolutions use TensorFlow 'SAME' padding,
which is no padding at all for even maps (every map of a 224 or 64 input, so pretrained weights behave
identically) and one row/column of zeros at the bottom/right of odd maps. Canonical 'VALID' would turn
a 28x28 input (MedMNIST) into 7 -> 3 -> 1 -> 0 pixels; with 'SAME' it is 7 -> 4 -> 2 -> 1.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np

from medjax.models.layers import (
    Conv,
    Dense,
    DepthwiseConv,
    DropPath,
    GlobalPool,
    LayerNorm,
    SEVector,
    remat,
)

# name -> (depths, widths), from the official repository.
VARIANTS = {
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
}
LN_EPSILON = 1e-6

# The official repository initialises every convolution and linear layer with trunc_normal(std=0.02).
_init = nn.initializers.truncated_normal(0.02)


class Block(nn.Module):
    """ConvNeXt block: ``x + drop_path(gamma * pwconv2(gelu(pwconv1(norm(dwconv7x7(x))))))``.

    Attributes:
      drop_path_rate: stochastic-depth probability of this block.
      layer_scale_init: initial value of the per-channel scale ``gamma``; 0 disables layer scale.
      depthwise_impl: :class:`DepthwiseConv` implementation; 'xla' also computes the dense convolutions
        with XLA's (:class:`Conv`).
    """

    drop_path_rate: float = 0.0
    layer_scale_init: float = 1e-6
    depthwise_impl: str = "fast"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        y = DepthwiseConv(7, padding=3, impl=self.depthwise_impl, kernel_init=_init, name="dwconv")(x)
        y = LayerNorm(epsilon=LN_EPSILON, name="norm")(y)
        y = Dense(4 * channels, kernel_init=_init, activation="gelu", name="pwconv1")(y)
        # gamma * (y + bias) as gamma * y + gamma * bias: one fusion with the residual (Dense's defer_bias).
        y, bias = Dense(channels, kernel_init=_init, name="pwconv2", defer_bias=True)(y)
        if self.layer_scale_init > 0:
            gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init), (channels,))
            y = y * gamma + bias * gamma
        else:
            y = y + bias
        return x + DropPath(self.drop_path_rate)(y, train=train)


class Model(nn.Module):
    """ConvNeXt classifier returning ``(logits, aux)``.

    Attributes:
      num_classes: classifier outputs.
      variant: 'tiny', 'small' or 'base' (depths and widths of :data:`VARIANTS`).
      depths, widths: per-stage overrides of the variant (four entries each), e.g. for tiny test models.
      drop_path_rate: stochastic depth of the last block; block ``i`` of ``n`` uses
        ``rate * i / (n - 1)``. The official ImageNet recipe uses 0.1 (tiny), 0.4 (small), 0.5 (base).
      layer_scale_init: initial layer-scale ``gamma`` (1e-6), 0 disables it.
      pooling: :class:`GlobalPool` mode, 'avg' (canonical) or 'avg+max' (study A).
      fusion: how 'avg+max' fuses, 'concat' (study A default, 2C features) or 'sum'.
      sevector_ratio: reduction ratio of the :class:`SEVector` after the head LayerNorm; None disables it.
      head_zero_init: zero the classifier kernel and bias (big_vision); False uses trunc_normal(0.02).
      depthwise_impl: :class:`DepthwiseConv` implementation, 'fast' or 'xla' (the reference); 'xla' also
        computes the dense convolutions with XLA's (:class:`Conv`).
      remat: rematerialisation of each block (:data:`medjax.models.layers.REMAT_POLICIES`, from
        ``train.remat``): less memory for a longer backward pass, same parameters.

    ``aux['features']`` is the vector the classifier reads (after head LayerNorm and SEVector);
    ``aux['feature_map']`` is the last stage's output (Grad-CAM's target layer).
    """

    num_classes: int
    variant: str = "tiny"
    depths: Sequence[int] | None = None
    widths: Sequence[int] | None = None
    drop_path_rate: float = 0.0
    layer_scale_init: float = 1e-6
    pooling: str = "avg"
    fusion: str = "concat"
    sevector_ratio: int | None = None
    head_zero_init: bool = True
    depthwise_impl: str = "fast"
    remat: str = "none"

    def stage_config(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Resolved ``(depths, widths)``: the variant's, with explicit overrides applied."""
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        depths, widths = VARIANTS[self.variant]
        depths = tuple(self.depths) if self.depths is not None else depths
        widths = tuple(self.widths) if self.widths is not None else widths
        if len(depths) != len(widths):
            raise ValueError(f"depths {depths} and widths {widths} need one entry per stage")
        return depths, widths

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        depths, widths = self.stage_config()
        rates = np.linspace(0.0, self.drop_path_rate, sum(depths)).tolist()

        x = Conv(
            widths[0],
            (4, 4),
            strides=4,
            padding="VALID",
            kernel_init=_init,
            impl=self.depthwise_impl,
            name="stem_conv",
        )(x)
        x = LayerNorm(epsilon=LN_EPSILON, name="stem_norm")(x)
        block = remat(Block, self.remat)
        index = 0
        for stage, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            if stage > 0:
                x = LayerNorm(epsilon=LN_EPSILON, name=f"downsample_{stage}_norm")(x)
                x = Conv(
                    width,
                    (2, 2),
                    strides=2,
                    padding="SAME",
                    kernel_init=_init,
                    impl=self.depthwise_impl,
                    name=f"downsample_{stage}_conv",
                )(x)
            for b in range(depth):
                x = block(
                    drop_path_rate=rates[index],
                    layer_scale_init=self.layer_scale_init,
                    depthwise_impl=self.depthwise_impl,
                    name=f"stage_{stage}_block_{b}",
                )(x, train)
                index += 1
        feature_map = x if self.is_initializing() else self.perturb("feature_map", x)

        features = GlobalPool(mode=self.pooling, fusion=self.fusion)(feature_map)
        features = LayerNorm(epsilon=LN_EPSILON, name="head_norm")(features)
        if self.sevector_ratio is not None:
            features = SEVector(ratio=self.sevector_ratio, name="sevector")(features)
        head_init = nn.initializers.zeros_init() if self.head_zero_init else _init
        logits = nn.Dense(self.num_classes, kernel_init=head_init, name="classifier")(features)
        return logits, {"features": features, "feature_map": feature_map}
