"""Name tables: every weight-carrying layer of each family, its medjax path and its source names.

A :class:`Slot` per layer, listed in Keras model order (the Keras 3 ``.weights.h5`` reader relies on that
order); a kind per slot says which arrays the layer carries and how each source lays them out.
"""

from collections.abc import Callable, Mapping
from typing import NamedTuple

from medjax.models.mobilenet_v2 import INVERTED_RESIDUAL_SETTINGS


class Slot(NamedTuple):
    """One weight-carrying layer: medjax module path (for 'scale', the parameter itself), kind, its name
    per scheme, and the index of the Keras ``Sequential`` holding it (None: top level)."""

    path: tuple[str, ...]
    kind: str
    names: dict[str, str]
    keras_group: int | None = None


# medjax leaves of each kind, in Keras' weight order (kernel, bias; gamma, beta, moving mean, variance).
LEAVES = {
    "conv": (("params", "kernel"), ("params", "bias")),
    "depthwise": (("params", "kernel"),),
    "dense": (("params", "kernel"), ("params", "bias")),
    "bn": (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var")),
    "ln": (("params", "scale"), ("params", "bias")),
    "scale": (("params",),),
}
TORCH_SUFFIXES = {
    "conv": (".weight", ".bias"),
    "depthwise": (".weight",),
    "dense": (".weight", ".bias"),
    "bn": (".weight", ".bias", ".running_mean", ".running_var"),
    "ln": (".weight", ".bias"),
    "scale": ("",),
}
KERAS_CLASSES = {
    "conv": "conv2d",
    "depthwise": "depthwise_conv2d",
    "dense": "dense",
    "bn": "batch_normalization",
    "ln": "layer_normalization",
    "scale": "layer_scale",
}
# PyTorch bookkeeping that has no medjax counterpart.
# Model settings and input scaling (after [0, 1]) each pretrained family was trained with.
SOURCE_EXPECTS = {
    ("mobilenet_v2", "keras"): "model: padding_style='tf', bn_epsilon=1e-3, bn_momentum=0.999; "
    "data.normalize: mean=0.5, std=0.5 (inputs in [-1, 1])",
    ("mobilenet_v2", "torchvision"): "model: padding_style='torch', bn_epsilon=1e-5; "
    "data.normalize: ImageNet mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)",
    ("mobilenet_v2", "tflite"): "model: padding_style='tf' (BatchNorms folded: identities at any "
    "bn_epsilon, see medjax.models.convert.tflite); data.normalize: mean=0.5, std=0.5 (inputs in [-1, 1]); "
    "1001 classes, index 0 = background",
    ("convnext", "keras"): "data.normalize: ImageNet mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225) "
    "(the Keras model's own Normalization layer is not part of medjax)",
    (
        "convnext",
        "official",
    ): "data.normalize: ImageNet mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)",
    ("convnext", "timm"): "data.normalize: ImageNet mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)",
}


def mobilenet_v2_slots(params: Mapping) -> list[Slot]:
    """Weight layers of MobileNetV2 (table in :mod:`medjax.models.mobilenet_v2`), in Keras order."""
    del params  # The layout is fixed; the width multiplier only changes shapes.
    slots = [
        Slot(("stem",), "conv", {"keras": "Conv1", "torchvision": "features.0.0"}),
        Slot(("stem_bn",), "bn", {"keras": "bn_Conv1", "torchvision": "features.0.1"}),
    ]
    expansions = [t for t, _, n, _ in INVERTED_RESIDUAL_SETTINGS for _ in range(n)]
    for i, t in enumerate(expansions):
        keras, tv = (f"block_{i}_" if i else "expanded_conv_"), f"features.{i + 1}.conv"
        j = 0 if t == 1 else 1  # torchvision index of the depthwise conv: no expansion layer before it
        layers = (
            []
            if t == 1
            else [("expand", "conv", "expand", f"{tv}.0.0"), ("expand_bn", "bn", "expand_BN", f"{tv}.0.1")]
        )
        layers += [
            ("depthwise", "depthwise", "depthwise", f"{tv}.{j}.0"),
            ("depthwise_bn", "bn", "depthwise_BN", f"{tv}.{j}.1"),
            ("project", "conv", "project", f"{tv}.{j + 1}"),
            ("project_bn", "bn", "project_BN", f"{tv}.{j + 2}"),
        ]
        slots += [
            Slot((f"block_{i}", m), k, {"keras": keras + kn, "torchvision": t_}) for m, k, kn, t_ in layers
        ]
    last = len(expansions) + 1
    return [
        *slots,
        Slot(("head_conv",), "conv", {"keras": "Conv_1", "torchvision": f"features.{last}.0"}),
        Slot(("head_bn",), "bn", {"keras": "Conv_1_bn", "torchvision": f"features.{last}.1"}),
        Slot(("classifier",), "dense", {"keras": "predictions", "torchvision": "classifier.1"}),
    ]


def convnext_slots(params: Mapping) -> list[Slot]:
    """Weight layers of ConvNeXt (table in :mod:`medjax.models.convnext`), in Keras order.

    Stage depths are read from ``params`` so every variant (and depth override) maps.
    """
    depths = [sum(1 for k in params if k.startswith(f"stage_{s}_block_")) for s in range(4)]
    slots = [
        Slot(
            ("stem_conv",),
            "conv",
            {"keras": "stem_conv", "official": "downsample_layers.0.0", "timm": "stem.0"},
            0,
        ),
        Slot(
            ("stem_norm",),
            "ln",
            {"keras": "stem_layernorm", "official": "downsample_layers.0.1", "timm": "stem.1"},
            0,
        ),
    ]
    for s, depth in enumerate(depths):
        if s:
            for i, (part, kind, keras) in enumerate((("norm", "ln", "layernorm"), ("conv", "conv", "conv"))):
                names = {
                    "keras": f"downsampling_{keras}_{s - 1}",
                    "official": f"downsample_layers.{s}.{i}",
                    "timm": f"stages.{s}.downsample.{i}",
                }
                slots.append(Slot((f"downsample_{s}_{part}",), kind, names, s))
        for b in range(depth):
            m, off, timm = f"stage_{s}_block_{b}", f"stages.{s}.{b}", f"stages.{s}.blocks.{b}"
            for part, kind, keras, timm_part in (
                ("dwconv", "conv", "depthwise_conv", "conv_dw"),
                ("norm", "ln", "layernorm", "norm"),
                ("pwconv1", "dense", "pointwise_conv_1", "mlp.fc1"),
                ("pwconv2", "dense", "pointwise_conv_2", "mlp.fc2"),
                ("gamma", "scale", "layer_scale", "gamma"),
            ):
                names = {"keras": f"{m}_{keras}", "official": f"{off}.{part}", "timm": f"{timm}.{timm_part}"}
                slots.append(Slot((m, part), kind, names))
    return [
        *slots,
        Slot(("head_norm",), "ln", {"keras": "head_layernorm", "official": "norm", "timm": "head.norm"}),
        Slot(("classifier",), "dense", {"keras": "head_dense", "official": "head", "timm": "head.fc"}),
    ]


class Family(NamedTuple):
    """A converter family: its slot table and the top-level modules a new task may re-initialise."""

    slots: Callable[[Mapping], list[Slot]]
    head: tuple[str, ...]


FAMILIES = {
    "mobilenet_v2": Family(mobilenet_v2_slots, ("classifier",)),
    "convnext": Family(convnext_slots, ("head_norm", "sevector", "classifier")),
}
