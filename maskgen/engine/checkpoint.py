"""Training checkpoints: one directory per saved step, written atomically.

    checkpoints/step_00001000/
        model.safetensors, config.json   the release model (what `from_pretrained` returns)
        ema.safetensors                  its EMA weights, when train.ema_decay > 0
        training_state.pt                optimizer, grad scaler, method-only tensors: tensors + plain types
        trainer.json                     step, data position, seed, world size
        train_config.yaml                the resolved training config

A checkpoint is written into `step_N.tmp` and renamed to `step_N` once complete (rename is atomic), so a
crash or SIGKILL mid-write leaves the previous checkpoints intact; a failed write (a full disk) removes its
`.tmp` folder, and stale ones (after a SIGKILL) are ignored and removed by the next save.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..models.pretrained import save_pretrained
from ..errors import UserError
from ..weights import (EMA_FILE, STATE_FILE, TRAIN_CONFIG_FILE, TRAINER_FILE, WEIGHTS_FILE, read_safetensors,
                       safe_torch_load, step_dirs)


def _fsync_tree(path: Path) -> None:
    """Flush every file and folder under `path` to disk, so the rename publishes complete data."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(root: str | os.PathLike, step: int, release_model: torch.nn.Module, *,
                    training_state: dict, trainer_state: dict, config_yaml: str,
                    ema_state: dict | None = None, keep_last: int = 3) -> Path:
    """Write checkpoint `step` under `root` atomically and prune all but the newest `keep_last`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        save_pretrained(release_model, tmp, ema_state=ema_state)
        torch.save(training_state, tmp / STATE_FILE)
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        (tmp / TRAIN_CONFIG_FILE).write_text(config_yaml)
        _fsync_tree(tmp)
    except BaseException:  # a full disk, a kill...: leave no partial folder (the older checkpoints are intact)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving the same step (e.g. a resumed run that stops where it resumed)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in step_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict, dict, dict, dict | None]:
    """(release-model state, training state, trainer state, EMA state or None) of a checkpoint directory."""
    directory = Path(directory)
    model_state = read_safetensors(directory / WEIGHTS_FILE)
    training_state = safe_torch_load(directory / STATE_FILE)
    try:
        trainer_state = json.loads((directory / TRAINER_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{directory / TRAINER_FILE} is not a maskgen trainer state ({type(e).__name__}: "
                        f"{e})") from None
    ema_path = directory / EMA_FILE
    ema_state = read_safetensors(ema_path) if ema_path.is_file() else None
    return model_state, training_state, trainer_state, ema_state
