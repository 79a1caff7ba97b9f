"""Convert an official MAGE checkpoint (`mage-vitb-1600.pth`, `mage-vitl-1600.pth`) into a maskgen weights
directory holding the MAGE model and, in its `tokenizer/` sub-folder, the VQGAN tokenizer.

The file is read with `safe_torch_load` (never runs pickled code); its `checkpoint['model']` state dict
(or a bare state dict with the same keys) holds 433 tensors for ViT-B (the released `mage-vitb-1600.pth`):
- `vqgan.*` (168): the frozen tokenizer, converted with the tokenizer converter's helpers;
- the dead tensors of the official model, dropped: `cls_token`, `pos_embed`, `patch_embed.*`, `mask_token`,
  `decoder_pos_embed`, `decoder_pred.*` and the `token_emb.position_ids` buffer (absent ones are fine);
- everything else maps to the MAGE model with the identity key map; a missing or unexpected key, or a
  wrong shape, is refused with a UserError naming it.
The config is read off the shapes, except the head counts, which no shape shows: they come from the
official factories keyed by width (768: encoder 12 / decoder 16 heads; 1024 and 1280: 16 / 16), or from
the caller for other widths. The vocabulary layout is the official one (codebook + 1000 + 1 rows).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..errors import ConfigError, UserError
from ..models.mage import MAGE, MAGEConfig
from ..models.vqgan import VQGAN
from ..models import save_pretrained
from .common import check_state_dict, read_state_dict, tensor_shape
from .vqgan import MAGE_PREFIX, infer_config

# Tensors the official `models_mage.py` creates but its forward never reads: exact names or prefixes.
DROPPED_KEYS = ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "token_emb.position_ids")
DROPPED_PREFIXES = ("patch_embed.", "decoder_pred.")

# Attention heads of the official factories (models_mage.py; ViT-H from LTH14/rcg), keyed by width.
ENCODER_HEADS = {768: 12, 1024: 16, 1280: 16}
DECODER_HEADS = {768: 16, 1024: 16, 1280: 16}

_LEGACY_EXTRA_ROWS = 1000 + 1  # class rows + [MASK] of the official vocabulary


def is_dropped(key: str) -> bool:
    return key in DROPPED_KEYS or key.startswith(DROPPED_PREFIXES)


def read_checkpoint(src: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The official state dict: `checkpoint['model']`, or the file itself when it is a bare state dict."""
    return read_state_dict(src, "token_emb.word_embeddings.weight", "a MAGE checkpoint")


def split_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """-> (MAGE tensors, tokenizer tensors without the 'vqgan.' prefix, dropped keys)."""
    model, tok, dropped = {}, {}, []
    for k, v in sd.items():
        if k.startswith(MAGE_PREFIX):
            tok[k[len(MAGE_PREFIX):]] = v
        elif is_dropped(k):
            dropped.append(k)
        else:
            model[k] = v
    return model, tok, dropped


def _count(sd: dict, fmt: str) -> int:
    n = 0
    while fmt.format(n) in sd:
        n += 1
    return n


def infer_mage_config(sd: dict[str, torch.Tensor], codebook_size: int, downsample_factor: int,
                      num_heads: int | None = None, decoder_num_heads: int | None = None) -> MAGEConfig:
    """MAGEConfig of the official layout from the MAGE tensors' shapes (heads: see the module docstring)."""

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        return tensor_shape(sd, key, ndim, "an official MAGE checkpoint")

    vocab, dim = shape("token_emb.word_embeddings.weight", 2)
    positions = shape("token_emb.position_embeddings.weight", 2)[0]
    grid = math.isqrt(max(positions - 1, 0))
    if grid < 1 or grid * grid != positions - 1:
        raise UserError(f"token_emb.position_embeddings holds {positions} positions: not 1 + a square token grid")
    if vocab != codebook_size + _LEGACY_EXTRA_ROWS:
        raise UserError(f"token_emb.word_embeddings has {vocab} rows; the official layout with the tokenizer's "
                        f"{codebook_size} codes has {codebook_size + _LEGACY_EXTRA_ROWS}")
    dec_dim = shape("decoder_embed.weight", 2)[0]
    hidden = shape("blocks.0.mlp.fc1.weight", 2)[0]
    heads = num_heads or ENCODER_HEADS.get(dim)
    dec_heads = decoder_num_heads or DECODER_HEADS.get(dec_dim)
    if heads is None or dec_heads is None:
        raise UserError(f"no official MAGE has width {dim if heads is None else dec_dim}; the head count cannot "
                        f"be read from the tensors: pass num_heads / decoder_num_heads")
    try:
        return MAGEConfig(image_size=grid * downsample_factor, token_grid=grid, codebook_size=codebook_size,
                          vocab_layout="official", embed_dim=dim, depth=_count(sd, "blocks.{}.norm1.weight"),
                          num_heads=heads, decoder_embed_dim=dec_dim,
                          decoder_depth=_count(sd, "decoder_blocks.{}.norm1.weight"), decoder_num_heads=dec_heads,
                          mlp_ratio=hidden / dim)
    except ConfigError as e:
        raise UserError(f"the tensor shapes imply an impossible MAGE config: {e}") from None


def build_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None,
                          decoder_num_heads: int | None = None) -> MAGE:
    """The MAGE model (eval mode, fp32) with its tokenizer attached, from an official state dict."""
    model_sd, tok_sd, _ = split_state_dict(sd)
    if not tok_sd:
        raise UserError(f"no tokenizer: the checkpoint holds no '{MAGE_PREFIX}*' tensors")
    try:
        tcfg = infer_config(tok_sd)
        with torch.device("meta"):
            tokenizer = VQGAN(tcfg)
        check_state_dict(tokenizer, tok_sd, f"VQGAN (ch={tokenizer.config.ch}, ch_mult={tokenizer.config.ch_mult})")
    except UserError as e:
        raise UserError(f"tokenizer ({MAGE_PREFIX}*): {e}") from None
    cfg = infer_mage_config(model_sd, tcfg.codebook_size, tcfg.downsample_factor, num_heads, decoder_num_heads)
    with torch.device("meta"):  # shapes only: every weight comes from the file
        model = MAGE(cfg)
    c = model.config
    check_state_dict(model, model_sd, f"MAGE (depth={c.depth}, embed_dim={c.embed_dim}, "
                                      f"decoder_depth={c.decoder_depth})")
    model.load_state_dict({k: v.to(torch.float32) for k, v in model_sd.items()}, strict=True, assign=True)
    tokenizer.load_state_dict({k: v.to(torch.float32) for k, v in tok_sd.items()}, strict=True, assign=True)
    model.set_tokenizer(tokenizer)
    return model.eval()


def convert_mage(src: str | os.PathLike, out: str | os.PathLike, num_heads: int | None = None,
                 decoder_num_heads: int | None = None) -> Path:
    """Convert the official MAGE checkpoint `src` into the weights directory `out` (returned).

    `out` holds the MAGE model (`model.safetensors`, `config.json`) and the tokenizer (`out/tokenizer/`);
    `maskgen.from_pretrained(out)` returns the model with its tokenizer attached. `num_heads` /
    `decoder_num_heads` are needed only for widths of no official model."""
    try:
        model = build_from_state_dict(read_checkpoint(src), num_heads, decoder_num_heads)
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(str(src)) else f"{src}: {msg}") from None
    return save_pretrained(model, out)
