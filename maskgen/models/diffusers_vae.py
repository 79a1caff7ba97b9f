"""A diffusers `AutoencoderKL` (e.g. Stable Diffusion's VAE) as the frozen autoencoder of latent-mode UMD.

Only for a user who has the VAE's folder locally (`config.json` + weights, as `AutoencoderKL.save_pretrained`
writes it): it is read with `local_files_only=True`, never downloaded. diffusers is an optional dependency, imported
only here. Saved with a UMD model (its `tokenizer/` attachment) as a maskgen weights folder: config.json records
the VAE's own config, so `maskgen.from_pretrained` rebuilds it without the original folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..options import Options, option
from ..registry import MODELS


def _autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("a diffusers AutoencoderKL needs the diffusers package: pip install diffusers") from None
    return AutoencoderKL


@dataclass
class DiffusersVAEConfig(Options):
    """The AutoencoderKL's own config (its config.json as a mapping) and the folder it came from."""

    vae_config: dict = option({}, "the AutoencoderKL's config")
    source: str = option("", "the local folder it was read from")

    @property
    def z_channels(self) -> int:
        return int(self.vae_config.get("latent_channels", 4))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae_config.get("scaling_factor", 0.18215))


@MODELS.register("diffusers-autoencoder-kl", config=DiffusersVAEConfig)
class DiffusersVAE(nn.Module):
    """images [B, 3, H, W] in [0, 1] <-> latents [B, z_channels, H/f, W/f] (unscaled), through a diffusers VAE."""

    def __init__(self, config: DiffusersVAEConfig):
        super().__init__()
        self.config = config
        self.vae = _autoencoder_kl().from_config(config.vae_config)

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "DiffusersVAE":
        """The AutoencoderKL saved in the local folder `path` (never downloaded)."""
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"{path} is not a diffusers AutoencoderKL folder (no config.json)")
        try:
            vae = _autoencoder_kl().from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read the diffusers AutoencoderKL in {path}: {str(e).splitlines()[0]}") from None
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.config = DiffusersVAEConfig(vae_config=dict(vae.config), source=str(Path(path).resolve()))
        model.vae = vae
        return model

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """images in [0, 1] -> a sample of the posterior (the reference samples it, not its mode)."""
        return self.vae.encode(images * 2 - 1).latent_dist.sample()

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """latents -> images, about [0, 1] (not clamped)."""
        return (self.vae.decode(z).sample + 1) / 2
