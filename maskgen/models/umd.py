"""UMD: the unified masked-diffusion auto-encoder (Hansen-Estruch et al., arXiv 2406.17688; `_ViTAE` of the official
JAX `models/ae.py`), one ViT that gives linear-probe features and samples by diffusion.

x [B, C, H, W] in model space (pixels in [-1, 1], or scaled latents) -> patch embedding (Conv2d, kernel = stride = p)
+ learned position embedding -> MAE argsort masking (`maskgen.masking.random_masking`, keep int(L(1 - ratio)))
-> 4 zero-initialised CLS tokens prepended -> encoder blocks -> LayerNorm; rep = mean of the 4 CLS outputs [B, D]
-> visible tokens + learned mask embeddings, un-shuffled -> + learned decoder position embedding -> rep prepended
as one token -> decoder blocks (same width and heads) -> first token dropped -> LayerNorm -> final adaLN
modulation -> tokens as a [B, D, h, w] map -> ConvTranspose2d(D, 2C, kernel = stride = p) -> pred [B, 2C, H, W]:
pred[:, :C] = x0, pred[:, C:] = ε.

Conditioning: c = trunk(sinusoidal(time)) (+ trunk(label embedding) in the class-conditional stage), each trunk
Dense(2D) -> SiLU -> Dense(D). With `adaln` every encoder and decoder block is DiT's adaLN-Zero block on SiLU(c)
(our Block applies the SiLU, so c itself is passed; the reference computes SiLU once and feeds the Dense: the same
function), and the final layer modulates the normed tokens with Dense(SiLU(c)) -> (shift, scale), zero-initialised.
Without `adaln` (the reference's MAE-like baseline) c is prepended as a token inside every block and removed
after it, and the final LayerNorm is affine without modulation (the reference is silent there: our choice).
Time input: t + 1 for a sample noised to index t, 0 for clean images (the representation step and features).
Labels: 0..num_classes-1, `num_classes` is the null class of classifier-free guidance; `y=None` adds no label
embedding at all (the reference's clean step passes no label).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..diffusion_schedule import SCHEDULES, DiffusionSchedule, network_time
from ..errors import ConfigError, UserError
from ..masking import random_masking
from ..options import Options, option
from ..registry import MODELS
from .frozen_tokenizer import FrozenTokenizerMixin
from .layers import Block, PatchEmbed, init_vit_weights, modulate

# The reference's variants (`decode_variant`): width, encoder depth, decoder depth, heads.
UMD_VARIANTS = {"S": (384, 12, 4, 6), "B": (768, 12, 4, 12), "L": (1024, 24, 8, 16)}
NUM_CLS = 4


@dataclass
class UMDConfig(Options):
    """The architecture; defaults are the reference's UMD-B/4 on 64x64 pixels."""

    image_size: int = option(64, "side of the square images (pixels) the model generates and reads", min=1)
    patch_size: int = option(4, "side of a square patch of the model's input (pixels, or latent cells)", min=1)
    embed_dim: int = option(768, "width of encoder and decoder (S 384, B 768, L 1024)", min=1)
    depth: int = option(12, "encoder blocks (S/B 12, L 24)", min=1)
    decoder_depth: int = option(4, "decoder blocks, same width as the encoder (S/B 4, L 8)", min=1)
    num_heads: int = option(12, "attention heads of every block (S 6, B 12, L 16)", min=1)
    mlp_ratio: float = option(4.0, "MLP hidden width / block width", gt=0.0)
    adaln: bool = option(True, "adaLN-Zero conditioning of every block (False: the condition is a token, the "
                               "reference's MAE-like baseline)")
    num_classes: int = option(0, "class labels of the class-conditional stage (0: unconditional; the label "
                                 "embedder has num_classes + 1 rows, the last the null class)", min=0)
    schedule: str = option("cosine", "noise schedule: cosine (pixels, x0 clipped to [-1, 1] when sampling) or "
                                     "linear (latents, no clipping)", choices=SCHEDULES)
    num_timesteps: int = option(1000, "diffusion steps T", min=2)
    latent_channels: int = option(0, "0: diffusion on pixels; >0: on latents of this many channels of the "
                                     "attached frozen autoencoder (set from `umd.autoencoder`)", min=0)
    latent_downsample: int = option(1, "pixels per latent cell of the autoencoder (latent mode)", min=1)
    latent_scale: float = option(0.0, "latent mode: latents are multiplied by this before diffusion (a diffusers "
                                      "VAE's scaling_factor, else 1 / std of the training data's latents, measured "
                                      "when training starts); 0: not set yet", min=0.0)

    def validate(self):
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % 2:
            raise ConfigError(f"embed_dim {self.embed_dim} must be even (sinusoidal time embedding)")
        if self.image_size % self.latent_downsample:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of latent_downsample "
                              f"{self.latent_downsample}")
        if self.latent_channels and self.latent_downsample < 2:
            raise ConfigError("latent mode (latent_channels > 0) needs latent_downsample, the autoencoder's factor")
        if self.input_size % self.patch_size:
            raise ConfigError(f"the model's input side {self.input_size} is not a multiple of patch_size "
                              f"{self.patch_size}")

    @property
    def in_channels(self) -> int:
        """C: 3 for pixels, `latent_channels` for latents."""
        return self.latent_channels or 3

    @property
    def input_size(self) -> int:
        """Side of the model's input: image_size for pixels, image_size / latent_downsample for latents."""
        return self.image_size // self.latent_downsample if self.latent_channels else self.image_size

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The reference's `TimeEmb`: t [B] -> [B, dim] = [sin(t f), cos(t f)], f_i = exp(-log(1e4) i / (half - 1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class Trunk(nn.Sequential):
    """The reference's `EmbeddingTrunk`: Dense(2D) -> SiLU -> Dense(D). [B, D] -> [B, D]."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))


@MODELS.register("umd", config=UMDConfig)
class UMD(FrozenTokenizerMixin, nn.Module):
    """UMD auto-encoder; see the module docstring. Masks are float [B, L] (0 = kept, 1 = masked). In latent mode the
    frozen autoencoder rides along as `tokenizer` (outside the state_dict, saved in `tokenizer/`): our VQGAN
    tokenizer (its continuous latent before quantisation) or a diffusers AutoencoderKL."""

    default_pool = "cls"  # the reference's representation: the mean of the 4 CLS outputs at t = 0, no masking
    default_sampler = "ddim"

    def __init__(self, config: UMDConfig):
        super().__init__()
        self.config = c = config
        d, cond = c.embed_dim, (c.embed_dim if c.adaln else None)
        self.schedule = DiffusionSchedule(c.schedule, c.num_timesteps)
        self.feature_t: int | None = None  # features of images noised to this index (`maskgen features --t`)
        self.patch_embed = PatchEmbed(c.input_size, c.patch_size, c.in_channels, d)
        self.pos_embed = nn.Parameter(torch.empty(1, c.num_patches, d))
        self.cls_tokens = nn.Parameter(torch.zeros(1, NUM_CLS, d))
        self.blocks = nn.ModuleList(Block(d, c.num_heads, c.mlp_ratio, cond_dim=cond) for _ in range(c.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.mask_token = nn.Parameter(torch.empty(1, 1, d))
        self.decoder_pos_embed = nn.Parameter(torch.empty(1, c.num_patches, d))
        self.decoder_blocks = nn.ModuleList(Block(d, c.num_heads, c.mlp_ratio, cond_dim=cond)
                                            for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6, elementwise_affine=not c.adaln)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d)) if c.adaln else None
        self.head = nn.ConvTranspose2d(d, 2 * c.in_channels, kernel_size=c.patch_size, stride=c.patch_size)
        self.time_trunk = Trunk(d)
        if c.num_classes:
            self.label_embed = nn.Embedding(c.num_classes + 1, d)
            self.label_trunk = Trunk(d)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Linear xavier_uniform / zero bias (adaLN modulations and the final modulation zero), position tables
        normal(0, 1/sqrt(L)) as the reference, mask embedding normal(0.02), CLS tokens zero, the patch
        projection xavier as a Linear, the output ConvTranspose normal(0.02) with zero bias."""
        c = self.config
        init_vit_weights(self)
        for table in (self.pos_embed, self.decoder_pos_embed):
            nn.init.normal_(table, std=1.0 / math.sqrt(c.num_patches))
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.zeros_(self.cls_tokens)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if self.final_modulation is not None:
            nn.init.zeros_(self.final_modulation[-1].weight)
            nn.init.zeros_(self.final_modulation[-1].bias)
        if c.num_classes:
            nn.init.normal_(self.label_embed.weight, std=0.02)

    # ------------------------------------------------------------------------------ conditioning
    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def condition(self, time: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """time [B] (network time: 0 clean, t+1 noised), y [B] labels (num_classes = null) or None -> c [B, D]."""
        c = self.time_trunk(timestep_embedding(time, self.config.embed_dim))
        if y is not None:
            if not self.config.num_classes:
                raise UserError("this UMD model is unconditional (num_classes 0): it takes no class labels")
            c = c + self.label_trunk(self.label_embed(y))
        return c

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.config.adaln:
            for blk in blocks:
                x = blk(x, c)
            return x
        token = c[:, None].to(x.dtype)
        for blk in blocks:  # the condition is a token inside every block, removed after it
            x = blk(torch.cat([token, x], 1))[:, 1:]
        return x

    # ------------------------------------------------------------------------------------ network
    def forward_encoder(self, x: torch.Tensor, c: torch.Tensor, mask_ratio: float = 0.0,
                        noise: torch.Tensor | None = None, generator: torch.Generator | None = None):
        """x [B, C, h, w] model space, c [B, D] -> (tokens [B, 4+K, D] after the norm, mask [B, L], ids_restore
        [B, L]); K = int(L (1 - mask_ratio)) visible patches, chosen by `noise` [B, L] / `generator` as MAE."""
        tokens = self.patch_embed(x) + self.pos_embed
        if mask_ratio == 0 and noise is None:  # nothing masked: natural order, no random draw
            b, length = tokens.shape[:2]
            mask = tokens.new_zeros(b, length, dtype=torch.float32)
            ids_restore = torch.arange(length, device=x.device).expand(b, length)
        else:
            tokens, mask, ids_restore, _ = random_masking(tokens, mask_ratio, noise, generator)
        h = torch.cat([self.cls_tokens.expand(len(x), -1, -1).to(tokens.dtype), tokens], 1)
        return self.norm(self._run(self.blocks, h, c)), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """latent [B, 4+K, D], ids_restore [B, L], c [B, D] -> pred [B, 2C, H, W] (x0 channels, then ε)."""
        b, _, d = latent.shape
        length, g = ids_restore.shape[1], self.config.grid_size
        visible = latent[:, NUM_CLS:]
        x = torch.cat([visible, self.mask_token.to(visible.dtype).expand(b, length - visible.shape[1], d)], 1)
        x = x.gather(1, ids_restore[..., None].expand(b, length, d)) + self.decoder_pos_embed
        rep = latent[:, :NUM_CLS].mean(1, keepdim=True)
        x = self.decoder_norm(self._run(self.decoder_blocks, torch.cat([rep, x], 1), c)[:, 1:])
        if self.final_modulation is not None:
            shift, scale = self.final_modulation(c).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        return self.head(x.transpose(1, 2).reshape(b, d, g, g))

    def forward(self, x: torch.Tensor, time: torch.Tensor, y: torch.Tensor | None = None, mask_ratio: float = 0.0,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None):
        """x [B, C, h, w] (model space), time [B] network time, y [B] or None -> (pred [B, 2C, h, w], mask [B, L])."""
        c = self.condition(time, y)
        latent, mask, ids_restore = self.forward_encoder(x, c, mask_ratio, noise, generator)
        return self.forward_decoder(latent, ids_restore, c), mask

    def pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Token mask [B, L] -> [B, 1, h, w] on the model's input grid (each patch's cells)."""
        p, g = self.config.patch_size, self.config.grid_size
        return mask.view(-1, 1, g, g).repeat_interleave(p, 2).repeat_interleave(p, 3)

    # ------------------------------------------------------------- model space (pixels or latents)
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.config
        return c.in_channels, c.input_size, c.input_size

    @property
    def clip_denoised(self) -> bool:
        """x0 is clipped to [-1, 1] when sampling in pixel space (the reference's `clip_denoised`)."""
        return not self.config.latent_channels

    def check_tokenizer(self, tok: nn.Module) -> None:
        """The autoencoder must give latents of `latent_channels` channels at `latent_downsample`."""
        c = self.config
        got = (tok.config.z_channels, tok.config.downsample_factor)
        if not c.latent_channels:
            raise UserError("a pixel-space UMD model (latent_channels 0) takes no autoencoder")
        if got != (c.latent_channels, c.latent_downsample):
            raise UserError(f"the autoencoder gives {got[0]}-channel latents at 1/{got[1]} of the image side, but this "
                            f"UMD model diffuses {c.latent_channels}-channel latents at 1/{c.latent_downsample}")

    def _autoencoder(self) -> nn.Module:
        if self.tokenizer is None:
            raise UserError("this latent-mode UMD model has no autoencoder attached (no tokenizer/ folder beside its "
                            "weights)")
        return self.tokenizer

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> model space [B, C, h, w]: pixels in [-1, 1], or the autoencoder's latents
        times `latent_scale` (no grad)."""
        if not self.config.latent_channels:
            return images * 2 - 1
        with torch.no_grad():
            return self._autoencoder().encode_latent(images.float()) * self.config.latent_scale

    def decode_samples(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples [B, C, h, w] in model space -> images [B, 3, H, W] in [0, 1]."""
        if not self.config.latent_channels:
            return ((samples.float() + 1) / 2).clamp(0, 1)
        with torch.no_grad():
            return self._autoencoder().decode_latent(samples.float() / self.config.latent_scale).clamp(0, 1)

    def check_can_sample(self) -> None:
        if self.config.latent_channels:
            self._autoencoder()

    # ---------------------------------------------------------------------------------- fine-tuning
    def as_classifier(self, num_classes: int, drop_path: float = 0.1, pool: str = "cls") -> nn.Module:
        """This encoder at time 0 + a new linear head, for `maskgen eval finetune` (`UMDClassifier`)."""
        from .umd_classifier import UMDClassifier

        return UMDClassifier.from_umd(self, num_classes, drop_path, pool)

    # ---------------------------------------------------------------------------------- features
    def forward_features(self, images: torch.Tensor, pool: str = "cls", generator: torch.Generator | None = None):
        """Features of images [B, 3, H, W] in [0, 1], nothing masked: clean at time 0 (`feature_t` None), or noised
        to index `feature_t` = t and told t + 1 (the reference's `noised_predict`, t = 50 for its DiT baselines; the
        noise comes from `generator`, default one seeded 0 per call). pool "cls": the mean of the 4 CLS outputs (the
        reference's representation) [B, D]; "mean": the mean of the patch outputs [B, D]; "none": [B, 4+L, D]."""
        if pool not in ("cls", "mean", "none"):
            raise ValueError(f"pool must be 'cls', 'mean' or 'none', got {pool!r}")
        x = self.to_model_space(images)
        time = torch.zeros(len(x), dtype=torch.long, device=x.device)
        if self.feature_t is not None:
            g = generator or torch.Generator(x.device).manual_seed(0)
            t = torch.full_like(time, self.feature_t)
            x = self.schedule.q_sample(x, t, torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype))
            time = network_time(t)
        latent, _, _ = self.forward_encoder(x, self.condition(time))
        if pool == "cls":
            return latent[:, :NUM_CLS].mean(1)
        return latent[:, NUM_CLS:].mean(1) if pool == "mean" else latent
