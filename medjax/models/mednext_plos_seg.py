"""Study B's MedNeXt (``mednext_plos``, PLoS One 2026) as a U-shaped segmentation network.

NOT DKFZ's 3-D MedNeXt (Roy et al. 2023). The study presents its backbone for segmentation (Synapse
multi-organ CT, ACDC cardiac MRI) but its abstract gives no decoder; everything here beyond the encoder is
**our choice**, each a field:

- Encoder: :class:`medjax.models.mednext_plos.Encoder` itself, as the submodule ``'encoder'`` with the same
  flat fields, so a ``mednext_plos`` classification checkpoint's ``params['encoder']`` loads unchanged.
  Stage maps at strides 4, 8, 16, 32.
- Decoder (strides 32 -> 16 -> 8 -> 4): at each level ``LayerNorm -> upsample x2`` to the skip's width,
  fuse with the encoder map of that stride (``skip_fusion``: ``'add'``, as DKFZ's MedNeXt and ConvNeXt-style
  decoders do, keeping the width; or ``'concat'`` then a 1x1 projection back to the skip's width, as
  U-Net), then ``decoder_depths`` blocks of the study's own :class:`~medjax.models.mednext_plos.Block`
  (Spatial Encoding Module + the stage's FFN, ``decoder_ffn`` defaulting to the encoder's FFN of that
  stride). Default depths (2, 2, 2) mirror the encoder's first two stages (Swin-UNet's symmetric
  decoder); decoder blocks have no drop path.
- Upsampling (``upsample``): ``'transposed'`` is a kernel-equals-stride transposed convolution
  (:class:`~medjax.models.layers.ConvTranspose`, a matrix product on CPU); ``'bilinear'`` is a 1x1
  projection then bilinear resize (the two commute, and projecting first resizes fewer channels).
- Full resolution (stride 4 -> 1), Swin-UNet's final "x4 patch expanding": ``LayerNorm``, upsample x4 to
  ``head_width`` channels (default ``widths[0] // 2``), GELU, then a per-pixel linear classifier
  (zero-initialised unless ``head_zero_init=False``). Output ``(B, H, W, num_classes)`` logits.

Input sizes: any. The encoder's downsampling pads like TensorFlow 'SAME' (bottom/right, ceil mode), so
stage maps are ``ceil(H / stride)``; every upsampled map is cropped at the bottom/right to its skip's size
and the output to the input's. Sides that are multiples of 32 (the data side's patches; sliding-window
inference pads to the window) need no padding or cropping at all.

``aux``: ``features`` (average-pooled bottleneck, the pre-logit vector of the model contract),
``feature_map`` (the stride-4 decoder map the head reads, through ``perturb`` for Grad-CAM-like maps),
``stage_features`` (encoder maps, strides 4-32) and ``decoder_features`` (decoder maps, strides 16-4).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.layers import ConvTranspose, Dense, LayerNorm, gelu
from medjax.models.mednext_plos import ENCODER_FIELDS, LN_EPS, Encoder

SKIP_FUSIONS = ("add", "concat")
UPSAMPLES = ("transposed", "bilinear")


class Upsample(nn.Module):
    """``LayerNorm`` then upsampling by ``factor`` to ``features`` channels, cropped to ``size``.

    Attributes:
      features: output channels.
      factor: upsampling factor (2 between levels, 4 to full resolution).
      mode: 'transposed' (kernel = stride transposed conv) or 'bilinear' (1x1 projection, then resize).
      impl: the model's ``depthwise_impl``, passed to :class:`ConvTranspose`.
    """

    features: int
    factor: int
    mode: str
    impl: str

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int]) -> jax.Array:
        x = LayerNorm(epsilon=LN_EPS, name="norm")(x)
        if self.mode == "transposed":
            x = ConvTranspose(self.features, stride=self.factor, impl=self.impl, name="up")(x)
            return x[:, : size[0], : size[1]]
        if self.mode == "bilinear":
            x = Dense(self.features, name="proj")(x)
            return jax.image.resize(x, (x.shape[0], *size, self.features), "bilinear")
        raise ValueError(f"upsample must be one of {UPSAMPLES}, got {self.mode!r}")


class Model(Encoder, kw_only=True):
    """MedNeXt (PLoS One 2026) encoder + U-shaped decoder of the study's blocks; see the module docstring.

    Inherits every :class:`~medjax.models.mednext_plos.Encoder` field (variant, widths, depths, ffn, ...).

    Attributes:
      num_classes: output channels of the per-pixel logits (background included).
      decoder_depths: blocks after the fusion at strides 16, 8 and 4.
      decoder_ffn: FFN of each decoder level (strides 16, 8, 4); None takes the encoder's of that stride.
      skip_fusion: 'add' or 'concat' (then a 1x1 projection to the skip's width).
      upsample: 'transposed' or 'bilinear', for every upsampling including the final x4.
      head_width: channels at full resolution before the classifier; None is ``widths[0] // 2``.
      head_zero_init: zero the classifier so training starts from uniform per-pixel predictions.
    """

    num_classes: int
    decoder_depths: Sequence[int] = (2, 2, 2)
    decoder_ffn: Sequence[str] | None = None
    skip_fusion: str = "add"
    upsample: str = "transposed"
    head_width: int | None = None
    head_zero_init: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict]:
        """Maps ``(B, H, W, C_in)`` images to ``(B, H, W, num_classes)`` logits and ``aux``."""
        widths, _ = self.stage_config()
        levels = len(widths) - 1
        if len(self.decoder_depths) != levels:
            raise ValueError(f"decoder_depths needs {levels} entries, one per skip: {self.decoder_depths}")
        decoder_ffn = tuple(self.decoder_ffn or self.ffn[-2::-1])
        if len(decoder_ffn) != levels:
            raise ValueError(f"decoder_ffn needs {levels} entries (one per skip), got {decoder_ffn}")
        if self.skip_fusion not in SKIP_FUSIONS:
            raise ValueError(f"skip_fusion must be one of {SKIP_FUSIONS}, got {self.skip_fusion!r}")

        stages = Encoder(**{f: getattr(self, f) for f in ENCODER_FIELDS}, name="encoder")(x, train=train)
        y, decoded = stages[-1], []
        for level, (skip, depth, ffn) in enumerate(
            zip(stages[-2::-1], self.decoder_depths, decoder_ffn, strict=True)
        ):
            s = levels - level  # stage index of the skip, 1-based, as the encoder names its stages
            width = skip.shape[-1]
            y = Upsample(width, 2, self.upsample, self.depthwise_impl, name=f"up{s}")(y, skip.shape[1:3])
            if self.skip_fusion == "add":
                y = y + skip
            else:
                y = Dense(width, name=f"fuse{s}")(jnp.concatenate([y, skip], axis=-1))
            for b in range(depth):
                y = self.block(ffn, 0.0, f"decoder{s}_block{b}")(y, train)
            decoded.append(y)

        feature_map = y if self.is_initializing() else self.perturb("feature_map", y)
        head_width = self.head_width or max(1, widths[0] // 2)
        y = Upsample(head_width, 4, self.upsample, self.depthwise_impl, name="up_full")(
            feature_map, x.shape[1:3]
        )
        init = nn.initializers.zeros_init() if self.head_zero_init else nn.initializers.lecun_normal()
        logits = Dense(self.num_classes, kernel_init=init, name="head")(gelu(y))
        aux = {
            "features": jnp.mean(stages[-1], axis=(1, 2)),
            "feature_map": feature_map,
            "stage_features": tuple(stages),
            "decoder_features": tuple(decoded),
        }
        return logits, aux
