"""The fine-tuning model: a MAGE encoder + classification head (the official `VisionTransformerMage`).

images [B, 3, S, S] in [0, 1] -> frozen VQGAN tokens [B, L] -> [C0] + tokens -> token embedding -> encoder
blocks (all 1+L tokens, nothing masked; stochastic depth with rates rising linearly to `drop_path`) ->
pool ("mean": fc_norm(mean of the L image-token outputs), a NEW trainable LayerNorm(eps 1e-6) as with
`global_pool`, the pre-trained final `norm` dropped; "cls": the pre-trained `norm` of the [C0] output) -> Linear head [B, num_classes]
(trunc_normal std 2e-5, bias 0). The decoder of the pre-trained MAGE is not part of it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..options import Options, option
from ..registry import MODELS
from .encoder_classifier import EncoderClassifier
from .frozen_tokenizer import FrozenTokenizerMixin
from .layers import Block
from .mage import MAGE, MAGEConfig, TokenEmbedding

ENCODER_PREFIXES = ("token_emb.", "blocks.")


@dataclass
class MAGEClassifierConfig(Options):
    encoder: dict = option({}, "the pre-trained MAGEConfig, as a dict")
    num_classes: int = option(10, "classes of the head", min=1)
    drop_path: float = option(0.1, "stochastic depth rate of the last block", min=0.0, lt=1.0)
    pool: str = option("mean", "mean: fc_norm of the mean image-token output; cls: norm of [C0]",
                       choices=("mean", "cls"))


@MODELS.register("mage-classifier", config=MAGEClassifierConfig)
class MAGEClassifier(FrozenTokenizerMixin, EncoderClassifier):
    embedding_prefixes = ("token_emb.",)

    def __init__(self, config: MAGEClassifierConfig):
        super().__init__()
        self.config = config
        self.mage_config = c = MAGEConfig(**config.encoder)
        self.token_emb = TokenEmbedding(c.vocab_size, c.embed_dim, c.num_tokens + 1, c.dropout)
        # stochastic depth rising linearly from 0 (first block) to config.drop_path (last block)
        rates = torch.linspace(0, config.drop_path, c.depth).tolist() if c.depth else []
        self.blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, c.mlp_ratio, drop=c.dropout, attn_drop=c.dropout,
                                          drop_path=rate) for rate in rates)
        # only the pooling's norm exists, so that every parameter gets a gradient (DDP)
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6) if config.pool == "cls" else None
        self.fc_norm = nn.LayerNorm(c.embed_dim, eps=1e-6) if config.pool == "mean" else None
        self.init_head(c.embed_dim)

    @property
    def image_size(self) -> int:
        return self.mage_config.image_size

    @property
    def depth(self) -> int:
        return self.mage_config.depth

    @classmethod
    def from_mage(cls, mage: MAGE, num_classes: int, drop_path: float = 0.1, pool: str = "mean") -> "MAGEClassifier":
        """A classifier whose encoder (token_emb, blocks, norm) and tokenizer are those of `mage`."""
        model = cls(MAGEClassifierConfig(dataclasses.asdict(mage.config), num_classes, drop_path, pool))
        prefixes = ENCODER_PREFIXES + (("norm.",) if pool == "cls" else ())
        state = {k: v for k, v in mage.state_dict().items() if k.startswith(prefixes)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and {k.split(".")[0] for k in missing} == ({"head", "fc_norm"} if pool == "mean"
                                                                           else {"head"}), missing
        model.set_tokenizer(mage.tokenizer)
        return model

    def forward_features(self, x: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """images [B, 3, S, S] in [0, 1] (or tokens [B, L] long) -> pooled features [B, D]; `pool` must be the
        one the classifier was fine-tuned with (None: that one)."""
        pool = self.check_pool(pool)
        if x.is_floating_point():
            if self.tokenizer is None:
                raise UserError("this classifier has no tokenizer attached, so it cannot read images")
            with torch.no_grad():
                x = self.tokenizer.encode(x)
        tokens = x.reshape(x.shape[0], -1).long()
        c = self.mage_config
        cls_ids = torch.full((len(tokens), 1), c.cls_id, dtype=torch.long, device=tokens.device)
        h = self.token_emb(torch.cat([cls_ids, tokens], 1))
        for blk in self.blocks:
            h = blk(h)
        if pool == "mean":
            return self.fc_norm(h[:, 1:].mean(1))
        return self.norm(h)[:, 0]
