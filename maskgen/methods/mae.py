"""`maskgen train mae`: MAE pre-training (He et al., CVPR 2022) on images, as the official `main_pretrain.py`.

Per step: augmented images [B, 3, S, S] in [0, 1] -> the model's random masking at `mae.mask_ratio` (0.75), encoder
on the kept patches, decoder on all -> mean squared error over each patch's p*p*3 values against the model's
targets (`MAE.targets`: per-patch normalised pixels with `model.norm_pix_loss`), averaged over the removed
patches only. The released model is the whole MAE (encoder and decoder), so `maskgen reconstruct` works on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.method import HookContext, Method
from ..errors import ConfigError
from ..models.mae import MAE, MAEConfig
from ..options import Options, option
from ..reconstruction import reconstruction_panel
from ..registry import METHODS


@dataclass
class MAEObjective(Options):
    """The `mae:` section: MAE's objective (defaults: the paper's)."""

    mask_ratio: float = option(0.75, "fraction of the patches removed from the encoder (official 0.75); "
                                     "int(L x (1 - ratio)) are kept", min=0.0, lt=1.0)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's loss: pred, target [B, L, P], mask [B, L] (1 = removed) -> mean over the removed patches of the
    per-patch mean squared error (fp32)."""
    per_patch = ((pred.float() - target.float()) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


@METHODS.register("mae", model=MAEConfig, options=MAEObjective,
                  summary="MAE: masked autoencoder on pixels (75 % of the patches removed, norm-pix loss)")
class MAEMethod(Method):

    def __init__(self, cfg):
        super().__init__()
        self.objective = cfg.objective
        check_image_setup(cfg)
        self.mae = MAE(cfg.model)

    def release_model(self) -> MAE:
        return self.mae

    def pixel_loss(self, images: torch.Tensor):
        """images [B, 3, S, S] in [0, 1] -> (loss, latent [B, 1+K, D], ids_keep [B, K]) for one random masking."""
        latent, mask, ids_restore, ids_keep = self.mae.forward_encoder(images, self.objective.mask_ratio)
        pred = self.mae.forward_decoder(latent, ids_restore)
        return masked_mse(pred, self.mae.targets(images), mask), latent, ids_keep

    def forward_loss(self, batch: dict):
        loss, _, _ = self.pixel_loss(batch["image"])
        return loss, {}

    def hooks(self):
        return [reconstruction_grid]


def check_image_setup(cfg) -> None:
    """MAE-family methods read one view of images of the model's size, and need the decoder."""
    if cfg.data.image_size != cfg.model.image_size:
        raise ConfigError(f"data.image_size {cfg.data.image_size} differs from model.image_size "
                          f"{cfg.model.image_size}: set both to the same size")
    if cfg.model.decoder_depth < 1:
        raise ConfigError("model.decoder_depth must be >= 1 to pre-train (the decoder reconstructs the pixels)")
    if cfg.data.views != 1:
        raise ConfigError(f"data.views={cfg.data.views}: {cfg.method} reads one view per image (set data.views=1)")


@torch.no_grad()
def reconstruction_grid(method: MAEMethod, ctx: HookContext) -> None:
    """samples/reconstructions_step_N.png: the fixed training images, masked at `mae.mask_ratio` (the same masks at
    every step), one row each of inputs, masked inputs, reconstructions and pasted reconstructions."""
    if ctx.images is None or not ctx.num_images:
        return
    images = ctx.images[: min(8, ctx.num_images)].to(ctx.device)
    g = torch.Generator(ctx.device).manual_seed(0)
    recon, pixel_mask = method.mae.masked_reconstruction(images, method.objective.mask_ratio, generator=g)
    ctx.save_grid(reconstruction_panel(images, recon, pixel_mask), "reconstructions", prefix="reconstructions_",
                  nrow=len(images))
