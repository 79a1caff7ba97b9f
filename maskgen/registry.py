"""The three registries: models, methods and samplers, each filled by a class decorator and looked up by name.

    @MODELS.register("mage", config=MAGEConfig)       a saveable architecture (config.json records the name)
    @METHODS.register("mage", model=MAGEConfig, options=MAGEObjective)  what `maskgen train NAME` runs
    @SAMPLERS.register("maskgit", options=MaskGITOptions)               how a generative model samples

The built-in entries register when their package is imported (`maskgen.models`, `maskgen.methods`,
`maskgen.sampling`); `load_plugins()` imports the modules named in the `MASKGEN_PLUGINS` environment variable
(comma-separated) and those of the `maskgen.plugins` entry-point group, so a new method can live outside the
package and still be trained, saved, loaded and sampled through the normal `maskgen` command line.
This module imports nothing of maskgen but its errors: every layer may use it.
"""
from __future__ import annotations

import functools
import importlib
import os
from importlib.metadata import entry_points
from typing import Any, Callable

from .errors import UserError


class Registry:
    """name -> class. `register(name, **info)` sets the class attribute `name_attribute` to the name and stores
`info` as attributes of the class (e.g. `config=` -> `config_class`)."""

    def __init__(self, kind: str, name_attribute: str, attributes: dict[str, str]):
        self.kind = kind
        self._name_attribute = name_attribute  # class attribute that receives the registered name
        self._attributes = attributes  # keyword of register() -> class attribute it sets
        self._entries: dict[str, type] = {}

    def register(self, name: str, **info: Any) -> Callable[[type], type]:
        unknown = set(info) - set(self._attributes)
        if unknown:
            raise TypeError(f"{self.kind} registry: unknown keywords {sorted(unknown)}")

        def wrap(cls: type) -> type:
            old = self._entries.get(name)
            if old is not None and old.__qualname__ != cls.__qualname__:
                raise ValueError(f"{self.kind} '{name}' is already registered by {old.__module__}.{old.__qualname__}")
            setattr(cls, self._name_attribute, name)
            for key, attr in self._attributes.items():
                setattr(cls, attr, info.get(key, getattr(cls, attr, None)))
            self._entries[name] = cls
            return cls

        return wrap

    def get(self, name: str) -> type:
        load_plugins()
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} '{name}' (available: {', '.join(self.names()) or 'none'})")
        return self._entries[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)


MODELS = Registry("model", "model_name", {"config": "config_class"})
METHODS = Registry("method", "method_name", {"model": "model_config", "options": "options_class",
                                             "summary": "summary"})
SAMPLERS = Registry("sampler", "sampler_name", {"options": "options_class"})

_loaded: set[str] = set()


@functools.cache
def _entry_point_plugins() -> tuple[str, ...]:
    """Modules of the `maskgen.plugins` entry-point group, read once per process (installed packages do not
    change while it runs)."""
    try:
        return tuple(ep.value for ep in entry_points(group="maskgen.plugins"))
    except Exception:  # a broken distribution's metadata must not stop the library
        return ()


def load_plugins() -> None:
    """Import the plugin modules (MASKGEN_PLUGINS, entry points `maskgen.plugins`) not imported yet."""
    names = [m.strip() for m in os.environ.get("MASKGEN_PLUGINS", "").split(",") if m.strip()]
    for name in [*names, *_entry_point_plugins()]:
        if name in _loaded:
            continue
        _loaded.add(name)
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UserError(f"cannot import maskgen plugin '{name}' (MASKGEN_PLUGINS / entry points): {e}") from None
