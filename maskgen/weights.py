"""Weights on disk: safetensors + config.json, and a torch.load that never runs pickled code.

A *weights directory* holds `model.safetensors` (the model's state_dict) and `config.json`
(`{"model": name, "config": {...}}`); training checkpoints (`RUN/checkpoints/step_N/`) are weights directories
too, and a run directory resolves to its latest complete checkpoint. Building a model from a weights directory
is `maskgen.models.from_pretrained`; this module only knows the files.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .outputs import atomic_write

WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.json"


def _harmless_globals() -> list:
    """Types that official training scripts (MAGE's and MAE's `main_pretrain.py`) pickle beside the weights and
    that cannot run code: the `args` Namespace and the numpy scalars in it, under numpy 1's and numpy 2's names."""
    import numpy as np

    scalar = np.dtype("float64").type(0).__reduce__()[0]  # numpy's scalar reconstructor
    allowed: list = [argparse.Namespace, np.dtype, (scalar, "numpy.core.multiarray.scalar"),
                     (scalar, "numpy._core.multiarray.scalar")]
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            allowed.append(getattr(np.dtypes, name))
    return allowed


def safe_torch_load(path: str | os.PathLike) -> object:
    """`torch.load(weights_only=True)`: tensors and plain types only (plus an `argparse.Namespace` of training
    arguments and numpy scalars, as official checkpoints hold). A file that needs any other unpickling (which
    could run code) is refused with a UserError instead of being executed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    try:
        with torch.serialization.safe_globals(_harmless_globals()):
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


def write_weights(directory: str | os.PathLike, state: dict[str, torch.Tensor], config: dict,
                  ema_state: dict | None = None) -> Path:
    """Write `model.safetensors` (+ `ema.safetensors`) and, last, `config.json` (`config`, JSON-able) into
    `directory`, each file atomically: an interrupted write leaves no truncated file, and no config.json beside
    weights of another model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).unlink(missing_ok=True)  # a folder being rewritten is no weights folder meanwhile
    if ema_state is None:
        (directory / EMA_FILE).unlink(missing_ok=True)  # never the EMA of an earlier model beside these weights
    files = [(WEIGHTS_FILE, state)] + ([(EMA_FILE, ema_state)] if ema_state is not None else [])
    for name, tensors in files:
        with atomic_write(directory / name) as tmp:
            save_file(_contiguous(tensors), str(tmp))
    with atomic_write(directory / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_weights(directory: str | os.PathLike, ema: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, state dict) of a weights directory; `ema=True` reads `ema.safetensors`."""
    directory = Path(directory)
    meta = read_model_config(directory)
    weights = directory / (EMA_FILE if ema else WEIGHTS_FILE)
    if ema and not weights.is_file():
        raise UserError(f"{directory} has no EMA weights ({EMA_FILE})")
    return meta, read_safetensors(weights)


def read_model_config(directory: str | os.PathLike) -> dict:
    """config.json of a weights directory ({"model": name, "config": {...}}), or a one-line UserError."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise UserError(f"{directory} holds no {CONFIG_FILE}: not a maskgen weights folder")
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{directory / CONFIG_FILE} is not a maskgen model config ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise UserError(f"{directory / CONFIG_FILE} is not a maskgen model config (not a JSON object)")
    return meta


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, truncated or foreign file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError (header, truncation), OSError, ...
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read {path}: not a complete safetensors file ({detail})") from None


# ------------------------------------------------------------------ checkpoint folders of a run directory
STATE_FILE = "training_state.pt"
TRAINER_FILE = "trainer.json"
TRAIN_CONFIG_FILE = "train_config.yaml"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_REQUIRED = (WEIGHTS_FILE, CONFIG_FILE, STATE_FILE, TRAINER_FILE)


def step_dirs(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoint directories (`step_N/` holding every checkpoint file) under `root`, sorted by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and all((d / f).is_file() for f in _REQUIRED):
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def resolve_weights_dir(path: str | os.PathLike) -> Path:
    """A weights directory, or a run directory / its `checkpoints/` (→ the latest complete checkpoint)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return path
    for cand in (path / "checkpoints", path):
        if cand.is_dir():
            latest = latest_checkpoint(cand)
            if latest is not None:
                return latest
    if not path.exists():
        raise UserError(f"no such checkpoint directory: {path}")
    raise UserError(f"{path} holds no {WEIGHTS_FILE} + {CONFIG_FILE}, nor any complete checkpoint")
