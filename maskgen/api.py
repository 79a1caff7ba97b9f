"""Every command is also a Python function."""
from __future__ import annotations

from pathlib import Path

from .config import build_config, config_to_yaml, list_presets


def train(method: str, config: str | None = None, overrides: list[str] = (), run_dir: str | Path | None = None,
          resume: str | None = None) -> Path:
    """`maskgen train METHOD --config PRESET key=value ...`; returns the run directory."""
    from .engine.trainer import train as _train

    return _train(build_config(method, config, overrides), run_dir=run_dir, resume=resume)


def show_config(preset: str, overrides: list[str] = ()) -> str:
    """The resolved config of a preset, as YAML."""
    from .config import read_preset

    method = read_preset(preset).get("method")
    if method is None:
        from .errors import ConfigError

        raise ConfigError(f"preset '{preset}' names no method")
    return config_to_yaml(build_config(method, preset, overrides))


def convert(kind: str, src: str | Path, out: str | Path) -> Path:
    """`maskgen convert KIND --src FILE --out DIR`: import an official checkpoint; returns DIR."""
    from .convert.mage import convert_mage
    from .convert.vqgan import convert_vqgan

    converters = {"vqgan": convert_vqgan, "mage": convert_mage}
    return converters[kind](src, out)


__all__ = ["train", "show_config", "list_presets", "convert"]
