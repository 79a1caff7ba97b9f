"""What `maskgen reconstruct` does: mask part of an image, let a model reconstruct it, write a panel.

The model declares the ability (MAE today; MAGE's partial-mask reconstruction later):
    masked_reconstruction(images [B, 3, H, W] in [0, 1], mask_ratio, generator)
        -> (reconstruction [B, 3, H, W] in [0, 1], pixel mask [B, 1, H, W] float, 1 = removed)
The panel is the official MAE visualisation's: input | masked input | reconstruction | reconstruction with the
visible patches pasted back from the input.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torchvision.utils import make_grid

from .errors import UserError
from .generation import load_image, save_png
from .models import from_pretrained
from .outputs import prepare_file


def reconstruction_panel(images: torch.Tensor, recon: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """images, recon [B, 3, H, W], pixel_mask [B, 1, H, W] (1 = removed) -> [4B, 3, H, W]: the B inputs, the B
    masked inputs (removed patches black, as the official notebook), the B reconstructions, and the B
    reconstructions with the visible patches pasted back, in that order (a grid with nrow=B shows one per row)."""
    m = pixel_mask.to(images.dtype)
    recon = recon.to(images.dtype)
    return torch.cat([images, images * (1 - m), recon, images * (1 - m) + recon * m])


def check_can_reconstruct(model, source: str) -> None:
    if not callable(getattr(model, "masked_reconstruction", None)):
        raise UserError(f"{source} holds a '{getattr(model, 'model_name', type(model).__name__)}' model, which "
                        f"cannot reconstruct masked images (MAE can)")


def reconstruct_image(ckpt: str | os.PathLike, image: str | os.PathLike, out: str | os.PathLike,
                      mask_ratio: float = 0.75, seed: int = 0, device: str = "cpu") -> Path:
    """Resize `image` to the model's resolution, remove `mask_ratio` of its patches at random (seeded by `seed`),
    reconstruct them with the model in `ckpt` and write the 4-image panel (`reconstruction_panel`) to `out`."""
    if not 0.0 <= mask_ratio < 1.0:
        raise UserError(f"--mask-ratio must lie in [0, 1), got {mask_ratio}")
    out = prepare_file(out, "output image")
    model = from_pretrained(ckpt, device=device)
    check_can_reconstruct(model, str(ckpt))
    x, _ = load_image(image, model.config.image_size)
    x = x[None].to(device)
    generator = torch.Generator(device).manual_seed(seed)
    recon, pixel_mask = model.masked_reconstruction(x, mask_ratio, generator=generator)
    save_png(make_grid(reconstruction_panel(x, recon, pixel_mask).cpu(), nrow=4, padding=2, pad_value=1.0), out)
    return out
