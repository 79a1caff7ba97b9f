"""The typed configuration tree, YAML presets and `key=value` overrides.

A run's configuration is a `Config`: `method` plus the sections model / loss (both chosen by the
method) and data / optim / schedule / train / dist / log. Presets are YAML files shipped in
`maskgen/configs/` (a preset may name a `base:` preset it extends). Every value is checked against
its field's type, choices and bounds before any work starts; problems raise `ConfigError` with one line.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def option(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
           max: float | None = None, **kw) -> Any:
    """A config field with its documentation and the values it accepts."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class DataConfig:
    path: str = option("cifar10", "image folder, WebDataset shards (brace patterns allowed), 'cifar10' or 'mnist5k' (embedded demo set)")
    split: str = option("train", "split of a named dataset ('cifar10': train|test)", choices=("train", "test"))
    image_size: int = option(32, "side of the square images handed to the model", min=8)
    augment: str = option("pretrain", "pretrain: RandomResizedCrop + flip; eval: resize + centre crop",
                          choices=("pretrain", "eval"))
    crop_scale: list[float] = option([0.2, 1.0], "RandomResizedCrop area range (MAE/MAGE: 0.2-1.0)")
    interpolation: str = option("bicubic", "resampling filter", choices=("bicubic", "bilinear", "nearest"))
    hflip: bool = option(True, "random horizontal flip (pretrain augmentation; with a token cache: whether its "
                               "flipped views are drawn)")
    color_jitter: float = option(0.0, "SimCLR colour-jitter strength s (brightness/contrast/saturation 0.8s, hue "
                                      "0.2s, applied with p 0.8; pretrain augmentation of images, not of a token "
                                      "cache); 0: off", min=0.0)
    grayscale: float = option(0.0, "probability of converting a view to grayscale (pretrain augmentation)",
                              min=0.0, max=1.0)
    views: int = option(1, "augmented views per image and step: 2 for two-view methods (MAGE-C); each view "
                           "has its own crop, flip and jitter (or its own cached view)", min=1, max=2)
    limit: int = option(0, "use a fixed random subset of N samples (0: all)", min=0)
    tokenizer: str = option("", "tokenizer weights/run directory that turns images into tokens (MAGE)")
    token_cache: str = option("", "read tokens from this `maskgen cache-tokens` file instead of tokenizing images")
    num_workers: int = option(0, "data-loading worker processes per rank", min=0)


@dataclass
class OptimConfig:
    blr: float = option(1.5e-4, "base learning rate: lr = blr * effective_batch / 256", min=0.0)
    lr: float | None = option(None, "absolute learning rate (overrides the blr rule)", min=0.0)
    betas: list[float] = option([0.9, 0.95], "AdamW betas")
    weight_decay: float = option(0.05, "AdamW weight decay (not applied to 1-D params, biases, or what the model lists in no_weight_decay())", min=0.0)
    eps: float = option(1e-8, "AdamW epsilon", min=0.0)
    clip_grad: float = option(3.0, "clip the global gradient norm to this value (0: off)", min=0.0)


@dataclass
class ScheduleConfig:
    name: str = option("cosine", "learning-rate schedule after warm-up", choices=("cosine", "constant"))
    warmup_epochs: float = option(0.0, "linear warm-up length in epochs (per-step)", min=0.0)
    min_lr: float = option(0.0, "learning rate at the end of the cosine", min=0.0)


@dataclass
class TrainConfig:
    batch_size: int = option(64, "images per process per micro-step", min=1)
    accum_steps: int = option(1, "micro-steps per optimizer step (gradient accumulation)", min=1)
    epochs: float = option(100.0, "schedule length in epochs", min=0.0)
    max_steps: int = option(0, "stop after this many optimizer steps (0: run all epochs); the lr schedule "
                                "still follows `epochs`", min=0)
    seed: int = option(0, "global seed (data order, augmentation, masking, dropout)")
    precision: str = option("auto", "auto (bf16 where it is faster: CUDA with bf16, or a CPU with native bf16 "
                                    "matmuls; else fp32), fp32, bf16 autocast, or fp16 autocast + GradScaler "
                                    "(CUDA only)", choices=("auto", "fp32", "bf16", "fp16"))
    memory_format: str = option("contiguous", "layout of images and conv weights in training: contiguous (NCHW) or "
                                              "channels_last (NHWC). Which is faster depends on the CPU/GPU, the "
                                              "precision and the conv widths: time both with "
                                              "benchmarks/tokenizer_train_step.py", choices=("contiguous", "channels_last"))
    device: str = option("auto", "auto (CUDA when available), cpu, cuda", choices=("auto", "cpu", "cuda"))
    ema_decay: float = option(0.0, "EMA of the weights (0: off), saved as ema.safetensors", min=0.0, max=1.0)
    save_every: int = option(1000, "save a checkpoint every N optimizer steps (and at the end)", min=1)
    keep_last: int = option(3, "checkpoints to keep", min=1)


@dataclass
class DistConfig:
    backend: str = option("auto", "process-group backend (auto: nccl on CUDA, gloo on CPU)",
                          choices=("auto", "gloo", "nccl"))
    timeout_s: int = option(600, "collective timeout in seconds", min=1)
    find_unused_parameters: bool = option(False, "DDP find_unused_parameters")


@dataclass
class LogConfig:
    every: int = option(10, "write metrics every N optimizer steps", min=1)
    tensorboard: bool = option(True, "also write TensorBoard events")
    progress: bool = option(True, "show a progress bar")
    sample_every: int = option(0, "run the method's hooks (sample grids, probes) every N steps (0: at the end only)",
                               min=0)


@dataclass
class Config:
    method: str
    model: Any
    loss: Any
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTIONS = ("model", "loss", "data", "optim", "schedule", "train", "dist", "log")


# ----------------------------------------------------------------------------------------- presets
def _preset_dir():
    return resources.files("maskgen") / "configs"


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def read_preset(name_or_path: str) -> dict:
    """The raw dict of a preset name or a YAML path, with `base:` presets merged in."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file not found: {name_or_path}")
        text = path.read_text()
    else:
        res = _preset_dir() / f"{name_or_path}.yaml"
        if not res.is_file():
            hint = _did_you_mean(name_or_path, list_presets())
            raise ConfigError(f"unknown preset '{name_or_path}'{hint} (see `maskgen config list`)")
        text = res.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{name_or_path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name_or_path}: a config must be a mapping of sections")
    base = data.pop("base", None)
    return _merge(read_preset(base), data) if base else data


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------------- typed building
def _did_you_mean(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _parse_scalar(tp, raw: Any, key: str):
    """Convert `raw` (a YAML value or an override string) to type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "~")):
            return None
        return _parse_scalar(args[0], raw, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(raw, str):
            raw = yaml.safe_load(raw) if raw.strip().startswith("[") else [s for s in raw.split(",") if s.strip()]
        if not isinstance(raw, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {raw!r}")
        return [_parse_scalar(item, v, key) for v in raw]
    try:
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return raw.lower() in ("true", "yes", "on", "1")
            raise ValueError
        if tp is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw) if not isinstance(raw, str) else int(raw.replace("_", ""))
        if tp is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if tp is str:
            if isinstance(raw, (dict, list)):
                raise ValueError
            return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {raw!r}") from None
    raise ConfigError(f"{key}: unsupported config type {tp}")


def _check_bounds(f: dataclasses.Field, value, key: str) -> None:
    m = f.metadata
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None:
            continue
        if m.get("choices") and v not in m["choices"]:
            raise ConfigError(f"{key}: {v!r} is not one of {', '.join(map(str, m['choices']))}"
                              f"{_did_you_mean(str(v), map(str, m['choices']))}")
        if m.get("min") is not None and v < m["min"]:
            raise ConfigError(f"{key}: {v!r} is below the minimum {m['min']}")
        if m.get("max") is not None and v > m["max"]:
            raise ConfigError(f"{key}: {v!r} is above the maximum {m['max']}")


def build_section(cls: type, data: dict, prefix: str):
    """A dataclass instance of `cls` from a dict, every key and value checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, raw in data.items():
        full = f"{prefix}.{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{full}'{_did_you_mean(full, (f'{prefix}.{k}' for k in fields))}")
        value = _parse_scalar(hints[key], raw, full)
        _check_bounds(fields[key], value, full)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}: {e}") from None


def section_classes(method: str) -> dict[str, type]:
    from .methods import get_method

    spec = get_method(method)
    return {"model": spec.model_config, "loss": spec.loss_config, "data": DataConfig, "optim": OptimConfig,
            "schedule": ScheduleConfig, "train": TrainConfig, "dist": DistConfig, "log": LogConfig}


def parse_overrides(overrides: list[str]) -> dict:
    """`["train.max_steps=3", "model.ch=32"]` → nested dict of raw strings."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"unknown config key '{key}': keys look like section.key "
                              f"(sections: {', '.join(SECTIONS)})")
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def build_config(method: str, preset: str | None, overrides: list[str] = ()) -> Config:
    """The validated config of `method` from a preset (name or YAML path) plus `key=value` overrides."""
    raw = read_preset(preset) if preset else {}
    preset_method = raw.pop("method", method)
    if preset_method != method:
        raise ConfigError(f"config '{preset}' is for method '{preset_method}', not '{method}'")
    raw = _merge(raw, parse_overrides(list(overrides)))
    classes = section_classes(method)
    for sec in raw:
        if sec not in classes:
            raise ConfigError(f"unknown config key '{sec}'{_did_you_mean(sec, classes)} "
                              f"(sections: {', '.join(SECTIONS)})")
    sections = {name: build_section(cls, raw.get(name) or {}, name) for name, cls in classes.items()}
    cfg = Config(method=method, **sections)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that involve more than one field."""
    lo, hi = cfg.data.crop_scale if len(cfg.data.crop_scale) == 2 else (None, None)
    if lo is None or not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.crop_scale: expected [min, max] with 0 < min <= max <= 1, got {cfg.data.crop_scale}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected two values in [0, 1), got {cfg.optim.betas}")
    if cfg.train.epochs <= 0 and cfg.train.max_steps == 0:
        raise ConfigError("train.epochs must be > 0 (or set train.max_steps)")
    if cfg.train.precision == "fp16" and cfg.train.device == "cpu":
        raise ConfigError("train.precision: fp16 is CUDA-only (it is ~1000x slower on CPU); use bf16 or fp32")


def config_from_dict(data: dict) -> Config:
    """Rebuild a saved (resolved) config, e.g. from a run directory's config.yaml."""
    data = dict(data)
    method = data.pop("method")
    classes = section_classes(method)
    cfg = Config(method=method, **{k: build_section(c, data.get(k) or {}, k) for k, c in classes.items()})
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
