"""MAE: the masked autoencoder on pixels (He et al., CVPR 2022), as the official `models_mae.py`.

images [B, 3, H, W] in [0, 1] -> ImageNet mean/std normalisation -> patch embedding (Conv2d, kernel = stride =
p) + fixed 2-D sin-cos position embedding -> per-sample random masking (keep int(L x (1 - ratio)) patches,
`maskgen.masking.random_masking`) -> prepend [CLS] (+ its zero position row) -> ViT blocks -> norm -> latent
[B, 1+K, D] -> decoder_embed -> mask tokens appended, un-shuffled -> + fixed sin-cos decoder position embedding
-> decoder blocks -> decoder_norm -> decoder_pred -> pred [B, L, p*p*3] ([CLS] output dropped), patches in the
official `patchify` order (p, p, c). The pixel loss is the MAE method's (`methods/mae.py`).

Parameter names equal the official checkpoints (`cls_token`, `patch_embed.proj`, `blocks.i.*`, `norm`,
`mask_token`, `decoder_embed`, `decoder_blocks.i.*`, `decoder_norm`, `decoder_pred`), so official checkpoints load
with the identity key map (`maskgen.convert.mae`). The fixed sin-cos tables `pos_embed` / `decoder_pos_embed` are
buffers (never trained, saved with the weights, as the official frozen parameters are). `decoder_depth=0` is the
encoder alone (the official encoder-only release).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UserError
from ..masking import random_masking
from ..options import Options, option
from ..registry import MODELS
from .layers import Block, PatchEmbed, init_vit_weights, sincos_pos_embed_2d

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORM_PIX_EPS = 1e-6  # added to the per-patch variance before the square root (official)


@dataclass
class MAEConfig(Options):
    """The architecture; defaults are the official ViT-B/16 MAE (`mae_vit_base_patch16_dec512d8b`)."""

    image_size: int = option(224, "side of the square input images", min=1)
    patch_size: int = option(16, "side of a square patch (L = (image_size / patch_size) ** 2 patches)", min=1)
    embed_dim: int = option(768, "encoder width", min=1)
    depth: int = option(12, "encoder blocks", min=1)
    num_heads: int = option(12, "encoder attention heads", min=1)
    decoder_embed_dim: int = option(512, "decoder width (official: 512)", min=1)
    decoder_depth: int = option(8, "decoder blocks (official: 8); 0: the encoder alone, which cannot reconstruct "
                                   "(the official encoder-only release)", min=0)
    decoder_num_heads: int = option(16, "decoder attention heads (official: 16)", min=1)
    mlp_ratio: float = option(4.0, "MLP hidden width / block width", gt=0.0)
    norm_pix_loss: bool = option(True, "the decoder predicts each patch normalised by its own mean and std "
                                       "(official released models); False: the (ImageNet-normalised) pixels")

    def validate(self):
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for width, heads, what in ((self.embed_dim, self.num_heads, ""),
                                   (self.decoder_embed_dim, self.decoder_num_heads, "decoder_")):
            if width % heads:
                raise ConfigError(f"{what}embed_dim {width} is not divisible by {what}num_heads {heads}")
            if width % 4:
                raise ConfigError(f"{what}embed_dim {width} must be divisible by 4 (2-D sin-cos position embedding)")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """L, the patches per image."""
        return self.grid_size ** 2

    @property
    def patch_dim(self) -> int:
        """Values per patch: p * p * 3."""
        return self.patch_size ** 2 * 3


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """images [B, 3, H, W] -> patches [B, L, p*p*3], row-major patches, each flattened as (p, p, c) (official)."""
    b, c, h, w = images.shape
    if h % p or w % p:
        raise ValueError(f"images {h}x{w} are not divisible into {p}x{p} patches")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """patches [B, L, p*p*c] (L a square) -> images [B, c, H, W]; the inverse of `patchify`."""
    b, length, _ = patches.shape
    g = int(round(length ** 0.5))
    if g * g != length:
        raise ValueError(f"{length} patches do not form a square grid")
    x = patches.reshape(b, g, g, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, g * p, g * p)


def patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch (mean, std) over the last dim, [B, L, 1] each: std = sqrt(unbiased var + 1e-6) (official)."""
    mean = patches.mean(-1, keepdim=True)
    return mean, (patches.var(-1, keepdim=True) + NORM_PIX_EPS).sqrt()


@MODELS.register("mae", config=MAEConfig)
class MAE(nn.Module):
    """MAE encoder-decoder on pixels; see the module docstring for the data flow. Images are floats
    [B, 3, image_size, image_size] in [0, 1]; masks are float [B, L] (0 = kept, 1 = removed), as officially."""

    default_pool = "cls"  # the official linear probe reads the [CLS] token after the final norm

    def __init__(self, config: MAEConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, 3, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(c.embed_dim, c.grid_size, cls_token=True)[None])
        self.blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        if c.decoder_depth:
            d = c.decoder_embed_dim
            self.decoder_embed = nn.Linear(c.embed_dim, d)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
            self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(d, c.grid_size, cls_token=True)[None])
            self.decoder_blocks = nn.ModuleList(Block(d, c.decoder_num_heads, c.mlp_ratio)
                                                for _ in range(c.decoder_depth))
            self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
            self.decoder_pred = nn.Linear(d, c.patch_dim)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official init: the patch projection xavier_uniform as a Linear (on its weight viewed [D, 3*p*p]),
        cls_token / mask_token normal(0.02), Linear xavier_uniform with zero bias, LayerNorm 1/0."""
        init_vit_weights(self)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        if self.has_decoder:
            nn.init.normal_(self.mask_token, std=0.02)

    @property
    def has_decoder(self) -> bool:
        return self.config.decoder_depth > 0

    # ------------------------------------------------------------------------------------ pixels
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> ImageNet mean/std normalised images (what the official MAE reads)."""
        return (images - self.pixel_mean) / self.pixel_std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.pixel_std + self.pixel_mean

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> the decoder's targets [B, L, p*p*3]: the normalised image's patches,
        each standardised by its own mean and std when `norm_pix_loss`."""
        patches = patchify(self.normalize(images.float()), self.config.patch_size)
        if self.config.norm_pix_loss:
            mean, std = patch_stats(patches)
            patches = (patches - mean) / std
        return patches

    def predictions_to_images(self, pred: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Decoder output [B, L, p*p*3] -> images [B, 3, H, W] in [0, 1]. With norm-pix each patch is
        un-normalised with the mean and std of the same patch of `images` [B, 3, H, W] in [0, 1] (as the
        official visualisation does), so the picture is viewable."""
        pred = pred.float()
        if self.config.norm_pix_loss:
            mean, std = patch_stats(patchify(self.normalize(images.float()), self.config.patch_size))
            pred = pred * std + mean
        return self.denormalize(unpatchify(pred, self.config.patch_size)).clamp(0, 1)

    # ------------------------------------------------------------------------------------ network
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> patch embeddings + position [B, L, D] (no [CLS])."""
        return self.patch_embed(self.normalize(images)) + self.pos_embed[:, 1:]

    def _with_cls(self, x: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls.to(x.dtype), x], dim=1)

    def forward_encoder(self, images: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None):
        """images [B, 3, H, W] in [0, 1] -> (latent [B, 1+K, D], mask [B, L] float (1 = removed), ids_restore
        [B, L], ids_keep [B, K]); K = int(L x (1 - mask_ratio)) patches kept per row, those of lowest `noise`
        [B, L] (default: uniform from `generator` / torch's global RNG), as the official `random_masking`."""
        x, mask, ids_restore, ids_keep = random_masking(self.embed(images), mask_ratio, noise, generator)
        x = self._with_cls(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore, ids_keep

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1+K, D], ids_restore [B, L] -> predicted patches [B, L, p*p*3] (normalised as `targets`)."""
        if not self.has_decoder:
            raise UserError("this MAE has no decoder (decoder_depth 0, e.g. converted from the official "
                            "encoder-only release), so it cannot reconstruct: convert a checkpoint with the decoder "
                            "(the *_full.pth or mae_visualize_*.pth files)")
        x = self.decoder_embed(latent)
        b, n, d = x.shape
        length = ids_restore.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(b, length + 1 - n, d)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1).gather(1, ids_restore[..., None].expand(b, length, d))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, images: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """-> (pred [B, L, p*p*3], mask [B, L]) for one random masking (the official forward, without the loss)."""
        latent, mask, ids_restore, _ = self.forward_encoder(images, mask_ratio, noise)
        return self.forward_decoder(latent, ids_restore), mask

    # ---------------------------------------------------------------- reconstruction (`maskgen reconstruct`)
    @torch.no_grad()
    def masked_reconstruction(self, images: torch.Tensor, mask_ratio: float = 0.75,
                              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] in [0, 1] -> (reconstruction [B, 3, H, W] in [0, 1], pixel mask [B, 1, H, W]
        float, 1 = the patch was removed), one random masking drawn from `generator`."""
        latent, mask, ids_restore, _ = self.forward_encoder(images, mask_ratio, generator=generator)
        recon = self.predictions_to_images(self.forward_decoder(latent, ids_restore), images)
        p, g = self.config.patch_size, self.config.grid_size
        pixel_mask = mask.view(-1, 1, g, g).repeat_interleave(p, 2).repeat_interleave(p, 3)
        return recon, pixel_mask

    # ---------------------------------------------------------------------------------- fine-tuning
    def as_classifier(self, num_classes: int, drop_path: float = 0.1, pool: str = "mean") -> nn.Module:
        """This encoder + a new linear head, for `maskgen eval finetune` (`MAEClassifier`)."""
        from .mae_classifier import MAEClassifier

        return MAEClassifier.from_mae(self, num_classes, drop_path, pool)

    # ---------------------------------------------------------------------------------- features
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1], nothing masked -> the last block's outputs [B, 1+L, D], before the norm."""
        x = self._with_cls(self.embed(images))
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_features(self, images: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """Downstream features of images [B, 3, H, W] in [0, 1], nothing masked. pool="cls": norm(x)[:, 0], the
        [CLS] token (official linear probe) -> [B, D]; "mean": parameter-free LayerNorm(1e-6) of the mean patch
        output before the final norm (the official global pooling, its fc_norm at init) -> [B, D];
        "none": norm(x) -> [B, 1+L, D]."""
        if pool not in ("mean", "cls", "none"):
            raise ValueError(f"pool must be 'mean', 'cls' or 'none', got {pool!r}")
        x = self.encode(images)
        if pool == "mean":
            return F.layer_norm(x[:, 1:].mean(1), (x.shape[-1],), eps=1e-6)
        x = self.norm(x)
        return x[:, 0] if pool == "cls" else x
