"""The fine-tuning model of MAE: its encoder + a classification head (the official `models_vit.VisionTransformer`).

images [B, 3, S, S] in [0, 1] -> the pre-trained MAE encoder (`encoder`, an MAE without decoder; nothing masked;
stochastic depth rising linearly to `drop_path`) -> pool ("mean": fc_norm(mean of the patch outputs), a NEW
trainable LayerNorm(1e-6), the pre-trained final norm unused, as with the official `global_pool`; "cls": the
pre-trained norm of the [CLS] output) -> Linear head [B, num_classes] (trunc_normal std 2e-5, bias 0).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..options import Options, option
from ..registry import MODELS
from .encoder_classifier import EncoderClassifier, linear_drop_path
from .mae import MAE, MAEConfig


@dataclass
class MAEClassifierConfig(Options):
    encoder: dict = option({}, "the pre-trained MAEConfig, as a dict")
    num_classes: int = option(10, "classes of the head", min=1)
    drop_path: float = option(0.1, "stochastic depth rate of the last block", min=0.0, lt=1.0)
    pool: str = option("mean", "mean: fc_norm of the mean patch output (official global_pool); cls: norm of [CLS]",
                       choices=("mean", "cls"))


@MODELS.register("mae-classifier", config=MAEClassifierConfig)
class MAEClassifier(EncoderClassifier):
    embedding_prefixes = ("encoder.patch_embed.", "encoder.cls_token", "encoder.pos_embed")
    block_prefix = "encoder.blocks."

    def __init__(self, config: MAEClassifierConfig):
        super().__init__()
        self.config = config
        self.encoder = MAE(MAEConfig(**{**config.encoder, "decoder_depth": 0}))
        linear_drop_path(self.encoder.blocks, config.drop_path)
        dim = self.encoder.config.embed_dim
        if config.pool == "mean":  # only the pooling's norm takes part, so that every parameter gets a gradient (DDP)
            self.encoder.norm = nn.Identity()
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if config.pool == "mean" else None
        self.init_head(dim)

    @classmethod
    def from_mae(cls, mae: MAE, num_classes: int, drop_path: float = 0.1, pool: str = "mean") -> "MAEClassifier":
        """A classifier whose encoder is `mae`'s (patch embedding, [CLS], position table, blocks, norm)."""
        model = cls(MAEClassifierConfig(dataclasses.asdict(mae.config), num_classes, drop_path, pool))
        own = model.encoder.state_dict()
        model.encoder.load_state_dict({k: v for k, v in mae.state_dict().items() if k in own}, strict=True)
        return model

    def forward_features(self, images: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """images [B, 3, S, S] in [0, 1] -> pooled features [B, D]; `pool` must be the fine-tuned one (None: it)."""
        pool = self.check_pool(pool)
        x = self.encoder.encode(images)
        return self.fc_norm(x[:, 1:].mean(1)) if pool == "mean" else self.encoder.norm(x)[:, 0]
