"""The fine-tuning model of UMD (`maskgen eval finetune`): its encoder at time 0 + a classification head.

images [B, 3, S, S] in [0, 1] -> model space (pixels in [-1, 1]; pixel-mode UMD only) -> the pre-trained encoder
(patch embedding, position table, 4 CLS tokens, blocks conditioned on the clean time 0 through the pre-trained
time trunk, final norm; nothing masked; stochastic depth rising linearly to `drop_path`) -> pool ("cls": the mean
of the 4 CLS outputs, UMD's representation; "mean": the mean of the patch outputs) -> Linear head [B, num_classes]
(trunc_normal std 2e-5, bias 0). The decoder and any label embedder are not part of it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..options import Options, option
from ..registry import MODELS
from .encoder_classifier import EncoderClassifier, linear_drop_path
from .umd import UMD, UMDConfig

DECODER_PARTS = ("mask_token", "decoder_pos_embed", "decoder_blocks", "decoder_norm", "final_modulation", "head")


@dataclass
class UMDClassifierConfig(Options):
    encoder: dict = option({}, "the pre-trained UMDConfig, as a dict")
    num_classes: int = option(10, "classes of the head", min=1)
    drop_path: float = option(0.1, "stochastic depth rate of the last block", min=0.0, lt=1.0)
    pool: str = option("cls", "cls: the mean of the 4 CLS outputs (UMD's representation); mean: of the patch outputs",
                       choices=("mean", "cls"))


@MODELS.register("umd-classifier", config=UMDClassifierConfig)
class UMDClassifier(EncoderClassifier):
    embedding_prefixes = ("encoder.patch_embed.", "encoder.pos_embed", "encoder.cls_tokens", "encoder.time_trunk.")
    block_prefix = "encoder.blocks."

    def __init__(self, config: UMDClassifierConfig):
        super().__init__()
        self.config = config
        enc = UMDConfig(**{**config.encoder, "num_classes": 0})
        if enc.latent_channels:
            raise UserError("fine-tuning a latent-mode UMD as a classifier is not supported (pixel-mode UMD only)")
        self.encoder = UMD(enc)
        for name in DECODER_PARTS:
            delattr(self.encoder, name)
        linear_drop_path(self.encoder.blocks, config.drop_path)
        self.init_head(enc.embed_dim)

    @classmethod
    def from_umd(cls, umd: UMD, num_classes: int, drop_path: float = 0.1, pool: str = "cls") -> "UMDClassifier":
        """A classifier whose encoder (and time trunk) are `umd`'s."""
        model = cls(UMDClassifierConfig(dataclasses.asdict(umd.config), num_classes, drop_path, pool))
        own = model.encoder.state_dict()
        model.encoder.load_state_dict({k: v for k, v in umd.state_dict().items() if k in own}, strict=True)
        return model

    def forward_features(self, images: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """images [B, 3, S, S] in [0, 1] -> pooled features [B, D]; `pool` must be the fine-tuned one (None: it)."""
        return self.encoder.forward_features(images, self.check_pool(pool))
