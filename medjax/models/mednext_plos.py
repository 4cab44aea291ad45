"""MedNeXt of Xue, Pi, Liu, Zeng & Sun, PLoS One 21(1): e0340108 (2026) -- a 2-D classification backbone.

NOT DKFZ's MedNeXt (Roy et al., arXiv 2303.09975, a 3-D ConvNeXt-style segmentation network): the two
share only a name. This module is ``mednext_plos`` precisely so the two are never confused.

What the paper states (abstract only, see PAPERS.md study B): a transformer-style network made only of
large-kernel convolutions and MLPs (no self-attention), for classification and segmentation, built from
three modules: a **Linear Attention FFN**, a **Spatial Encoding Module** and a **Smooth depthwise-conv FFN**.
Everything else below is **our choice** (PAPERS.md "Our defaults"), exposed as a config field:

- Macro design (ConvNeXt/MetaFormer): stem 4x4 stride-4 conv + LayerNorm; four stages; between stages
  LayerNorm + 2x2 stride-2 conv. Variants: ``'tiny'`` widths (48, 96, 192, 384), depths (2, 2, 6, 2);
  ``'small'`` widths (64, 128, 256, 512), depths (3, 3, 9, 3) (our scaling: wider and ConvNeXt-T's depth
  ratio). ``widths``/``depths`` override the variant.
- Block (MetaFormer pre-norm): ``x + drop_path(gamma1 * SEM(norm(x)))`` then, for each FFN of the stage,
  ``x + drop_path(gamma2 * FFN(norm(x)))``; LayerNorm eps 1e-6, layer scale 1e-6, drop path rising
  linearly from 0 to ``drop_path_rate`` over all blocks.
- Arrangement of the three modules (``ffn``, one entry per stage): the SEM is every block's token mixer;
  the channel mixer is ``'smooth'`` in stages 1-2 and ``'la'`` in stages 3-4. Why: at strides 4 and 8 the
  maps are large and lesions small, so the cheap 3x3-smoothed MLP suffices; at strides 16 and 32 a 7x7
  gate (or the global linear attention) covers most of the map, which is where lesion-level context lives.
  One FFN per block keeps the model lean; ``'la+smooth'`` stacks both (the literal "three modules per
  block" reading) for ablation.
- Spatial Encoding Module: Dense C->C, GELU (our addition, as in VAN's spatial attention), parallel
  depthwise branches 3x3, 7x7 and 7x7 dilated 3 (``sem_branches``) summed, Dense C->C.
- Linear Attention FFN (hidden ``la_ratio * C``, default 2: 6C^2 weights against the smooth FFN's 8C^2):
  ``attention='conv'``: ``a = DWConv_k(Dense(x))`` with ``k = la_kernel`` (7), ``v = Dense(x)``,
  ``out = Dense(gelu(a) * v)``; ``attention='relu_linear'``: ``a`` is instead multi-head ReLU-kernel linear
  attention (O(N) in the tokens, as in EfficientViT) with queries/keys from an extra Dense.
- Smooth DwConv FFN: Dense C->4C, ``h + DWConv3x3(h)``, GELU, Dense 4C->C.
- Head: GlobalPool (``pooling``/``fusion`` as in the ConvNeXt head), LayerNorm, Dense (zero-initialised).

Sizes: convolutions that downsample pad like TensorFlow 'SAME' (ceil mode: pad bottom/right only when the
side is odd). For sides divisible by 32 this equals PyTorch's unpadded conv; for others every stage still
has at least one pixel, e.g. 28x28 gives stage maps 7, 4, 2, 1 (nominal strides 4, 8, 16, 32). On a 1x1
map the depthwise convolutions see only their centre tap and linear attention one token, so nothing breaks.
"""

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.models.layers import Conv, Dense, DepthwiseConv, DropPath, GlobalPool, LayerNorm, gelu, remat

VARIANTS: dict[str, dict[str, tuple[int, ...]]] = {
    "tiny": {"widths": (48, 96, 192, 384), "depths": (2, 2, 6, 2)},
    "small": {"widths": (64, 128, 256, 512), "depths": (3, 3, 9, 3)},
}
LN_EPS = 1e-6


def _layer_norm(name: str | None = None) -> LayerNorm:
    return LayerNorm(epsilon=LN_EPS, name=name)


def relu_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """Multi-head ReLU-kernel linear attention, ``sum_j (q_i . k_j) v_j / sum_j (q_i . k_j)``.

    Computing ``K^T V`` first makes it O(N) in the number of tokens N instead of O(N^2); ``q`` and ``k``
    must already be non-negative (ReLU feature maps) so the normaliser is a weighted mean.

    Args:
      q, k: ``(B, N, heads, d)`` non-negative queries and keys.
      v: ``(B, N, heads, e)`` values.
      eps: keeps the division finite when a query is orthogonal to every key.
    Returns:
      ``(B, N, heads, e)``.
    """
    kv = jnp.einsum("bnhd,bnhe->bhde", k, v)
    num = jnp.einsum("bnhd,bhde->bnhe", q, kv)
    den = jnp.einsum("bnhd,bhd->bnh", q, k.sum(axis=1))
    return num / (den[..., None] + eps)


class SpatialEncoding(nn.Module):
    """Spatial Encoding Module: multi-scale depthwise context between two 1x1 projections.

    Attributes:
      branches: (kernel, dilation) of each parallel depthwise branch; their outputs are summed.
      impl: DepthwiseConv implementation.
    """

    branches: Sequence[tuple[int, int]]
    impl: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        h = Dense(channels, activation="gelu", name="proj_in")(x)
        h = sum(DepthwiseConv(k, dilation=d, impl=self.impl, name=f"dw{k}_d{d}")(h) for k, d in self.branches)
        return Dense(channels, name="proj_out")(h)


class LinearAttentionFFN(nn.Module):
    """Gated FFN whose gate ``a`` carries spatial context: ``Dense(gelu(a) * v)``.

    Attributes:
      ratio: hidden width over input width.
      kernel: depthwise kernel of the ``'conv'`` gate.
      attention: ``'conv'`` (large-kernel depthwise, local) or ``'relu_linear'`` (global, O(N)).
      head_dim: query/key width per head for ``'relu_linear'``.
      impl: DepthwiseConv implementation.
    """

    ratio: float
    kernel: int
    attention: str
    head_dim: int
    impl: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        hidden = int(channels * self.ratio)
        a = Dense(hidden, name="gate")(x)
        if self.attention == "conv":
            a = DepthwiseConv(self.kernel, impl=self.impl, name="gate_dw")(a)
        elif self.attention == "relu_linear":
            if hidden % self.head_dim:
                raise ValueError(f"hidden width {hidden} is not a multiple of head_dim {self.head_dim}")
            b, h, w, _ = x.shape
            heads = hidden // self.head_dim
            q, k = jnp.split(nn.relu(Dense(2 * hidden, name="qk")(x)), 2, axis=-1)
            q, k, a = (t.reshape(b, h * w, heads, -1) for t in (q, k, a))
            a = relu_linear_attention(q, k, a).reshape(b, h, w, hidden)
        else:
            raise ValueError(f"attention must be 'conv' or 'relu_linear', got {self.attention!r}")
        v = Dense(hidden, name="value")(x)
        return Dense(channels, name="proj_out")(gelu(a) * v)


class SmoothFFN(nn.Module):
    """MLP with a residual 3x3 depthwise conv on the hidden map, mixing channels with a little smoothing.

    Attributes:
      ratio: hidden width over input width.
      impl: DepthwiseConv implementation.
    """

    ratio: float
    impl: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        h = Dense(int(channels * self.ratio), name="fc1")(x)
        h = h + DepthwiseConv(3, impl=self.impl, name="dw")(h)
        return Dense(channels, name="fc2")(gelu(h))


class Block(nn.Module):
    """MetaFormer pre-norm block: SEM token mixer, then one residual sub-layer per FFN in ``ffn``."""

    ffn: str
    sem_branches: Sequence[tuple[int, int]]
    la_ratio: float
    la_kernel: int
    attention: str
    head_dim: int
    mlp_ratio: float
    layer_scale_init: float
    drop_path: float
    impl: str

    def _ffn(self, kind: str, name: str) -> nn.Module:
        if kind == "la":
            return LinearAttentionFFN(
                ratio=self.la_ratio,
                kernel=self.la_kernel,
                attention=self.attention,
                head_dim=self.head_dim,
                impl=self.impl,
                name=name,
            )
        if kind == "smooth":
            return SmoothFFN(ratio=self.mlp_ratio, impl=self.impl, name=name)
        raise ValueError(f"ffn entries are '+'-joined 'la' / 'smooth', got {kind!r}")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        mixers = [SpatialEncoding(branches=self.sem_branches, impl=self.impl, name="sem")]
        mixers += [self._ffn(kind, f"ffn{i}") for i, kind in enumerate(self.ffn.split("+"))]
        for i, mixer in enumerate(mixers):
            y = mixer(_layer_norm(f"norm{i}")(x))
            if self.layer_scale_init > 0:
                gamma = self.param(
                    f"gamma{i}", nn.initializers.constant(self.layer_scale_init), (x.shape[-1],)
                )
                y = y * gamma
            x = x + DropPath(self.drop_path, name=f"drop_path{i}")(y, train=train)
        return x


class Encoder(nn.Module):
    """The four-stage backbone; returns the stage maps so a segmentation decoder can reuse it.

    Attributes:
      variant: key of ``VARIANTS`` ('tiny' or 'small').
      widths, depths: override the variant's per-stage widths / block counts when given.
      ffn: channel mixer(s) of each stage's blocks: 'la', 'smooth' or '+'-joined, e.g. 'la+smooth'.
      sem_branches: (kernel, dilation) of the SEM's depthwise branches.
      la_ratio, la_kernel: Linear Attention FFN hidden ratio and depthwise gate kernel.
      attention: 'conv' or 'relu_linear' gate of the Linear Attention FFN.
      head_dim: per-head query/key width for 'relu_linear'.
      mlp_ratio: Smooth FFN hidden ratio.
      layer_scale_init: initial gamma (0 disables layer scale).
      drop_path_rate: stochastic depth of the last block (linear from 0).
      depthwise_impl: passed to every DepthwiseConv and Conv ('fast' or 'xla').
      remat: rematerialisation of each block (:data:`medjax.models.layers.REMAT_POLICIES`, from
        ``train.remat``): less memory for a longer backward pass, same parameters.
    """

    variant: str = "tiny"
    widths: Sequence[int] | None = None
    depths: Sequence[int] | None = None
    ffn: Sequence[str] = ("smooth", "smooth", "la", "la")
    sem_branches: Sequence[tuple[int, int]] = ((3, 1), (7, 1), (7, 3))
    la_ratio: float = 2.0
    la_kernel: int = 7
    attention: str = "conv"
    head_dim: int = 32
    mlp_ratio: float = 4.0
    layer_scale_init: float = 1e-6
    drop_path_rate: float = 0.1
    depthwise_impl: str = "fast"
    remat: str = "none"

    def stage_config(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Resolved (widths, depths)."""
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        base = VARIANTS[self.variant]
        return tuple(self.widths or base["widths"]), tuple(self.depths or base["depths"])

    def block(self, ffn: str, drop_path: float, name: str) -> Block:
        """A :class:`Block` with this network's module settings (the segmentation decoder builds its own),
        called as ``block(x, train)``."""
        return remat(Block, self.remat)(
            ffn=ffn,
            sem_branches=self.sem_branches,
            la_ratio=self.la_ratio,
            la_kernel=self.la_kernel,
            attention=self.attention,
            head_dim=self.head_dim,
            mlp_ratio=self.mlp_ratio,
            layer_scale_init=self.layer_scale_init,
            drop_path=drop_path,
            impl=self.depthwise_impl,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
        """Maps ``(N, H, W, C_in)`` to the four stage outputs at strides 4, 8, 16 and 32 (ceil mode)."""
        widths, depths = self.stage_config()
        if not len(widths) == len(depths) == len(self.ffn):
            raise ValueError(f"widths {widths}, depths {depths} and ffn {self.ffn} need equal lengths")
        rates = np.linspace(0.0, self.drop_path_rate, sum(depths)).tolist()
        x = Conv(widths[0], (4, 4), strides=4, padding="SAME", impl=self.depthwise_impl, name="stem")(x)
        x = _layer_norm("stem_norm")(x)
        stages = []
        for s, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            if s > 0:
                x = _layer_norm(f"down{s}_norm")(x)
                x = Conv(width, (2, 2), strides=2, padding="SAME", impl=self.depthwise_impl, name=f"down{s}")(
                    x
                )
            for b in range(depth):
                x = self.block(self.ffn[s], rates.pop(0), f"stage{s + 1}_block{b}")(x, train)
            stages.append(x)
        return stages


ENCODER_FIELDS = tuple(f.name for f in dataclasses.fields(Encoder) if f.name not in ("parent", "name"))


class Model(Encoder, kw_only=True):
    """MedNeXt (PLoS One 2026) classifier: ``Encoder`` + pooled LayerNorm + linear head.

    Inherits every ``Encoder`` field (so ``config.model`` stays flat) and builds the encoder as the
    submodule ``'encoder'``, whose parameters a segmentation model can load unchanged.

    Attributes:
      num_classes: output logits.
      pooling, fusion: ``GlobalPool`` mode ('avg', 'max', 'avg+max') and fusion ('concat' or 'sum').
      head_zero_init: zero the classifier so training starts from uniform predictions.
    """

    num_classes: int
    pooling: str = "avg"
    fusion: str = "concat"
    head_zero_init: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict]:
        """Returns ``(logits, aux)``; ``aux`` holds ``features`` (pre-logit vector), ``feature_map``
        (last stage map) and ``stage_features`` (the four stage maps, strides 4 to 32)."""
        stages = Encoder(**{f: getattr(self, f) for f in ENCODER_FIELDS}, name="encoder")(x, train=train)
        stages[-1] = stages[-1] if self.is_initializing() else self.perturb("feature_map", stages[-1])
        features = _layer_norm("head_norm")(GlobalPool(self.pooling, self.fusion)(stages[-1]))
        init = nn.initializers.zeros_init() if self.head_zero_init else nn.initializers.lecun_normal()
        logits = nn.Dense(self.num_classes, kernel_init=init, name="head")(features)
        aux = {"features": features, "feature_map": stages[-1], "stage_features": tuple(stages)}
        return logits, aux
