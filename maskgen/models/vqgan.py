"""The VQGAN tokenizer of MAGE: the MaskGIT convolutional VQGAN, in PyTorch.

Images (RGB floats in [0, 1], fed as is) -> encoder -> continuous latent z [B, z_channels, H/f, W/f]
-> nearest codebook entry -> codes [B, H/f, W/f] -> decoder -> images. f = 2 ** (len(ch_mult) - 1).

The layout reproduces the official MAGE tokenizer (`vqgan_jax_strongaug.ckpt`, a port of MaskGIT's JAX
VQGAN) so that its state_dict loads with the identity key map and `strict=True`:
GroupNorm(eps 1e-6) + swish, no attention, 2x2 average-pool downsampling, nearest x2 + 3x3 conv
upsampling, bias-free 3x3 convs inside residual blocks, and no quant_conv / post_quant_conv.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..options import Options, option
from ..registry import MODELS


@dataclass
class VQGANConfig(Options):
    """Defaults are the official 256-px MAGE tokenizer: 16x16 tokens from a 1024 x 256 codebook (54.52 M params)."""

    in_channels: int = option(3, "image channels (input and output)", min=1)
    ch: int = option(128, "base channel count", min=1)
    ch_mult: list[int] = option([1, 1, 2, 2, 4], "channel multiplier per level; the image is halved between levels")
    num_res_blocks: int = option(2, "residual blocks per level", min=1)
    z_channels: int = option(256, "latent / codebook vector dimension", min=1)
    codebook_size: int = option(1024, "number of codebook entries", min=2)
    norm_groups: int = option(32, "GroupNorm groups (official: 32)", min=1)
    commitment_beta: float = option(0.25, "weight of the commitment loss (used by the training method)", min=0.0)

    def validate(self):
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ConfigError(f"ch_mult must be a non-empty list of positive ints, got {self.ch_mult}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups]
        if bad:
            raise ConfigError(f"channel count {bad[0]} (ch x ch_mult) is not divisible by norm_groups={self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        """Image side / token-grid side."""
        return 2 ** (len(self.ch_mult) - 1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """norm-swish-conv3x3 twice (convs without bias), plus a shortcut. [B, in, H, W] -> [B, out, H, W].

    Official quirk (from MaskGIT's ResBlock): when the channel count changes, the shortcut is NOT a projection
    of the block input. `nin_shortcut` is a 1x1 conv [out, out] applied to h, the residual branch's output,
    and the block returns nin_shortcut(h) + h; the input x is dropped. Otherwise it returns x + h.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.nin_shortcut = (nn.Conv2d(out_channels, out_channels, 1, bias=False)
                             if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is None:
            return x + h
        return self.nin_shortcut(h) + h


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv with bias. [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block` (a list of ResBlocks) and, in the decoder, an optional `upsample`."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, upsample: bool = False):
        super().__init__()
        self.block = nn.ModuleList(
            ResBlock(in_channels if j == 0 else out_channels, out_channels, groups) for j in range(num_blocks))
        if upsample:
            self.upsample = Upsample(out_channels)


class Mid(nn.Module):
    """The two residual blocks at the lowest resolution (`block_1`, `block_2`)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResBlock(channels, channels, groups)
        self.block_2 = ResBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    """[B, in_channels, H, W] -> z [B, z_channels, H/f, W/f]."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, bias=False)
        ins = [cfg.ch] + widths[:-1]
        self.down = nn.ModuleList(Level(i, o, cfg.num_res_blocks, g) for i, o in zip(ins, widths))
        self.mid = Mid(widths[-1], g)
        self.norm_out = _norm(widths[-1], g)
        # 1x1 conv with bias; its output is the latent itself (there is no quant_conv).
        self.conv_out = nn.Conv2d(widths[-1], cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != len(self.down) - 1:
                h = F.avg_pool2d(h, 2)  # MaskGIT's conv_downsample=False: 2x2 average pooling, no parameters
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z_q [B, z_channels, h, w] -> images [B, in_channels, h*f, w*f] (not squashed).

    `up[i]` belongs to level i (width ch * ch_mult[i]) and the levels run from the last to the first, as in
    the official code: up[i]'s first block maps the width of level i+1 (for the last level, of `mid`) to that
    of level i, then every level but 0 upsamples.
    """

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1], g)
        ins = widths[1:] + widths[-1:]
        self.up = nn.ModuleList(Level(ins[i], widths[i], cfg.num_res_blocks, g, upsample=i != 0)
                                for i in range(len(widths)))
        self.norm_out = _norm(widths[0], g)
        self.conv_out = nn.Conv2d(widths[0], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook (`embedding.weight` [K, C]) with a straight-through estimator.

    Called as `model.quantize(z)`: z [B, C, h, w] -> (z_q [B, C, h, w] float32, codes [B, h, w] long,
    codebook_loss, commitment_loss), with codebook_loss = mean((z_q - sg[z])^2) (moves the codebook) and
    commitment_loss = mean((z - sg[z_q])^2) (moves the encoder); the trainer adds codebook + beta * commitment.
    The official quantiser (taming `VectorQuantizer2(legacy=True)`) returned commitment + beta * codebook, i.e.
    beta on the other term; MAGE never used the loss (the tokenizer was trained in JAX and kept frozen).
    """

    # Distance rows per chunk: at most this many entries in one [rows, K] fp32 distance block (64 MiB).
    max_block = 2 ** 24

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)  # taming's init

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, C, h, w] -> codes [B, h, w]: argmin_k ||z - e_k||^2 = ||z||^2 + ||e_k||^2 - 2 z.e_k, in fp32
        (also under autocast), in row chunks so the distance matrix stays small."""
        b, c, h, w = z.shape
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, c).float()
        with torch.autocast(device_type=z.device.type, enabled=False):
            e = self.embedding.weight.detach().float()
            e_sq = e.pow(2).sum(1)
            rows = max(1, self.max_block // e.shape[0])
            codes = torch.cat([
                (chunk.pow(2).sum(1, keepdim=True) + e_sq - 2 * chunk @ e.t()).argmin(1)
                for chunk in flat.split(rows)])
        return codes.view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] (long, in [0, K)) -> codebook vectors [B, C, h, w]."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor):
        codes = self.nearest(z)
        q = self.lookup(codes)
        z32 = z.float()
        codebook_loss = F.mse_loss(q, z32.detach())
        commitment_loss = F.mse_loss(z32, q.detach())
        # Straight-through: the value is exactly the codebook vector, the gradient passes to z unchanged,
        # and no decoder gradient reaches the codebook.
        z_q = q.detach() + (z32 - z32.detach())
        return z_q, codes, codebook_loss, commitment_loss


@MODELS.register("vqgan", config=VQGANConfig)
class VQGAN(nn.Module):
    """The MAGE/MaskGIT VQGAN tokenizer. Images are RGB floats in [0, 1], [B, 3, H, W] with H, W divisible by
    f = config.downsample_factor; tokens are codes [B, H/f, W/f] in [0, codebook_size).

    Submodules `encoder`, `decoder`, `quantize` carry the official state_dict names. `quantize` is the
    VectorQuantizer module; calling `model.quantize(z)` quantises a latent (see VectorQuantizer).
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.z_channels)

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, in_channels, H, W] in [0, 1] -> continuous latent z [B, z_channels, H/f, W/f]."""
        f = self.config.downsample_factor
        if images.dim() != 4 or images.shape[1] != self.config.in_channels or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"expected images [B, {self.config.in_channels}, H, W] with H and W divisible by {f}, "
                             f"got {list(images.shape)}")
        return self.encoder(images)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, in_channels, H, W] in [0, 1] -> codes LongTensor [B, H/f, W/f] (deterministic, no grad)."""
        return self.quantize.nearest(self.encode_latent(images))

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] long in [0, codebook_size) -> z_q [B, z_channels, h, w] (codebook rows)."""
        k = self.config.codebook_size
        if codes.numel():
            lo, hi = (int(v) for v in torch.aminmax(codes))
            if lo < 0 or hi >= k:  # e.g. MAGE's special token ids (mask, fake class) passed in by mistake
                raise ValueError(f"codes must lie in [0, {k}), got values in [{lo}, {hi}]")
        return self.quantize.lookup(codes)

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q [B, z_channels, h, w] -> images [B, in_channels, h*f, w*f], not clamped."""
        return self.decoder(z_q)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] long -> images [B, in_channels, h*f, w*f] clamped to [0, 1] (no grad)."""
        return self.decode_latent(self.embed_codes(codes)).clamp(0, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images [B, C, H, W] -> {recon [B, C, H, W] (not clamped), codes [B, H/f, W/f],
        codebook_loss, commitment_loss (scalars)}; gradients reach the encoder through the straight-through z_q."""
        z_q, codes, codebook_loss, commitment_loss = self.quantize(self.encode_latent(images))
        return {"recon": self.decode_latent(z_q), "codes": codes,
                "codebook_loss": codebook_loss, "commitment_loss": commitment_loss}

    def forward_features(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Downstream features of the tokenizer, from the continuous latent z [B, z_channels, h, w] BEFORE
        quantisation: pool="mean" -> its spatial mean [B, z_channels]; "none" -> the tokens
        [B, h*w, z_channels]. images [B, in_channels, H, W] in [0, 1]. (There is no class token: "cls" is refused.)"""
        if pool not in ("mean", "none"):
            raise ValueError(f"the VQGAN tokenizer pools 'mean' or 'none', got {pool!r}")
        z = self.encode_latent(images)
        return z.mean((2, 3)) if pool == "mean" else z.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def codebook_stats(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """codes (any shape, long) -> {usage: fraction of the codebook that occurs, perplexity: exp(entropy of the
        code histogram), between 1 and codebook_size}; both 0-d float tensors."""
        counts = torch.bincount(codes.flatten(), minlength=self.config.codebook_size).float()
        p = counts / counts.sum().clamp_min(1)
        entropy = -(p * p.clamp_min(1e-30).log()).sum()
        return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}
