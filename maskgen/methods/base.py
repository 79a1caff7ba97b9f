"""What the engine expects of a method."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn


@dataclass
class HookContext:
    """Handed to a method's periodic hooks (rank 0 only, under no_grad, model in eval mode)."""
    step: int
    run_dir: Path
    device: torch.device
    images: torch.Tensor | None  # [N,3,S,S] in [0,1]: fixed training images (None when training from tokens)
    log: Callable[[dict], None]  # log({"name": float}) into metrics.jsonl / TensorBoard at this step
    log_image: Callable[[str, torch.Tensor], None]  # (tag, [3,H,W] in [0,1])


class Method(nn.Module):
    """A trainable method. Subclasses implement `forward_loss` and `release_model`.

    - `forward_loss(batch) -> (loss, logs)`: `batch` holds "image" [B,3,S,S] in [0,1] (or "tokens" [B,h,w]
      from a token cache), "label" [B] (-1 when unlabeled) and "step" (int, the optimizer step being taken);
      `logs` maps names to floats / 0-d tensors, averaged and written by the engine.
    - `release_model()`: the sub-module saved as `model.safetensors` (what `from_pretrained` returns);
      anything else trainable (a discriminator, a projection head) goes into the training state.
    - `hooks()`: callables `hook(model, ctx: HookContext)` run every `log.sample_every` steps and at the end.
    Randomness inside `forward_loss` uses torch's global RNG, which the engine re-seeds every micro-step
    from (seed, rank, step), so runs are reproducible and resume exactly.
    """

    def forward(self, batch: dict):
        return self.forward_loss(batch)

    def forward_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def release_model(self) -> nn.Module:
        raise NotImplementedError

    def hooks(self) -> list[Callable]:
        return []

    def no_weight_decay(self) -> set[str]:
        return set()
