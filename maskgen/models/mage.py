"""MAGE: the masked generative encoder (Li et al., CVPR 2023), on VQGAN tokens.

Tokens [B, L] (codes of a frozen VQGAN tokenizer, L = token_grid ** 2, row-major) -> prepend [C0] ->
replace masked tokens by [MASK] -> word + learned position embedding, LayerNorm(1e-6), dropout -> drop
the dropped tokens -> ViT encoder -> norm -> latent [B, 1+L-dropped, D] -> decoder_embed -> every position
padded with the [C] feature (decoder embedding of output 0), kept outputs scattered back, all masked
positions overwritten with [C] -> + learned decoder position embedding -> decoder blocks -> decoder_norm ->
MlmLayer (fc, exact GELU, LayerNorm(1e-5), logits against the detached word-embedding table + bias)
-> logits [B, 1+L, vocab]. The pre-training objective (masks, loss) is the MAGE method's (`methods/mage.py`).
Facts from the official `models_mage.py` (github.com/LTH14/mage).

Parameter names equal the official `models_mage.py` wherever a parameter exists in both, so the official
checkpoint converts with the identity key map (`maskgen.convert.mage`); the official model's dead tensors
(cls_token, pos_embed, patch_embed, mask_token, decoder_pos_embed, decoder_pred, token_emb.position_ids)
do not exist here.

The tokenizer travels with the model but is not part of it: `model.tokenizer` holds an optional frozen
VQGAN that is NOT a registered sub-module (absent from state_dict / parameters / the optimizer); it follows
`.to()` / `.cuda()` / `.float()` and is saved in the `tokenizer/` sub-folder of a weights directory by
`weights.save_pretrained` (through `save_attachments`) and re-attached by `maskgen.from_pretrained`
(`frozen_tokenizer.FrozenTokenizerMixin`, shared with the fine-tuning classifier).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UserError
from ..options import Options, option
from ..registry import MODELS
from ..sampling.maskgit import token_region
from .frozen_tokenizer import FrozenTokenizerMixin
from .layers import Block, Dropout, init_vit_weights


# The official class-conditional vocabulary (MaskGIT's): codebook, 1000 legacy class rows, then [MASK].
_LEGACY_CLASS_ROWS = 1000
_LEGACY_FAKE_CLASS_OFFSET = 1100 - 1024  # [C0] id = codebook_size + 1100 - 1024 (= 1100 for 1024 codes)


@dataclass
class MAGEConfig(Options):
    """The architecture; defaults are the official ViT-B MAGE (`mage_vit_base_patch16`) on the 256-px, 16x16-token
    tokenizer. The pre-training objective (masking ratios, label smoothing) is the method's (`methods/mage.py`)."""

    image_size: int = option(256, "side of the square images the tokenizer reads (image_size = token_grid x its "
                                  "downsampling factor)", min=1)
    token_grid: int = option(16, "side of the square token grid; L = token_grid ** 2 tokens (official: 16)", min=1)
    codebook_size: int = option(1024, "tokenizer codebook entries K (image token ids 0..K-1)", min=2)
    vocab_layout: str = option("official", "official: K + 1000 legacy class rows + [MASK], [C0] id K + 76 (1100 "
                                           "for K = 1024, needed to load released weights); compact: K + [C0] + "
                                           "[MASK]", choices=("official", "compact"))
    embed_dim: int = option(768, "encoder width", min=1)
    depth: int = option(12, "encoder blocks", min=1)
    num_heads: int = option(12, "encoder attention heads", min=1)
    decoder_embed_dim: int = option(768, "decoder width (official: equal to the encoder width)", min=1)
    decoder_depth: int = option(8, "decoder blocks", min=1)
    decoder_num_heads: int = option(16, "decoder attention heads (official ViT-B: 16, head dim 48)", min=1)
    mlp_ratio: float = option(4.0, "MLP hidden width / block width", gt=0.0)
    dropout: float = option(0.1, "dropout of the embeddings, attention weights, projections and MLPs "
                                 "(official: 0.1 everywhere)", min=0.0, lt=1.0)

    def validate(self):
        for width, heads, what in ((self.embed_dim, self.num_heads, ""), (self.decoder_embed_dim,
                                                                          self.decoder_num_heads, "decoder_")):
            if width % heads:
                raise ConfigError(f"{what}embed_dim {width} is not divisible by {what}num_heads {heads}")
        if self.image_size % self.token_grid:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of token_grid {self.token_grid}")

    # ---- derived quantities
    @property
    def num_tokens(self) -> int:
        """L, the image tokens per sample."""
        return self.token_grid ** 2

    @property
    def vocab_size(self) -> int:
        if self.vocab_layout == "official":
            return self.codebook_size + _LEGACY_CLASS_ROWS + 1
        return self.codebook_size + 2

    @property
    def cls_id(self) -> int:
        """The fake class token [C0] prepended to every sequence (official: 1100)."""
        if self.vocab_layout == "official":
            return self.codebook_size + _LEGACY_FAKE_CLASS_OFFSET
        return self.codebook_size

    @property
    def mask_id(self) -> int:
        """The [MASK] token: the last vocabulary row (official: 2024)."""
        return self.vocab_size - 1

    @property
    def downsample_factor(self) -> int:
        """Image side / token-grid side (the tokenizer's)."""
        return self.image_size // self.token_grid


class TokenEmbedding(nn.Module):
    """The official `BertEmbeddings` without its unused `position_ids` buffer:
    ids [B, N] -> dropout(LayerNorm_1e-6(word_embeddings(ids) + position_embeddings[:N])) [B, N, D]."""

    def __init__(self, vocab_size: int, dim: int, max_positions: int, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-6)  # official name (from BERT/TensorFlow)
        self.dropout = Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.position_embeddings.weight[: ids.shape[1]]
        return self.dropout(self.LayerNorm(x))


class MlmLayer(nn.Module):
    """Output head: x [..., Ddec] -> logits [..., rows] = LN_1e-5(gelu(fc(x))) @ word_embeddings[:rows]^T + bias[:rows]
    (rows: every vocabulary row by default; the MAGE loss and sampler read only the codebook's first K).

    The word-embedding table is passed in detached (as officially): no gradient reaches it from the output
    side. `ln` keeps PyTorch's default eps 1e-5, unlike every other LayerNorm (1e-6), as in the official code."""

    def __init__(self, in_dim: int, embed_dim: int, vocab_size: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, embed_dim)
        self.ln = nn.LayerNorm(embed_dim, eps=1e-5)
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        h = self.ln(F.gelu(self.fc(x)))
        return F.linear(h, word_embeddings[:rows], self.bias.view(-1)[:rows])


@MODELS.register("mage", config=MAGEConfig)
class MAGE(FrozenTokenizerMixin, nn.Module):
    """MAGE encoder-decoder over VQGAN tokens; see the module docstring for the data flow.

    Token inputs are LongTensors [B, L] or [B, h, w] (h = w = token_grid) of codes in [0, codebook_size);
    image inputs are floats [B, 3, H, W] in [0, 1], tokenized by the attached `tokenizer`.
    Masks are bool [B, L] (True = masked / dropped) over the image tokens only; [C0] is never masked.
    """

    # options of the pre-training objective that config.json files written before they moved to the method hold
    legacy_config_keys = ("mask_ratio_mu", "mask_ratio_std", "mask_ratio_min", "mask_ratio_max", "label_smoothing",
                          "ratio_per_sample")

    def __init__(self, config: MAGEConfig):
        super().__init__()
        self.config = c = config
        self.token_emb = TokenEmbedding(c.vocab_size, c.embed_dim, c.num_tokens + 1, c.dropout)
        self.blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, c.mlp_ratio, drop=c.dropout, attn_drop=c.dropout)
                                    for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, c.num_tokens + 1, c.decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio, drop=c.dropout, attn_drop=c.dropout)
            for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim, eps=1e-6)
        self.mlm_layer = MlmLayer(c.decoder_embed_dim, c.embed_dim, c.vocab_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official init: embeddings and decoder_pos_embed_learned normal(0.02); Linear xavier_uniform with zero
        bias; LayerNorm 1/0; mlm_layer.bias zeros."""
        nn.init.normal_(self.token_emb.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.token_emb.position_embeddings.weight, std=0.02)
        nn.init.normal_(self.decoder_pos_embed_learned, std=0.02)
        nn.init.zeros_(self.mlm_layer.bias)
        init_vit_weights(self)

    # ------------------------------------------------------------------------------------ tokenizer
    def check_tokenizer(self, tok: nn.Module) -> None:
        """The tokenizer's codebook size and token grid must fit the config (see FrozenTokenizerMixin)."""
        if not all(callable(getattr(tok, m, None)) for m in ("encode", "decode")):
            raise UserError(f"the tokenizer given is a '{getattr(tok, 'model_name', type(tok).__name__)}' model, "
                            f"not a tokenizer (it has no encode/decode): pass a folder from `maskgen train "
                            f"tokenizer` or `maskgen convert vqgan`")
        tcfg = getattr(tok, "config", None)
        k = getattr(tcfg, "codebook_size", None)
        if k is not None and k != self.config.codebook_size:
            raise UserError(f"tokenizer has {k} codes but the MAGE model expects {self.config.codebook_size}")
        f = getattr(tcfg, "downsample_factor", None)
        if f is not None and f * self.config.token_grid != self.config.image_size:
            raise UserError(f"tokenizer downsamples by {f}: image_size {self.config.image_size} would give a "
                            f"{self.config.image_size // f}-token grid, the model expects {self.config.token_grid}")

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> codes [B, h, w] (long) with the attached tokenizer."""
        if self.tokenizer is None:
            raise UserError("this MAGE model has no tokenizer attached: pass tokens, or attach one with "
                            "model.set_tokenizer(vqgan) (models loaded with maskgen.from_pretrained get theirs)")
        return self.tokenizer.encode(images)

    @torch.no_grad()
    def decode_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] (or [B, L]) -> images [B, 3, H, W] in [0, 1] with the attached tokenizer."""
        if self.tokenizer is None:
            raise UserError("this MAGE model has no tokenizer attached, so it cannot decode tokens to images")
        if codes.dim() == 2:
            codes = codes.view(codes.shape[0], self.config.token_grid, self.config.token_grid)
        return self.tokenizer.decode(codes)

    # ---------------------------------------------- what samplers see (maskgen.sampling.base: the protocol)
    default_sampler = "maskgit"  # generation and editing: MaskGIT iterative decoding over the codes

    def check_can_sample(self) -> None:
        """Raise UserError when no tokenizer is attached (sampled codes could not become images)."""
        if self.tokenizer is None:
            raise UserError("this MAGE model has no tokenizer/ folder, so its tokens cannot be turned into images")

    def decode_samples(self, samples: torch.Tensor) -> torch.Tensor:
        """Sampled codes [B, h, w] -> images [B, 3, H, W] in [0, 1] (`decode_tokens`)."""
        return self.decode_tokens(samples)

    def encode_samples(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> codes [B, h, w], the sample space edits work in (`encode_images`)."""
        return self.encode_images(images)

    def sample_region(self, pixel_mask: torch.Tensor, dilate: int = 0) -> torch.Tensor:
        """Pixel mask [B, H, W] or [H, W] (True = regenerate) -> token mask [B, h, w] or [h, w]: the tokens that
        overlap it, grown by `dilate` tokens (`maskgen.sampling.maskgit.token_region`)."""
        return token_region(pixel_mask, self.config.downsample_factor, dilate)

    def as_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] (floats, tokenized) or tokens [B, h, w] / [B, L] (long) -> tokens [B, L] long."""
        if x.is_floating_point():
            if x.dim() != 4:
                raise ValueError(f"expected images [B, 3, H, W] or integer tokens, got a float {list(x.shape)}")
            x = self.encode_images(x)
        x = x.reshape(x.shape[0], -1).long()
        if x.shape[1] != self.config.num_tokens:
            raise ValueError(f"expected {self.config.num_tokens} tokens per sample (a {self.config.token_grid}^2 "
                             f"grid), got {x.shape[1]}")
        return x

    # -------------------------------------------------------------------------------- the network
    def _with_cls(self, mask: torch.Tensor | None, b: int, device) -> torch.Tensor:
        """mask [B, L] bool or None -> [B, 1+L] bool with a leading False for [C0]."""
        lead = torch.zeros(b, 1, dtype=torch.bool, device=device)
        if mask is None:
            return lead.expand(b, self.config.num_tokens + 1)
        return torch.cat([lead, mask.to(device=device, dtype=torch.bool)], dim=1)

    def embed(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, L] -> embeddings [B, 1+L, D] of [C0] + tokens, masked tokens replaced by [MASK]."""
        tokens = self.as_tokens(tokens)
        b = tokens.shape[0]
        if mask is not None:
            tokens = torch.where(mask.bool(), torch.full_like(tokens, self.config.mask_id), tokens)
        ids = torch.cat([torch.full((b, 1), self.config.cls_id, dtype=torch.long, device=tokens.device), tokens], 1)
        return self.token_emb(ids)

    def forward_encoder(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                        drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, L] long, mask / drop_mask bool [B, L] (None: nothing) -> latent [B, 1+L-n_drop, D].

        [C0] is prepended (never masked or dropped), masked tokens become [MASK], the embeddings of dropped
        tokens are removed (the others keep their order; every row must drop the same number), then the
        encoder blocks and `norm`."""
        x = self.embed(tokens, mask)
        if drop_mask is not None:
            b, n, d = x.shape
            keep = ~self._with_cls(drop_mask, b, x.device)
            x = x[keep].view(b, -1, d)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def decoder_features(self, latent: torch.Tensor, mask: torch.Tensor | None = None,
                         drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """latent [B, 1+L-n_drop, D] (from forward_encoder with the same masks) -> decoder output [B, 1+L, Ddec],
        the input of `mlm_layer`.

        Every position starts as the [C] feature (the decoder-embedded output 0), the kept outputs go back
        to their positions, then ALL masked positions (dropped or not) are overwritten with [C]; then
        + decoder_pos_embed_learned, decoder blocks, decoder_norm."""
        x = self.decoder_embed(latent)
        b, _, d = x.shape
        n = self.config.num_tokens + 1
        cls_feature = x[:, :1].expand(b, n, d)
        keep = ~self._with_cls(drop_mask, b, x.device)
        if drop_mask is None:
            scattered = x
        else:  # position j reads kept output number (#kept before j); dropped positions read garbage, replaced
            src = (keep.long().cumsum(1) - 1).clamp_min(0)
            scattered = x.gather(1, src[..., None].expand(b, n, d))
        use_own = keep & ~self._with_cls(mask, b, x.device)
        x = torch.where(use_own[..., None], scattered, cls_feature)
        x = x + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)

    def codebook_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Decoder output [..., Ddec] -> logits of the K image codes [..., K]: `mlm_layer` over the codebook rows
        only (what the loss and the sampler read), equal to the full logits' [..., :K]."""
        return self.mlm_layer(features, self.token_emb.word_embeddings.weight.detach(), self.config.codebook_size)

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor | None = None,
                        drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """latent [B, 1+L-n_drop, D] -> logits [B, 1+L, vocab] over the whole vocabulary at every position
        (`decoder_features`, then `mlm_layer`)."""
        return self.mlm_layer(self.decoder_features(latent, mask, drop_mask),
                              self.token_emb.word_embeddings.weight.detach())

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (or images) -> logits [B, 1+L, vocab] for the given masks (None: nothing masked/dropped)."""
        tokens = self.as_tokens(tokens)
        return self.forward_decoder(self.forward_encoder(tokens, mask, drop_mask), mask, drop_mask)

    def token_logits(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Generation step: tokens [B, L] (values at masked positions are ignored), mask [B, L] bool ->
        codebook logits [B, L, codebook_size] (fp32), with nothing dropped. Only the masked positions' logits
        are computed (the sampler reads no other); the unmasked positions hold 0."""
        tokens = tokens.reshape(tokens.shape[0], -1)
        mask = mask.reshape(mask.shape[0], -1).bool()
        tokens = tokens.masked_fill(mask, 0)
        features = self.decoder_features(self.forward_encoder(tokens, mask), mask)[:, 1:]
        out = features.new_zeros(*mask.shape, self.config.codebook_size, dtype=torch.float32)
        out[mask] = self.codebook_logits(features[mask]).float()
        return out

    # ---------------------------------------------------------------------------------- fine-tuning
    def as_classifier(self, num_classes: int, drop_path: float = 0.1, pool: str = "mean") -> nn.Module:
        """This encoder (and tokenizer) + a new linear head, for `maskgen eval finetune` (`MAGEClassifier`)."""
        from .classifier import MAGEClassifier

        if self.tokenizer is None:
            raise UserError("the MAGE checkpoint has no tokenizer/ folder, so images cannot be tokenized")
        return MAGEClassifier.from_mage(self, num_classes, drop_path, pool)

    # ---------------------------------------------------------------------------------- features
    def forward_features(self, x: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Downstream features: images [B, 3, H, W] in [0, 1] (tokenized) or tokens [B, L] / [B, h, w].

        The encoder sees all 1+L tokens, nothing masked or dropped. pool="mean": parameter-free
        LayerNorm(eps 1e-6) of the mean of the L image-token outputs taken BEFORE the final `norm` (the
        official linear-probe features, whose fc_norm stays at its init) -> [B, D]; "cls": norm(x)[:, 0]
        -> [B, D]; "none": norm(x) -> [B, 1+L, D]."""
        if pool not in ("mean", "cls", "none"):
            raise ValueError(f"pool must be 'mean', 'cls' or 'none', got {pool!r}")
        h = self.embed(x)
        for blk in self.blocks:
            h = blk(h)
        if pool == "mean":
            return F.layer_norm(h[:, 1:].mean(1), (h.shape[-1],), eps=1e-6)
        h = self.norm(h)
        return h[:, 0] if pool == "cls" else h
