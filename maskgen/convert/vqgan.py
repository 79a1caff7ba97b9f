"""Convert the official MAGE VQGAN tokenizer (`vqgan_jax_strongaug.ckpt`) into a maskgen weights directory.

Accepted inputs (all read with `safe_torch_load`, which never runs pickled code):
- the tokenizer file: `{"state_dict": {...}}` (168 tensors at 256 px) or the bare state dict;
- a MAGE model checkpoint `{"model": {...}}`: its `vqgan.`-prefixed tensors are the tokenizer.
Our module names equal the official ones, so the key map is the identity. The config is read off the
tensor shapes; GroupNorm groups are 32, hard-coded in the official code.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ConfigError, UserError
from ..models.vqgan import VQGAN, VQGANConfig
from ..models import save_pretrained
from ..weights import safe_torch_load
from .common import check_state_dict, first_keys, tensor_shape

MAGE_PREFIX = "vqgan."


def read_state_dict(src: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tokenizer's tensors from a tokenizer file or a MAGE checkpoint, with the official key names."""
    obj = safe_torch_load(src)
    if not isinstance(obj, dict):
        raise UserError(f"{src}: expected a dict of tensors, got {type(obj).__name__}")
    if isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    elif isinstance(obj.get("model"), dict):
        sd = {k[len(MAGE_PREFIX):]: v for k, v in obj["model"].items() if k.startswith(MAGE_PREFIX)}
        if not sd:
            raise UserError(f"{src}: its 'model' dict holds no '{MAGE_PREFIX}*' tensors, so no tokenizer")
    else:
        sd = obj
    not_tensors = [str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"{src}: not a state dict, these entries are not tensors: {first_keys(not_tensors)}")
    return sd


def infer_config(sd: dict[str, torch.Tensor]) -> VQGANConfig:
    """VQGANConfig from the shapes: ch and in_channels from encoder.conv_in, ch_mult from each encoder level's
    first conv, num_res_blocks from level 0, z_channels from encoder.conv_out, codebook_size from the codebook."""

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        return tensor_shape(sd, key, ndim, "a MAGE/MaskGIT VQGAN checkpoint")

    ch, in_channels = shape("encoder.conv_in.weight", 4)[:2]
    levels = 0
    while f"encoder.down.{levels}.block.0.conv1.weight" in sd:
        levels += 1
    widths = [shape(f"encoder.down.{i}.block.0.conv1.weight", 4)[0] for i in range(max(levels, 1))]
    if any(w % ch for w in widths):
        raise UserError(f"encoder level widths {widths} are not multiples of ch={ch} (encoder.conv_in.weight)")
    num_res_blocks = 0
    while f"encoder.down.0.block.{num_res_blocks}.conv1.weight" in sd:
        num_res_blocks += 1
    try:
        return VQGANConfig(in_channels=in_channels, ch=ch, ch_mult=[w // ch for w in widths],
                           num_res_blocks=num_res_blocks, z_channels=shape("encoder.conv_out.weight", 4)[0],
                           codebook_size=shape("quantize.embedding.weight", 2)[0], norm_groups=32)
    except ConfigError as e:
        raise UserError(f"the tensor shapes imply an impossible tokenizer config: {e}") from None


def convert_vqgan(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert the official tokenizer checkpoint `src` into the weights directory `out` (returned).

    `maskgen.from_pretrained(out)` then returns the VQGAN. Every source tensor must be used and every
    model tensor present with the same shape; otherwise a UserError names the first offending keys."""
    sd = read_state_dict(src)
    try:
        with torch.device("meta"):  # shapes only: every weight comes from the file
            model = VQGAN(infer_config(sd))
        c = model.config
        check_state_dict(model, sd, f"VQGAN (ch={c.ch}, ch_mult={c.ch_mult})")
    except UserError as e:
        raise UserError(f"{src}: {e}") from None
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True, assign=True)
    return save_pretrained(model, out)
