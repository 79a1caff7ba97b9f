"""What the engine expects of a method: the contract every `@METHODS.register`ed class fulfils.

A method is an `nn.Module` that owns its objective and its data path. The engine builds it with
`Method.from_config(cfg)`, asks it for its dataset (`build_dataset`), calls `forward_loss(batch)` every
micro-step, saves `release_model()` as the run's weights, and runs `hooks()` periodically. It never looks a
method up by name beyond `METHODS.get(cfg.method)`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision.utils import make_grid, save_image

from ..data.loader import AugmentedImages
from ..data.sources import open_source
from ..data.transforms import build_transform
from ..errors import UserError
from ..weights import read_weights, resolve_weights_dir

log = logging.getLogger("maskgen")


@dataclass
class HookContext:
    """Handed to a method's periodic hooks (rank 0 only, under no_grad, model in eval mode)."""
    step: int
    run_dir: Path
    device: torch.device
    images: torch.Tensor | None  # [N,3,S,S] in [0,1]: fixed training images (None when training from tokens)
    num_images: int  # vis.num_images: how many images a sample grid shows
    sampler_options: dict  # vis.sampler: options of the model's sampler for sample grids
    log: Callable[[dict], None]  # log({"name": float}) into metrics.jsonl / TensorBoard at this step
    log_image: Callable[[str, torch.Tensor], None]  # (tag, [3,H,W] in [0,1])

    def save_grid(self, images: torch.Tensor, tag: str, prefix: str = "", nrow: int | None = None) -> Path:
        """images [N, 3, H, W] in [0, 1] -> `samples/{prefix}step_N.png` (`nrow` per row, default up to 8) and
        TensorBoard `tag`."""
        grid = make_grid(images.float().cpu(), nrow=nrow or min(8, len(images)))
        out = self.run_dir / "samples" / f"{prefix}step_{self.step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, out)
        self.log_image(tag, grid)
        return out


class Method(nn.Module):
    """A trainable method. Register a subclass with
    `@METHODS.register(NAME, model=ModelConfig, options=MethodOptions, summary="...")`: `cfg.model` is then a
    ModelConfig (the architecture, saved with the weights) and `cfg.objective` a MethodOptions (the YAML
    section named NAME). A class attribute `legacy_keys = {"old.key": "new.key"}` keeps moved keys working.

    - `from_config(cfg)`: the method for a validated `Config` (default: `cls(cfg)`).
    - `build_dataset(cfg) -> (dataset, description)`: the training data in the loader's `dataset[(epoch, index)]`
      protocol (default: augmented images of `data.path`; MAGE may read a token cache instead).
    - `forward_loss(batch) -> (loss, logs)`: `batch` holds what the dataset yields ("image" [B,3,S,S] in [0,1],
      or e.g. "tokens" [B,h,w]), "label" [B] (-1 when unlabeled) and "step" (int, the optimizer step being
      taken); `logs` maps names to floats / 0-d tensors, averaged and written by the engine.
    - `release_model()`: the sub-module saved as `model.safetensors` (what `from_pretrained` returns);
      anything else trainable (a discriminator, a projection head) goes into the training state.
    - `hooks()`: callables `hook(method, ctx: HookContext)` run every `vis.every` steps and at the end.
    - `init_from(directory)`: start from saved weights (`train.init_from`, a later training stage) before the
      optimizer and the EMA are made; the default loads the release model's tensors (`load_release_weights`).
    Randomness inside `forward_loss` uses torch's global RNG, which the engine re-seeds every micro-step
    from (seed, rank, step), so runs are reproducible and resume exactly.
    """

    method_name: str
    legacy_keys: dict[str, str] = {}

    @classmethod
    def from_config(cls, cfg) -> "Method":
        return cls(cfg)

    def build_dataset(self, cfg) -> tuple[object, str]:
        source = open_source(cfg.data.path, cfg.data.split)
        return AugmentedImages(source, build_transform(cfg.data), cfg.train.seed, cfg.data.views), source.description

    def forward(self, batch: dict):
        return self.forward_loss(batch)

    def forward_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def release_model(self) -> nn.Module:
        raise NotImplementedError

    def hooks(self) -> list[Callable]:
        return []

    def init_from(self, directory: str | Path) -> None:
        load_release_weights(self.release_model(), directory)


def load_release_weights(model: nn.Module, directory: str | Path) -> list[str]:
    """Load the weights saved in `directory` (weights / checkpoint / run directory) into `model`, for a new training
    stage. Every saved tensor must exist in `model` with the same shape (else a UserError); tensors of `model` that
    the saved model lacks (e.g. a new label embedder) keep their initialisation. Returns their names."""
    source = resolve_weights_dir(directory)
    meta, state = read_weights(source)
    name = getattr(model, "model_name", None)
    if meta.get("model") != name:
        raise UserError(f"train.init_from {directory} holds a '{meta.get('model')}' model, not a '{name}' model")
    own = model.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if bad:
        detail = ", ".join(f"{k} {list(state[k].shape)}" + (f" vs {list(own[k].shape)}" if k in own else " (absent)")
                           for k in bad[:3])
        raise UserError(f"train.init_from {directory}: its weights do not fit this model's architecture ({detail}); "
                        f"use the same model settings as the run it comes from")
    model.load_state_dict(state, strict=False)
    new = [k for k in own if k not in state]
    log.info("initialised from %s%s", source, f"; new (not in it): {', '.join(new)}" if new else "")
    return new
