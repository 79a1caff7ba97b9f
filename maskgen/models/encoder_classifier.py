"""What the fine-tuning models (MAGE, MAE and UMD classifiers) share: a linear head on pooled encoder features,
the pooling they were fine-tuned with, and the layer ids of layer-wise lr decay (official `get_layer_id_for_vit`).

A subclass has a config with `num_classes`, `drop_path` and `pool`, sets `embedding_prefixes` (parameter names at
layer 0) and `block_prefix` (blocks.i -> layer i + 1; everything else is the top layer, depth + 1), calls
`init_head(dim)`, and implements `forward_features(images, pool)` (after `check_pool`); `image_size` and `depth`
read its pre-trained `encoder` unless it overrides them.
"""
from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn


def linear_drop_path(blocks: nn.ModuleList, rate: float) -> None:
    """Stochastic depth rising linearly from 0 (first block) to `rate` (last block), set on `blocks` in place."""
    for blk, r in zip(blocks, torch.linspace(0, rate, len(blocks)).tolist()):
        blk.drop_path = DropPath(r) if r > 0 else nn.Identity()


class EncoderClassifier(nn.Module):
    embedding_prefixes: tuple[str, ...] = ()
    block_prefix = "blocks."

    def init_head(self, dim: int) -> None:
        """The head Linear(dim, num_classes): weight trunc_normal std 2e-5, bias 0 (official)."""
        self.head = nn.Linear(dim, self.config.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    @property
    def image_size(self) -> int:
        """The side of the images it reads (default: that of its pre-trained `encoder`)."""
        return self.encoder.config.image_size

    @property
    def depth(self) -> int:
        """Encoder blocks (default: those of its `encoder`)."""
        return len(self.encoder.blocks)

    @property
    def default_pool(self) -> str:
        """The pooling it was fine-tuned with (what its features use by default)."""
        return self.config.pool

    @property
    def num_layers(self) -> int:
        """The top layer id of `layer_id` (depth + 1)."""
        return self.depth + 1

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay index: embeddings 0, blocks.i i+1, the rest (norms, head) depth+1."""
        if name.startswith(self.embedding_prefixes):
            return 0
        if name.startswith(self.block_prefix):
            return int(name[len(self.block_prefix):].split(".")[0]) + 1
        return self.num_layers

    def check_pool(self, pool: str | None) -> str:
        """`pool`, which must be the fine-tuned one (None: that one)."""
        pool = pool or self.config.pool
        if pool != self.config.pool:
            raise ValueError(f"this classifier was fine-tuned with pool '{self.config.pool}', not '{pool}'")
        return pool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] in [0, 1] -> logits [B, num_classes]."""
        return self.head(self.forward_features(images))
