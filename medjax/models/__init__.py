"""Model registry: one architecture per module, each exporting a flax.linen ``Model``.

``config.model_name`` names the module (``medjax.models.<name>``) and ``config.model`` holds only its
keyword arguments, so adding an architecture means adding one file.
"""

import dataclasses
import importlib
import pkgutil

import flax.linen as nn

from medjax.errors import ConfigError

# Modules in this package that hold building blocks rather than a selectable architecture.
_NOT_MODELS = frozenset({"layers", "depthwise", "native", "convert"})


def available_models() -> list[str]:
    """Names accepted by :func:`get_model` (the architecture modules of this package)."""
    return sorted(
        m.name
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_") and m.name not in _NOT_MODELS
    )


def _model_class(name: str) -> type[nn.Module]:
    names = available_models()
    if name not in names:
        raise ValueError(f"Unknown model_name {name!r}. Available models: {', '.join(names)}.")
    return importlib.import_module(f"medjax.models.{name}").Model


def supports_remat(name: str) -> bool:
    """Whether model ``name`` rematerialises its blocks on request (a ``remat`` field)."""
    return "remat" in {f.name for f in dataclasses.fields(_model_class(name))}


def get_model(name: str, *, num_classes: int, remat: str = "none", **kwargs) -> nn.Module:
    """Builds ``medjax.models.<name>.Model(num_classes=..., **kwargs)``, with ``remat`` (``train.remat``)
    passed on unless it is 'none'.

    Raises:
      ValueError: if ``name`` is not an architecture module; the message lists the available names.
      ConfigError: ``remat`` asked of a model without rematerialised blocks; the message lists those with.
    """
    model_class = _model_class(name)
    if remat != "none":
        if not supports_remat(name):
            able = [m for m in available_models() if supports_remat(m)]
            raise ConfigError(
                f"train.remat={remat!r}: model {name!r} has no rematerialised blocks; set "
                f"train.remat='none', or use one of {', '.join(able)}."
            )
        kwargs["remat"] = remat
    return model_class(num_classes=num_classes, **kwargs)
