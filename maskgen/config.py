"""The typed configuration tree of a training run, YAML presets and `key=value` overrides.

A run's configuration is a `Config`: the method's name plus the sections
    model      the architecture (what a saved model's config.json holds), the method's `model_config`;
    METHOD     the method's own options (objective, what its data path needs), its `options_class`; the YAML
               section is named after the method (`mage:`, `tokenizer:`, ...), in Python it is `cfg.objective`;
    data / optim / schedule / train / dist / log / vis   shared by every method.
Presets are YAML files in `maskgen/configs/` (a preset may name a `base:` preset it extends). Every value is
checked against its field's type, choices and bounds before any work starts (`maskgen.options`); problems raise
`ConfigError` with one line. This module knows no method: callers hand it the method's class (`METHODS.get`).
Keys that moved keep working (`LEGACY_KEYS` and a method's `legacy_keys`), with a deprecation note.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .options import Options, build_options, did_you_mean, option

log = logging.getLogger("maskgen")


@dataclass
class DataConfig(Options):
    path: str = option("cifar10", "image folder, WebDataset shards (brace patterns allowed), 'cifar10' or 'mnist5k' (embedded demo set)")
    split: str = option("train", "split of 'cifar10', 'mnist5k' or a folder with train/ and test/ sub-folders; data "
                                 "without splits is all 'train'", choices=("train", "test"))
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
    num_workers: int = option(0, "data-loading worker processes per rank", min=0)


@dataclass
class OptimConfig(Options):
    blr: float = option(1.5e-4, "base learning rate: lr = blr * effective_batch / 256", min=0.0)
    lr: float | None = option(None, "absolute learning rate (overrides the blr rule)", min=0.0)
    betas: list[float] = option([0.9, 0.95], "AdamW betas")
    weight_decay: float = option(0.05, "AdamW weight decay (not applied to 1-D params, biases, or what the model lists in no_weight_decay())", min=0.0)
    eps: float = option(1e-8, "AdamW epsilon", min=0.0)
    clip_grad: float = option(3.0, "clip the global gradient norm to this value (0: off)", min=0.0)


@dataclass
class ScheduleConfig(Options):
    name: str = option("cosine", "learning-rate schedule after warm-up", choices=("cosine", "constant"))
    warmup_epochs: float = option(0.0, "linear warm-up length in epochs (per-step)", min=0.0)
    min_lr: float = option(0.0, "learning rate at the end of the cosine", min=0.0)


@dataclass
class TrainConfig(Options):
    batch_size: int = option(64, "images per process per micro-step", min=1)
    accum_steps: int = option(1, "micro-steps per optimizer step (gradient accumulation)", min=1)
    epochs: float = option(100.0, "schedule length in epochs", min=0.0)
    max_steps: int = option(0, "stop after this many optimizer steps (0: run all epochs); the lr schedule "
                                "still follows `epochs`", min=0)
    seed: int = option(0, "global seed (data order, augmentation, masking, dropout)", min=0)
    precision: str = option("auto", "auto (bf16 where it is faster: CUDA with bf16, or a CPU with native bf16 "
                                    "matmuls; else fp32), fp32, bf16 autocast, or fp16 autocast + GradScaler "
                                    "(CUDA only)", choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = option(False, "torch.compile every transformer block (inductor) before training; a block that "
                                  "fails to compile runs eagerly. Off by default: on 2-core Xeons it made the MAGE "
                                  "step 4 % (fp32) and 42 % (bf16) slower than eager (BENCHMARKS.md, MAGE speed)")
    memory_format: str = option("contiguous", "layout of images and conv weights in training: contiguous (NCHW) or "
                                              "channels_last (NHWC). Which is faster depends on the CPU/GPU, the "
                                              "precision and the conv widths: time both with "
                                              "benchmarks/tokenizer_train_step.py", choices=("contiguous", "channels_last"))
    device: str = option("auto", "auto (CUDA when available), cpu, cuda", choices=("auto", "cpu", "cuda"))
    ema_decay: float = option(0.0, "EMA of the weights (0: off), saved as ema.safetensors", min=0.0, max=1.0)
    init_from: str = option("", "start from the weights of this weights / checkpoint / run directory (a later "
                                "training stage, e.g. UMD's class-conditional fine-tuning): the optimizer and EMA "
                                "start fresh; ignored when resuming")
    save_every: int = option(1000, "save a checkpoint every N optimizer steps (and at the end)", min=1)
    keep_last: int = option(3, "checkpoints to keep", min=1)


@dataclass
class DistConfig(Options):
    backend: str = option("auto", "process-group backend (auto: nccl on CUDA, gloo on CPU)",
                          choices=("auto", "gloo", "nccl"))
    timeout_s: int = option(600, "collective timeout in seconds", min=1)
    find_unused_parameters: bool = option(False, "DDP find_unused_parameters")


@dataclass
class LogConfig(Options):
    every: int = option(10, "write metrics every N optimizer steps", min=1)
    tensorboard: bool = option(True, "also write TensorBoard events")
    progress: bool = option(True, "show a progress bar")


@dataclass
class VisConfig(Options):
    every: int = option(0, "run the method's periodic hooks (sample grids, reconstructions, evaluations) every N "
                           "steps (0: at the end only)", min=0)
    num_images: int = option(16, "images in a sample grid of a generative method (0: no sample grid)", min=0)
    sampler: dict = option({}, "options of the model's sampler for the sample grid, e.g. {num_iter: 4} (see "
                               "`maskgen generate --help`)")


@dataclass
class Config:
    method: str
    model: Any
    objective: Any  # the method's options: YAML section named after the method
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    vis: VisConfig = field(default_factory=VisConfig)


SHARED_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig, "train": TrainConfig,
                   "dist": DistConfig, "log": LogConfig, "vis": VisConfig}

# Keys of every method that moved (old "section.key" -> new "section.key[.subkey]"); `loss.X` keys that no
# table names move to the method's section.
LEGACY_KEYS = {"log.sample_every": "vis.every", "loss.sample_images": "vis.num_images"}


# ----------------------------------------------------------------------------------------- presets
def _preset_dir():
    return resources.files("maskgen") / "configs"


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def read_preset(name_or_path: str, _chain: tuple[str, ...] = ()) -> dict:
    """The raw dict of a preset name or a YAML path, with `base:` presets merged in."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file not found: {name_or_path}")
        key, source = str(path.resolve()), path
    else:
        res = _preset_dir() / f"{name_or_path}.yaml"
        if not res.is_file():
            hint = did_you_mean(name_or_path, list_presets())
            raise ConfigError(f"unknown preset '{name_or_path}'{hint} (see `maskgen config list`)")
        key, source = f"preset:{name_or_path}", res
    if key in _chain:
        raise ConfigError(f"{name_or_path}: 'base:' presets form a cycle ({' -> '.join((*_chain, key))})")
    try:
        data = yaml.safe_load(source.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name_or_path}: not a UTF-8 text file (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name_or_path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name_or_path}: a config must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{name_or_path}: 'base:' must name one preset or YAML file, got {base!r}")
    return _merge(read_preset(base, (*_chain, key)), data)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------------- typed building
def section_classes(method_cls: type) -> dict[str, type]:
    """YAML section name -> option dataclass, for a registered method class."""
    return {"model": method_cls.model_config, method_cls.method_name: method_cls.options_class, **SHARED_SECTIONS}


def parse_overrides(overrides: list[str], sections: list[str] = ()) -> dict:
    """`["train.max_steps=3", "model.ch=32"]` -> nested dict of raw strings (`sections` names them in errors)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            known = f" (sections: {', '.join(sections)})" if sections else ""
            raise ConfigError(f"unknown config key '{key}': keys look like section.key{known}")
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def upgrade_legacy_keys(raw: dict, method_cls: type) -> dict:
    """Move keys of an older layout to where they live now, with one deprecation note per key."""
    table = {**LEGACY_KEYS, **getattr(method_cls, "legacy_keys", {})}
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for sec in [s for s in raw if isinstance(raw[s], dict)]:
        for key in list(raw[sec]):
            old = f"{sec}.{key}"
            new = table.get(old) or (f"{method_cls.method_name}.{key}" if sec == "loss" else None)
            if new is None or new == old:
                continue
            value = raw[sec].pop(key)
            log.warning("config key '%s' is deprecated: use '%s'", old, new)
            path = new.split(".")
            node = raw
            for part in path[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"config key '{old}' moved to '{new}', which is not a mapping here")
            node.setdefault(path[-1], value)
        if not raw[sec] and sec not in section_classes(method_cls):
            del raw[sec]
    return raw


def _build(method_cls: type, raw: dict) -> Config:
    """`raw`: sections in today's layout (see upgrade_legacy_keys)."""
    classes = section_classes(method_cls)
    for sec in raw:
        if sec not in classes:
            raise ConfigError(f"unknown config key '{sec}'{did_you_mean(sec, classes)} "
                              f"(sections: {', '.join(classes)})")
    sections = {name: build_options(cls, raw.get(name) or {}, name) for name, cls in classes.items()}
    objective = sections.pop(method_cls.method_name)
    cfg = Config(method=method_cls.method_name, objective=objective, **sections)
    validate(cfg)
    return cfg


def build_config(method_cls: type, preset: str | None, overrides: list[str] = ()) -> Config:
    """The validated config of a registered method class from a preset (name or YAML path) plus overrides."""
    raw = read_preset(preset) if preset else {}
    preset_method = raw.pop("method", method_cls.method_name)
    if preset_method != method_cls.method_name:
        raise ConfigError(f"config '{preset}' is for method '{preset_method}', not '{method_cls.method_name}'")
    overrides = parse_overrides(list(overrides), list(section_classes(method_cls)))
    # each layer is upgraded on its own, so that an old key given as an override still wins over the preset
    return _build(method_cls, _merge(upgrade_legacy_keys(raw, method_cls), upgrade_legacy_keys(overrides, method_cls)))


def validate(cfg: Config) -> None:
    """Checks that involve more than one section, or the method (its options class checks its own fields)."""
    lo, hi = cfg.data.crop_scale if len(cfg.data.crop_scale) == 2 else (None, None)
    if lo is None or not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.crop_scale: expected [min, max] with 0 < min <= max <= 1, got {cfg.data.crop_scale}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected two values in [0, 1), got {cfg.optim.betas}")
    if cfg.train.epochs <= 0 and cfg.train.max_steps == 0:
        raise ConfigError("train.epochs must be > 0 (or set train.max_steps)")
    if cfg.train.precision == "fp16" and cfg.train.device == "cpu":
        raise ConfigError("train.precision: fp16 is CUDA-only (it is ~1000x slower on CPU); use bf16 or fp32")


def config_from_dict(method_cls: type, data: dict) -> Config:
    """Rebuild a saved (resolved) config, e.g. from a run directory's config.yaml."""
    data = dict(data)
    data.pop("method", None)
    return _build(method_cls, upgrade_legacy_keys(data, method_cls))


def config_to_dict(cfg: Config) -> dict:
    out = {"method": cfg.method}
    for f in dataclasses.fields(cfg):
        if f.name == "method":
            continue
        out[cfg.method if f.name == "objective" else f.name] = dataclasses.asdict(getattr(cfg, f.name))
    return out


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
