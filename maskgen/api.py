"""The Python face of the command line: each `maskgen` command is a function here (and in `maskgen`); the
evaluations are their building blocks (features, then a probe / kNN / few-shot on them, or `evaluate_fid`).

This is the top of the package: it imports the methods (which registers them) and hands their classes to the
configuration layer, which knows no method by name.
"""
from __future__ import annotations

from pathlib import Path

from . import methods  # noqa: F401  (registers the built-in methods)
from . import sampling  # noqa: F401  (registers the built-in samplers)
from .config import Config, config_to_yaml, list_presets, read_preset
from .config import build_config as _build_config
from .convert.mae import convert_mae
from .convert.mage import convert_mage
from .convert.vqgan import convert_vqgan
from .data.teacher_cache import cache_teacher
from .data.token_cache import cache_tokens
from .engine.trainer import train as _train
from .errors import ConfigError
from .eval.features import compute_features, extract_features
from .eval.fewshot import fewshot_eval
from .eval.fid import evaluate_fid
from .eval.knn import knn_classify
from .eval.linear_probe import train_linear_probe
from .generation import edit_image, generate_images
from .reconstruction import reconstruct_image
from .outputs import prepare_dir
from .registry import METHODS


def build_config(method: str, config: str | None = None, overrides: list[str] = ()) -> Config:
    """The validated config of the registered method `method` from a preset name or YAML path plus overrides."""
    return _build_config(METHODS.get(method), config, list(overrides))


def train(method: str, config: str | None = None, overrides: list[str] = (), run_dir: str | Path | None = None,
          resume: str | None = None) -> Path:
    """`maskgen train METHOD --config PRESET key=value ...`; returns the run directory."""
    return _train(build_config(method, config, overrides), run_dir=run_dir, resume=resume)


def show_config(preset: str, overrides: list[str] = ()) -> str:
    """`maskgen config show PRESET`: the resolved config of a preset, as YAML."""
    method = read_preset(preset).get("method")
    if method is None:
        raise ConfigError(f"preset '{preset}' names no method")
    return config_to_yaml(build_config(method, preset, overrides))


CONVERTERS = {"vqgan": convert_vqgan, "mage": convert_mage, "mae": convert_mae}


def convert(kind: str, src: str | Path, out: str | Path, **options) -> Path:
    """`maskgen convert KIND --src FILE --out DIR`: import an official checkpoint; returns DIR. `options` go to the
    converter (MAE: norm_pix_loss)."""
    prepare_dir(out, "output folder", create=False)
    return CONVERTERS[kind](src, out, **options)


__all__ = ["build_config", "train", "show_config", "list_presets", "convert", "cache_tokens", "cache_teacher",
           "generate_images", "edit_image", "reconstruct_image", "extract_features", "compute_features",
           "train_linear_probe", "knn_classify", "fewshot_eval", "evaluate_fid"]
