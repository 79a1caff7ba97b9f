"""Convert an official MAE checkpoint (facebookresearch/mae) into a maskgen weights directory.

Two layouts, both `checkpoint['model']` (or a bare state dict), read with `safe_torch_load` (never runs pickled
code):
- the encoder-only release (`mae_pretrain_vit_base.pth`, 150 tensors for ViT-B): `cls_token`, `pos_embed`,
  `patch_embed.proj.*`, `blocks.i.*`, `norm.*` -> an MAE with `decoder_depth=0` (features, probes; it cannot
  reconstruct). A fine-tuning head in such a file (`head.*`, `fc_norm.*`) is not part of the pre-trained encoder
  and is dropped;
- the full model with its decoder (`mae_pretrain_vit_base_full.pth`, `mae_visualize_vit_base.pth`; 254 tensors):
  the above plus `mask_token`, `decoder_pos_embed`, `decoder_embed.*`, `decoder_blocks.i.*`, `decoder_norm.*`,
  `decoder_pred.*` -> the whole MAE (`maskgen reconstruct` works).
Every other tensor maps with the identity key map; a missing or unexpected key or a wrong shape is refused with a
UserError naming the first ones. The config is read off the shapes, except the head counts, which come from the
official factories keyed by width (encoder 768: 12, 1024 / 1280: 16; decoder: 16). Whether the decoder predicts
norm-pix patches is not in the file: the pre-training releases use norm-pix (`norm_pix_loss=True`, the default),
the `mae_visualize_*` files predict pixels (`norm_pix_loss=False`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..errors import ConfigError, UserError
from ..models import save_pretrained
from ..models.mae import MAE, MAEConfig
from .common import check_state_dict, read_state_dict, tensor_shape

ENCODER_HEADS = {768: 12, 1024: 16, 1280: 16}
DECODER_HEADS = 16
DROPPED_PREFIXES = ("head.", "fc_norm.")  # a fine-tuning head beside the encoder


def read_checkpoint(src: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The official state dict: `checkpoint['model']`, or the file itself when it is a bare state dict."""
    return read_state_dict(src, "patch_embed.proj.weight", "an MAE checkpoint")


def _count(sd: dict, fmt: str) -> int:
    n = 0
    while fmt.format(n) in sd:
        n += 1
    return n


def infer_mae_config(sd: dict[str, torch.Tensor], norm_pix_loss: bool = True) -> MAEConfig:
    """MAEConfig of an official MAE state dict from its shapes (heads: see the module docstring)."""

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        return tensor_shape(sd, key, ndim, "an official MAE checkpoint")

    dim, chans, p, p2 = shape("patch_embed.proj.weight", 4)
    if chans != 3 or p != p2:
        raise UserError(f"patch_embed.proj.weight has shape {[dim, chans, p, p2]}: expected [D, 3, p, p]")
    positions = shape("pos_embed", 3)[1]
    grid = math.isqrt(max(positions - 1, 0))
    if grid < 1 or grid * grid != positions - 1:
        raise UserError(f"pos_embed holds {positions} positions: not 1 + a square patch grid")
    heads = ENCODER_HEADS.get(dim)
    if heads is None:
        raise UserError(f"no official MAE has width {dim}: the head count cannot be read from the tensors")
    full = "decoder_embed.weight" in sd
    dec_dim = shape("decoder_embed.weight", 2)[0] if full else 512
    try:
        return MAEConfig(image_size=grid * p, patch_size=p, embed_dim=dim, depth=_count(sd, "blocks.{}.norm1.weight"),
                         num_heads=heads, decoder_embed_dim=dec_dim,
                         decoder_depth=_count(sd, "decoder_blocks.{}.norm1.weight") if full else 0,
                         decoder_num_heads=DECODER_HEADS, mlp_ratio=shape("blocks.0.mlp.fc1.weight", 2)[0] / dim,
                         norm_pix_loss=norm_pix_loss)
    except ConfigError as e:
        raise UserError(f"the tensor shapes imply an impossible MAE config: {e}") from None


def build_from_state_dict(sd: dict[str, torch.Tensor], norm_pix_loss: bool = True) -> MAE:
    """The MAE model (eval mode, fp32) holding exactly the tensors of an official state dict (either layout)."""
    sd = {k: v for k, v in sd.items() if not k.startswith(DROPPED_PREFIXES)}
    cfg = infer_mae_config(sd, norm_pix_loss)
    model = MAE(cfg)
    check_state_dict(model, sd, f"MAE (depth={cfg.depth}, embed_dim={cfg.embed_dim}, "
                                f"decoder_depth={cfg.decoder_depth})")
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    return model.eval()


def convert_mae(src: str | os.PathLike, out: str | os.PathLike, norm_pix_loss: bool = True) -> Path:
    """Convert the official MAE checkpoint `src` (encoder-only or full) into the weights directory `out`."""
    try:
        model = build_from_state_dict(read_checkpoint(src), norm_pix_loss)
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(str(src)) else f"{src}: {msg}") from None
    return save_pretrained(model, out)
