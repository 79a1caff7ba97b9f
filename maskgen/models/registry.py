"""Model registry: every saveable model class registers under a name with its config dataclass.

`create_model(name, **overrides)` builds a model from its config defaults plus overrides;
`config.json` of a saved model records the name, so `from_pretrained` can rebuild it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from ..errors import UserError

_MODELS: dict[str, type[nn.Module]] = {}


def register_model(name: str, config_cls: type) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: `@register_model("vqgan", VQGANConfig)`; the class takes `config` as its only argument."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        cls.model_name = name
        cls.config_class = config_cls
        _MODELS[name] = cls
        return cls

    return wrap


def model_class(name: str) -> type[nn.Module]:
    from . import _import_all  # noqa: F401  (fills the registry)

    if name not in _MODELS:
        raise UserError(f"unknown model '{name}' (known: {', '.join(sorted(_MODELS))})")
    return _MODELS[name]


def create_model(name: str, **overrides) -> nn.Module:
    cls = model_class(name)
    cfg = cls.config_class(**overrides)
    return cls(cfg)


def model_config_dict(model: nn.Module) -> dict:
    """The JSON-able description of a registered model: {"model": name, "config": {...}}."""
    return {"model": model.model_name, "config": dataclasses.asdict(model.config)}
