"""Pretrained Keras and PyTorch weights -> medjax ``{'params': ..., 'batch_stats': ...}`` trees.

One table per family (``tables.mobilenet_v2_slots``, ``tables.convnext_slots``) lists every weight-carrying
layer in Keras model order, with its medjax path, its kind and its name in each naming scheme; everything
else is generic. Kinds say how arrays are laid out: Keras already stores kernels as HWIO (Dense as
(in, out)) except ``DepthwiseConv2D`` (kh, kw, C, 1); PyTorch stores convolutions OIHW (depthwise
(C, 1, kh, kw)) and Linear (out, in).

Sources and naming schemes (``source=None`` detects both):

==================================================  =======================================================
what                                                read with
==================================================  =======================================================
live ``keras.Model`` (``keras.applications.*``)     the model's layers (scheme 'keras')
``.weights.h5`` (Keras 3 ``save_weights``)          h5py; layers are addressed by class and position
``.keras`` archive                                  h5py on its ``model.weights.h5`` member
legacy ``.h5`` (Keras 2 / ``keras.applications``    h5py; layers by name
downloads, ``model.save('x.h5')``)
``.pth`` / ``.pt`` / ``.bin`` state dicts           ``torch.load`` (torch needed only here)
``.safetensors``                                    ``safetensors.numpy`` (no torch)
``.tflite`` (quantized MobileNetV2, BatchNorm folded)  :mod:`.tflite`, a FlatBuffer reader (no TFLite runtime)
a ``dict`` of arrays                                as is
==================================================  =======================================================

PyTorch schemes: 'torchvision' (``mobilenet_v2``), 'official' (facebookresearch ConvNeXt) and 'timm'
(``convnext_*``); TFLite files are their own source, 'tflite' (MobileNetV2 only; the folded BatchNorms
and what they mean for fine-tuning are explained in :mod:`.tflite`). The pretrained models also fix the
model configuration and input scaling; see ``tables.SOURCE_EXPECTS`` (printed on load).

``tables.py`` holds the per-family name tables, ``readers.py`` the file formats; this module maps and
checks. Parity with Keras and the PyTorch layouts is pinned in ``tests/test_parity_keras.py``.
"""

import re
from collections.abc import Mapping
from os import PathLike
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medjax.errors import MedjaxError
from medjax.models.convert.readers import read_weights
from medjax.models.convert.tables import FAMILIES, LEAVES, SOURCE_EXPECTS, TORCH_SUFFIXES, Slot

__all__ = ["FAMILIES", "PretrainedMismatchError", "load_pretrained", "read_weights"]

# PyTorch bookkeeping that has no medjax counterpart.
TORCH_IGNORED = re.compile(r"\.num_batches_tracked$")
# Keras ConvNeXt prefixes every layer name with the model name.
KERAS_MODEL_PREFIX = re.compile(r"^convnext_[a-z]+_")


class PretrainedMismatchError(MedjaxError, ValueError):
    """Pretrained weights do not fit the model: lists every missing, unexpected and mis-shaped array."""


def _leaf_path(slot: Slot, leaf: tuple[str, ...]) -> tuple[str, ...]:
    return (leaf[0], *slot.path, *leaf[1:])


def _map_keras(slots: list[Slot], layers: dict[str, list[np.ndarray]]) -> tuple[dict, list[str]]:
    """medjax leaf path -> (source name, array in medjax layout), and the unused source names."""
    remaining = {KERAS_MODEL_PREFIX.sub("", name): arrays for name, arrays in layers.items()}
    found: dict[tuple[str, ...], tuple[str, np.ndarray]] = {}
    unexpected = []
    for slot in slots:
        name = slot.names["keras"]
        for i, array in enumerate(remaining.pop(name, [])):
            if i >= len(LEAVES[slot.kind]):
                unexpected.append(f"{name}[{i}]")
                continue
            # DepthwiseConv2D keeps (kh, kw, C, 1); medjax's DepthwiseConv has (kh, kw, 1, C).
            value = np.swapaxes(array, 2, 3) if slot.kind == "depthwise" else array
            found[_leaf_path(slot, LEAVES[slot.kind][i])] = (f"{name}[{i}]", value)
    return found, unexpected + list(remaining)


def _map_torch(slots: list[Slot], scheme: str, state: dict[str, np.ndarray]) -> tuple[dict, list[str]]:
    """As :func:`_map_keras`, for a PyTorch state dict: OIHW -> HWIO, Linear (out, in) -> (in, out)."""
    remaining = {k: v for k, v in state.items() if not TORCH_IGNORED.search(k)}
    found = {}
    for slot in slots:
        for suffix, leaf in zip(TORCH_SUFFIXES[slot.kind], LEAVES[slot.kind], strict=True):
            key = slot.names[scheme] + suffix
            if key in remaining:
                array = remaining.pop(key)
                array = (
                    array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T if array.ndim == 2 else array
                )
                found[_leaf_path(slot, leaf)] = (key, array)
    return found, list(remaining)


def _detect_scheme(slots: list[Slot], state: dict[str, np.ndarray]) -> str:
    """The PyTorch naming scheme whose key names cover most of ``state``."""
    hits = {}
    for scheme in slots[0].names.keys() - {"keras"}:
        expected = {s.names[scheme] + suffix for s in slots for suffix in TORCH_SUFFIXES[s.kind]}
        hits[scheme] = len(expected & state.keys())
    best = max(hits, key=hits.get)
    if not hits[best]:
        raise PretrainedMismatchError(
            f"No known key names in this state dict (first keys: {sorted(state)[:5]}); expected one of the "
            f"schemes {sorted(hits)}, e.g. {[slots[0].names[s] + '.weight' for s in sorted(hits)]}."
        )
    return best


def _fmt(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _fit(found: dict, target: Mapping, *, head: tuple[str, ...], reinit_head: bool | None, expected: dict):
    """Variables shaped like ``target`` from ``found``; returns them with (kept, adapted, problems)."""
    flat = traverse_util.flatten_dict(target)
    out, kept, adapted = {}, [], []
    missing, misshaped = [], []
    for path, value in flat.items():
        is_head = len(path) > 1 and path[1] in head
        source = found.pop(path, None)
        if is_head and (reinit_head or (reinit_head is None and source is None)):
            kept.append(f"{_fmt(path)} ({'re-initialised' if reinit_head else 'not in source'})")
            out[path] = value
            continue
        if source is None:
            missing.append(f"{_fmt(path)} (looked for {expected.get(path, 'nothing: no mapping')!r})")
            continue
        name, array = source
        if array.shape != value.shape:
            # Grayscale input: the RGB filters summed give the same response to a gray image copied 3x.
            if (
                array.ndim == 4
                and array.shape[2] == 3
                and value.shape == (*array.shape[:2], 1, array.shape[3])
            ):
                array = array.sum(axis=2, keepdims=True)
                adapted.append(f"{_fmt(path)} (RGB filters summed for 1-channel input)")
            elif is_head and reinit_head is None:
                kept.append(f"{_fmt(path)} (source {array.shape}, model {value.shape})")
                out[path] = value
                continue
            else:
                misshaped.append(f"{_fmt(path)} <- {name}: source {array.shape}, model {value.shape}")
                continue
        out[path] = jnp.asarray(array, dtype=value.dtype)
    unused = [name for name, _ in found.values()]
    return traverse_util.unflatten_dict(out), kept, adapted, (missing, unused, misshaped)


def load_pretrained(
    path_or_obj: Any,
    *,
    model_name: str,
    target_variables: Mapping,
    source: str | None = None,
    reinit_head: bool | None = None,
    model: Any = None,
) -> dict:
    """Pretrained weights converted into variables shaped like ``target_variables``.

    Args:
      path_or_obj: a weights file, a live ``keras.Model`` or a state dict (module docstring).
      model_name: the medjax architecture, 'mobilenet_v2' or 'convnext' (any variant).
      target_variables: freshly initialised ``model.init(...)`` variables; they fix the shapes and dtypes
        and supply the values of re-initialised head layers.
      source: naming scheme, 'keras', 'torchvision', 'official', 'timm' or 'tflite'; None detects it
        (a ``.tflite`` file is always 'tflite').
      reinit_head: head layers (MobileNetV2 classifier; ConvNeXt head_norm, sevector, classifier) keep
        their target values: always (True), never (False: they must match like any layer), or when the
        source lacks them or their shape differs, e.g. another class count (None).
      model: the flax module ``target_variables`` belong to (optional); a ``.tflite`` source takes its
        ``bn_epsilon`` (else 1e-3) and must match its ``padding_style``.

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` (as in ``target_variables``). Prints one summary line, the
      head layers kept, adapted arrays, and the model/input settings the source was trained with.

    Raises:
      PretrainedMismatchError: listing every missing, unexpected and mis-shaped array at once.
    """
    if model_name not in FAMILIES:
        raise ValueError(f"No converter for model {model_name!r}; available: {sorted(FAMILIES)}.")
    family = FAMILIES[model_name]
    slots = family.slots(target_variables["params"])
    is_tflite = isinstance(path_or_obj, str | PathLike) and str(path_or_obj).lower().endswith(".tflite")
    if is_tflite and model_name != "mobilenet_v2":
        raise ValueError(f"TFLite files convert to mobilenet_v2 only, not {model_name!r} ({path_or_obj}).")
    description, layout, data = read_weights(path_or_obj, slots, model=model)
    schemes = sorted(slots[0].names) + ["tflite"] * (model_name == "mobilenet_v2")
    if source is not None and source not in schemes:
        raise ValueError(f"source must be one of {schemes} for {model_name}, got {source!r}.")
    if layout in ("keras", "tflite"):
        if source not in (None, layout):
            raise ValueError(f"{description} holds {layout} weights, but source={source!r}.")
        scheme = "keras"  # A TFLite graph arrives under the Keras layer names (.tflite).
        found, unexpected = _map_keras(slots, data)
    else:
        scheme = source or _detect_scheme(slots, data)
        if scheme == "keras":
            raise ValueError(f"{description} is a PyTorch-style state dict, but source='keras'.")
        found, unexpected = _map_torch(slots, scheme, data)
    expected = {
        _leaf_path(s, leaf): s.names[scheme] + (TORCH_SUFFIXES[s.kind][i] if scheme != "keras" else f"[{i}]")
        for s in slots
        for i, leaf in enumerate(LEAVES[s.kind])
    }
    variables, kept, adapted, (missing, unused, misshaped) = _fit(
        found, target_variables, head=family.head, reinit_head=reinit_head, expected=expected
    )
    unexpected += unused
    origin = "tflite" if layout == "tflite" else scheme
    if missing or unexpected or misshaped:
        lines = [f"Pretrained weights from {description} (scheme {origin!r}) do not fit {model_name}:"]
        for title, items in (
            ("missing (in the model, not in the source)", missing),
            ("unexpected (in the source, not used)", unexpected),
            ("mis-shaped", misshaped),
        ):
            lines += [f"  {len(items)} {title}:"] * bool(items) + [f"    {item}" for item in sorted(items)]
        lines.append(
            "Check model_name and the model config (variant, depths, width_multiplier, num_classes)."
        )
        raise PretrainedMismatchError("\n".join(lines))
    loaded = len(traverse_util.flatten_dict(variables)) - len(kept)
    print(f"Loaded {loaded} arrays into {model_name} from {description} (scheme {origin!r}).", flush=True)
    for title, items in (("Kept model values for", kept), ("Adapted", adapted)):
        if items:
            print(f"  {title}: " + "; ".join(items), flush=True)
    print(f"  These weights expect {SOURCE_EXPECTS[model_name, origin]}.", flush=True)
    return variables
