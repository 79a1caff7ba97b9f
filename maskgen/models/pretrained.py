"""Saving and loading registered models: `save_pretrained(model, DIR)` and `from_pretrained(DIR)`.

`config.json` records the registry name and the config dataclass of the model, so `from_pretrained` rebuilds
any model of the `MODELS` registry (built-in or from a plugin). A model may carry attachments outside its
state_dict (MAGE's frozen tokenizer): `save_attachments(DIR)` / `load_attachments(DIR)` hooks, when defined.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..registry import MODELS
from ..weights import CONFIG_FILE, EMA_FILE, read_model_config, read_weights, resolve_weights_dir, write_weights


def create_model(name: str, **overrides) -> nn.Module:
    """A registered model built from its config defaults plus `overrides`."""
    cls = MODELS.get(name)
    return cls(cls.config_class(**overrides))


def model_config_dict(model: nn.Module) -> dict:
    """The JSON-able description of a registered model: {"model": name, "config": {...}}."""
    return {"model": model.model_name, "config": dataclasses.asdict(model.config)}


def save_pretrained(model: nn.Module, directory: str | os.PathLike, ema_state: dict | None = None) -> Path:
    """Write `model.safetensors` (+ `ema.safetensors`), `config.json` and the model's attachments into `directory`."""
    directory = write_weights(directory, model.state_dict(), model_config_dict(model), ema_state)
    if hasattr(model, "save_attachments"):  # e.g. MAGE's frozen tokenizer, in a sub-folder
        model.save_attachments(directory)
    return directory


def build_from_config(meta: dict, where: str | os.PathLike = "config.json") -> nn.Module:
    """The model described by a config.json dict {"model": name, "config": {...}}, randomly initialised.
    Keys a model's `legacy_config_keys` lists (options that moved out of the architecture) are dropped."""
    try:
        name, cfg = meta["model"], dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where} is not a maskgen model config (missing {e})") from None
    cls = MODELS.get(name)
    for key in getattr(cls, "legacy_config_keys", ()):
        cfg.pop(key, None)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise UserError(f"{where}: unknown keys {unknown} for model '{name}'")
    try:
        return cls(cls.config_class(**cfg))
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: invalid config for model '{name}' ({e})") from None


def from_pretrained(path: str | os.PathLike, ema: bool | str = False, device: str | torch.device = "cpu") -> nn.Module:
    """The model saved in `path` (a weights, checkpoint or run directory), in eval mode.

    `ema=True` loads the EMA weights (a UserError where the checkpoint has none); `ema="auto"` loads them where the
    checkpoint has them, else the weights. A run directory resolves to its latest
    checkpoint; when a training run prunes that checkpoint while it is being read (`train.keep_last`), the next
    latest is read instead."""
    for attempt in range(5):
        directory = resolve_weights_dir(path)
        try:
            model = _load(directory, (directory / EMA_FILE).is_file() if ema == "auto" else bool(ema))
            break
        except UserError:  # retried only when a newer checkpoint replaced the one being read
            if Path(path) == directory or attempt == 4 or resolve_weights_dir(path) == directory:
                raise
    return model.to(device).eval()


def untrained_model(path: str | os.PathLike, seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """The architecture saved in `path` at a fresh initialisation drawn from `seed`, in eval mode: the baseline a
    pre-training must beat. Attachments (MAGE's frozen tokenizer) are loaded as saved: they are not what the
    pre-training learned."""
    directory = resolve_weights_dir(path)
    meta = read_model_config(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_from_config(meta, directory / CONFIG_FILE)
    if hasattr(model, "load_attachments"):
        model.load_attachments(directory)
    return model.to(device).eval()


def _load(directory: Path, ema: bool) -> nn.Module:
    meta, state = read_weights(directory, ema=ema)
    model = build_from_config(meta, directory / "config.json")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ from config.json
        detail = str(e).strip().splitlines()
        raise UserError(f"{directory}: the weights do not fit its config.json ({detail[-1].strip()[:200]})") from None
    if missing or unexpected:
        raise UserError(f"{directory} does not match model '{model.model_name}': missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    if hasattr(model, "load_attachments"):
        model.load_attachments(directory)
    return model
