"""Readers: Keras models and files, PyTorch and safetensors state dicts, TFLite files -> numpy arrays.

Keras sources (and TFLite files, converted to Keras names and layouts by :mod:`.tflite`) become
``{layer name: [weights in Keras order]}``, PyTorch sources ``{key: array}``; h5py, safetensors and torch
are imported only when a file needs them.
"""

import io
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medjax.models.convert import tflite
from medjax.models.convert.tables import KERAS_CLASSES, Slot


def _keras_from_model(model: Any) -> dict[str, list[np.ndarray]]:
    """Layer name -> weights of a live Keras model, descending into nested ``Sequential`` blocks."""
    layers: dict[str, list[np.ndarray]] = {}
    for layer in model.layers:
        if getattr(layer, "layers", None):
            layers.update(_keras_from_model(layer))
        elif layer.weights:
            layers[layer.name] = [np.asarray(w) for w in layer.weights]
    return layers


def _keras_from_legacy_h5(group: Any) -> dict[str, list[np.ndarray]]:
    """Legacy HDF5 (one group per top-level layer, ``weight_names`` attribute): leaf layer name from each
    weight's path (``stem/stem_conv/kernel:0`` -> ``stem_conv``), else the group's own name."""
    group = group.get("model_weights", group)
    layers: dict[str, list[np.ndarray]] = {}
    for name in (n.decode() if isinstance(n, bytes) else n for n in group.attrs["layer_names"]):
        for weight_name in group[name].attrs["weight_names"]:
            weight_name = weight_name.decode() if isinstance(weight_name, bytes) else weight_name
            parts = weight_name.split("/")
            layers.setdefault(parts[-2] if len(parts) > 1 else name, []).append(
                np.asarray(group[name][weight_name])
            )
    return layers


def _keras_from_keras3_h5(root: Any, slots: list[Slot]) -> dict[str, list[np.ndarray]]:
    """Keras 3 ``.weights.h5`` names layers by class and position (``conv2d_3``), not by layer name: the
    n-th slot of a kind (within its ``Sequential``, if any) is the n-th layer of that class in the file.
    Weight-carrying entries no slot claims are returned under their file path (reported as unexpected)."""

    def indexed(name: str, n: int) -> str:
        return f"{name}_{n}" if n else name

    counters: dict[tuple[str, str], int] = {}
    addresses = {}
    for slot in slots:
        scope = (
            "layers"
            if slot.keras_group is None
            else f"layers/{indexed('sequential', slot.keras_group)}/layers"
        )
        n = counters[scope, slot.kind] = counters.get((scope, slot.kind), -1) + 1
        addresses[f"{scope}/{indexed(KERAS_CLASSES[slot.kind], n)}/vars"] = slot.names["keras"]
    layers: dict[str, list[np.ndarray]] = {}

    def visit(path: str, obj: Any) -> None:
        if path.endswith("/vars") and len(obj):
            layers[addresses.get(path, path)] = [np.asarray(obj[str(i)]) for i in range(len(obj))]

    root.visititems(visit)
    return layers


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy copy of an array or a CPU/GPU torch tensor (bfloat16 widened to float32)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        return value.numpy()
    return np.asarray(value)


def _state_dict(mapping: Mapping) -> dict[str, np.ndarray]:
    """Unwraps ``{'model': sd}`` / ``{'state_dict': sd}`` checkpoints (the official ConvNeXt releases)."""
    for key in ("model", "state_dict"):
        if isinstance(mapping.get(key), Mapping):
            mapping = mapping[key]
    return {k: _to_numpy(v) for k, v in mapping.items()}


def read_weights(path_or_obj: Any, slots: list[Slot], *, model: Any = None) -> tuple[str, str, dict]:
    """Reads any supported source (module docstring).

    ``model`` (the target flax module, optional) gives a ``.tflite`` conversion its BatchNorm epsilon
    (default 1e-3) and the padding style to check.

    Returns:
      ``(description, layout, data)``: layout 'keras' (data: layer name -> weights in Keras order),
      'tflite' (the same, converted from a quantized MobileNetV2) or 'torch' (state-dict key -> array).

    Raises:
      FileNotFoundError: for a missing path.
      ImportError: for ``.pth`` files when torch is not installed.
      ValueError: for an unsupported file type.
    """
    if isinstance(path_or_obj, Mapping):
        return "a state dict", "torch", _state_dict(path_or_obj)
    if hasattr(path_or_obj, "layers") and hasattr(path_or_obj, "get_layer"):
        return f"Keras model {path_or_obj.name!r}", "keras", _keras_from_model(path_or_obj)
    path = Path(path_or_obj)
    if not path.is_file():
        raise FileNotFoundError(f"No pretrained weights file at {path}.")
    name = path.name.lower()
    if name.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return str(path), "torch", load_file(path)
    if name.endswith((".pth", ".pt", ".bin")):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"Reading {path} needs PyTorch (pip install torch); or convert it once to .safetensors "
                "(safetensors.torch.save_file(state_dict, 'weights.safetensors')), which needs no torch here."
            ) from e
        return str(path), "torch", _state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if name.endswith(".tflite"):
        layers = tflite.mobilenet_v2_layers(
            path,
            slots,
            bn_epsilon=getattr(model, "bn_epsilon", 1e-3),
            padding_style=getattr(model, "padding_style", None),
        )
        return str(path), "tflite", layers
    if name.endswith((".h5", ".keras")):
        import h5py

        if name.endswith(".keras"):  # A zip archive whose weights are an HDF5 member.
            with zipfile.ZipFile(path) as archive:
                file = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
        else:
            file = h5py.File(path, "r")
        with file:
            legacy = "layer_names" in file.attrs or "model_weights" in file
            data = _keras_from_legacy_h5(file) if legacy else _keras_from_keras3_h5(file, slots)
        return str(path), "keras", data
    raise ValueError(
        f"Unsupported weights file {path}: expected .h5, .keras, .pth, .pt, .bin, .safetensors or .tflite."
    )
