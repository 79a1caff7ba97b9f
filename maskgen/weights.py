"""Weights on disk: safetensors + config.json, and a torch.load that never runs pickled code.

A *weights directory* holds `model.safetensors` (the model's state_dict) and `config.json`
(`{"model": name, "config": {...}}`); training checkpoints are weights directories too, and a run
directory resolves to its latest complete checkpoint.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UserError

WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.json"


def safe_torch_load(path: str | os.PathLike) -> object:
    """`torch.load(weights_only=True)`: tensors and plain types only. A file that needs arbitrary
    unpickling (which could run code) is refused with a UserError instead of being executed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"refusing to load {path}: it holds pickled Python objects beyond tensors and plain types, "
            f"which could run arbitrary code. Only load it if you trust its source, e.g. re-save its "
            f"state_dict with torch.save."
        ) from None
    except Exception as e:  # torch raises RuntimeError, EOFError, struct.error... for corrupt files
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read {path}: not a PyTorch checkpoint or corrupt ({detail})") from None


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_pretrained(model: nn.Module, directory: str | os.PathLike, ema_state: dict | None = None,
                    extra_config: dict | None = None) -> Path:
    """Write `model.safetensors` (+ `ema.safetensors`) and `config.json` into `directory`."""
    from .models.registry import model_config_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(model.state_dict()), str(directory / WEIGHTS_FILE))
    if ema_state is not None:
        save_file(_contiguous(ema_state), str(directory / EMA_FILE))
    cfg = model_config_dict(model)
    if extra_config:
        cfg.update(extra_config)
    (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    if hasattr(model, "save_attachments"):  # e.g. MAGE's frozen tokenizer, in a sub-folder
        model.save_attachments(directory)
    return directory


def resolve_weights_dir(path: str | os.PathLike) -> Path:
    """A weights directory, or a run directory / its `checkpoints/` (→ the latest complete checkpoint)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return path
    from .engine.checkpoint import latest_checkpoint

    for cand in (path / "checkpoints", path):
        if cand.is_dir():
            latest = latest_checkpoint(cand)
            if latest is not None:
                return latest
    if not path.exists():
        raise UserError(f"no such checkpoint directory: {path}")
    raise UserError(f"{path} holds no {WEIGHTS_FILE} + {CONFIG_FILE}, nor any complete checkpoint")


def from_pretrained(path: str | os.PathLike, ema: bool = False, device: str | torch.device = "cpu") -> nn.Module:
    """The model saved in `path` (a weights, checkpoint or run directory), in eval mode.

    `ema=True` loads the EMA weights where the checkpoint has them."""
    from .models.registry import model_class

    directory = resolve_weights_dir(path)
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
        name, cfg = meta["model"], meta["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{directory / CONFIG_FILE} is not a maskgen model config ({e})") from None
    cls = model_class(name)
    model = cls(cls.config_class(**cfg))
    weights = directory / (EMA_FILE if ema else WEIGHTS_FILE)
    if ema and not weights.is_file():
        raise UserError(f"{directory} has no EMA weights ({EMA_FILE})")
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{weights} does not match model '{name}': missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hasattr(model, "load_attachments"):
        model.load_attachments(directory)
    return model.to(device).eval()
