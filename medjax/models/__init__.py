"""Model registry: one architecture per module, each exporting a flax.linen ``Model``.

``config.model_name`` names the module (``medjax.models.<name>``) and ``config.model`` holds only its
keyword arguments, so adding an architecture means adding one file.
"""

import importlib
import pkgutil

import flax.linen as nn

# Modules in this package that hold building blocks rather than a selectable architecture.
_NOT_MODELS = frozenset({"layers", "depthwise", "native", "convert"})


def available_models() -> list[str]:
    """Names accepted by :func:`get_model` (the architecture modules of this package)."""
    return sorted(
        m.name
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_") and m.name not in _NOT_MODELS
    )


def get_model(name: str, *, num_classes: int, **kwargs) -> nn.Module:
    """Builds ``medjax.models.<name>.Model(num_classes=..., **kwargs)``.

    Raises:
      ValueError: if ``name`` is not an architecture module; the message lists the available names.
    """
    names = available_models()
    if name not in names:
        raise ValueError(f"Unknown model_name {name!r}. Available models: {', '.join(names)}.")
    module = importlib.import_module(f"medjax.models.{name}")
    return module.Model(num_classes=num_classes, **kwargs)
