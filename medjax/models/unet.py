"""Plain 2-D U-Net (Ronneberger, Fischer & Brox 2015), the segmentation baseline.

Ronneberger's architecture with the two changes every modern re-implementation makes (e.g. the widely used
PyTorch port milesial/Pytorch-UNet): 'SAME' 3x3 convolutions, so the output has the input's size instead of
a cropped valid region, and a normalisation after each convolution. Each level is two
``Conv3x3 -> Norm -> ReLU`` (convolutions without bias when a norm follows, which would cancel it);
2x2 max pooling goes down; at each level up, the coarser map is upsampled to the skip's width,
concatenated with the skip and passed through two more convolutions; a 1x1 convolution gives the logits.

With the defaults (widths 64..1024, BatchNorm, transposed upsampling) the parameter count equals
milesial's ``UNet(n_channels, n_classes, bilinear=False)`` (31,037,698 for 3 -> 2; pinned in the tests).

Choices (fields): ``widths`` (one per level; depth is their number), ``norm`` 'batch' / 'group' / 'none',
``upsample`` 'transposed' (Ronneberger's 2x2 "up-convolution" halving the channels) or 'bilinear' (resize,
then a 1x1 convolution to the skip's width).

Input sizes: any. Max pooling pads like 'SAME' (ceil mode), so a level's map is ``ceil(H / 2^l)``; each
upsampled map is cropped at the bottom/right to its skip's size. Sides divisible by ``2^(len(widths)-1)``
(16 by default; the data side's patches are multiples of 32) need no padding.

``aux``: ``features`` (average-pooled bottleneck), ``feature_map`` (the last decoder map, which the 1x1
head reads, through ``perturb`` for Grad-CAM-like maps) and ``stage_features`` (the encoder maps before
each pooling, strides 1 to ``2^(levels-2)``, then the bottleneck).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.layers import Conv, ConvTranspose, batch_norm

NORMS = ("batch", "group", "none")
UPSAMPLES = ("transposed", "bilinear")


class DoubleConv(nn.Module):
    """``(Conv3x3 -> Norm -> ReLU) x 2``, the unit of every U-Net level.

    Attributes:
      features: output channels of both convolutions.
      norm: 'batch', 'group' or 'none'.
      groups: GroupNorm groups.
      bn_momentum, bn_epsilon: BatchNorm (Flax convention: running = m * running + (1 - m) * batch).
      impl: :class:`Conv` implementation.
    """

    features: int
    norm: str
    groups: int
    bn_momentum: float
    bn_epsilon: float
    impl: str

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for i in range(2):
            x = Conv(self.features, (3, 3), use_bias=self.norm == "none", impl=self.impl, name=f"conv{i}")(x)
            if self.norm == "batch":  # the ReLU inside BatchNorm's hand-written backward (see layers)
                x = batch_norm(
                    train, "relu", momentum=self.bn_momentum, epsilon=self.bn_epsilon, name=f"norm{i}"
                )(x)
                continue
            if self.norm == "group":
                if self.features % self.groups:
                    raise ValueError(f"width {self.features} is not divisible by groups={self.groups}")
                x = nn.GroupNorm(num_groups=self.groups, name=f"norm{i}")(x)
            elif self.norm != "none":
                raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
            x = nn.relu(x)
        return x


class Model(nn.Module):
    """U-Net returning ``(B, H, W, num_classes)`` logits and ``aux``; see the module docstring.

    Attributes:
      num_classes: output channels (background included).
      widths: channels of each level, finest first; ``len(widths) - 1`` poolings.
      norm: 'batch' (default), 'group' (batch-size independent, for small CPU batches) or 'none'.
      groups: GroupNorm groups (must divide every width).
      upsample: 'transposed' or 'bilinear'.
      bn_momentum, bn_epsilon: BatchNorm, PyTorch's defaults in Flax's convention.
      head_zero_init: zero the 1x1 classifier so training starts from uniform per-pixel predictions.
      depthwise_impl: the dense :class:`Conv` implementation ('fast' or 'xla'); the name is shared with
        the other medjax models so export's switch to 'xla' reaches this one too.
    """

    num_classes: int
    widths: Sequence[int] = (64, 128, 256, 512, 1024)
    norm: str = "batch"
    groups: int = 8
    upsample: str = "transposed"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    head_zero_init: bool = True
    depthwise_impl: str = "fast"

    def _double_conv(self, features: int, name: str) -> DoubleConv:
        return DoubleConv(
            features,
            norm=self.norm,
            groups=self.groups,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            impl=self.depthwise_impl,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict]:
        """Maps ``(B, H, W, C_in)`` images to ``(B, H, W, num_classes)`` logits and ``aux``."""
        if self.upsample not in UPSAMPLES:
            raise ValueError(f"upsample must be one of {UPSAMPLES}, got {self.upsample!r}")
        if len(self.widths) < 2:
            raise ValueError(f"widths needs at least two levels, got {self.widths}")
        skips = []
        for level, width in enumerate(self.widths):
            if level:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            x = self._double_conv(width, f"down{level}")(x, train=train)
            skips.append(x)
        bottleneck = skips.pop()
        for level in reversed(range(len(skips))):
            skip = skips[level]
            width, (h, w) = skip.shape[-1], skip.shape[1:3]
            if self.upsample == "transposed":
                x = ConvTranspose(width, stride=2, impl=self.depthwise_impl, name=f"up{level}")(x)[:, :h, :w]
            else:
                x = jax.image.resize(x, (x.shape[0], h, w, x.shape[-1]), "bilinear")
                x = Conv(width, impl=self.depthwise_impl, name=f"up{level}")(x)
            x = self._double_conv(width, f"decoder{level}")(jnp.concatenate([skip, x], axis=-1), train=train)

        feature_map = x if self.is_initializing() else self.perturb("feature_map", x)
        init = nn.initializers.zeros_init() if self.head_zero_init else nn.initializers.lecun_normal()
        logits = Conv(self.num_classes, kernel_init=init, impl=self.depthwise_impl, name="head")(feature_map)
        aux = {
            "features": jnp.mean(bottleneck, axis=(1, 2)),
            "feature_map": feature_map,
            "stage_features": (*skips, bottleneck),
        }
        return logits, aux
