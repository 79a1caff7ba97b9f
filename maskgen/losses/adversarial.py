"""Adversarial training of an image generator (here: the VQGAN decoder) against a discriminator.

Discriminators (images [B, 3, H, W] in [0, 1], fed as they are -> logits):
- `PatchDiscriminator`: the pix2pix / taming "NLayerDiscriminator" layout (4x4 convs, stride 2, LeakyReLU 0.2)
  returning a map of patch logits [B, 1, h, w]. Normalisation: GroupNorm instead of BatchNorm, because
  BatchNorm's batch statistics differ between DDP ranks and are noisy with small per-rank batches.
- `StyleGANDiscriminator`: the MaskGIT / StyleGAN2 residual layout (3x3 convs, blurred 2x downsampling,
  residual branches scaled by 1/sqrt(2), no normalisation, no minibatch-std) down to 4x4, then two linear
  layers -> one logit per image [B].

Losses on logits of any shape (averaged over all entries):
- hinge:           D = 0.5 (E[relu(1 - D(x))] + E[relu(1 + D(G))]),        G = -E[D(G)]
- non-saturating:  D = 0.5 (E[softplus(-D(x))] + E[softplus(D(G))]),      G = E[softplus(-D(G))]
(the 0.5 averages the real and fake halves, as taming does.)

`adaptive_weight` is taming's balance ||grad_last nll|| / (||grad_last g_adv|| + 1e-4); `r1_penalty` is
MaskGIT's R1 (cost x mean_b ||grad_x D(x)||^2, no 1/2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DISCRIMINATORS = ("patch", "stylegan")
GAN_LOSSES = ("hinge", "non-saturating")


def _groups(channels: int) -> int:
    """GroupNorm groups: 32 when they divide the channels, else the largest divisor below 32."""
    return max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)


class PatchDiscriminator(nn.Module):
    """[B, 3, H, W] -> patch logits [B, 1, H / 2^n - 2, W / 2^n - 2] for n = `layers` stride-2 convs
    (H = 32, n = 2: [B, 1, 6, 6]; H = 256, n = 3: [B, 1, 30, 30]). Width doubles per layer, capped at 8x."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):  # layers - 1 more stride-2 convs, then one stride-1 conv
            out = channels * min(2 ** i, 8)
            mods += [nn.Conv2d(width, out, 4, 2 if i < layers else 1, 1, bias=False),
                     nn.GroupNorm(_groups(out), out), nn.LeakyReLU(0.2)]
            width = out
        mods.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*mods)
        for m in self.modules():  # DCGAN / taming initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


class BlurDown(nn.Module):
    """Depthwise [1, 3, 3, 1] binomial blur then 2x subsampling (StyleGAN's anti-aliased downsampling):
    [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self):
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer("kernel", (k[:, None] * k[None, :] / 64.0)[None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        return F.conv2d(x, self.kernel.to(x.dtype).expand(c, 1, 4, 4), stride=2, padding=1, groups=c)


class DownBlock(nn.Module):
    """conv3x3 - lrelu - blur-down - conv3x3 - lrelu, plus a blur-down + 1x1 skip; sum scaled by 1/sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.down = BlurDown()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.leaky_relu(self.conv2(self.down(h)), 0.2)
        return (h + self.skip(self.down(x))) / math.sqrt(2)


class StyleGANDiscriminator(nn.Module):
    """[B, 3, S, S] -> logits [B]. log2(S / 4) residual down blocks take S to 4 (S a power of two >= 8);
    block i outputs channels x min(2^(i+1), 4) (MaskGIT: channels 128 -> 256, 512, 512, ...)."""

    def __init__(self, image_size: int, channels: int = 64, in_channels: int = 3):
        super().__init__()
        n = int(math.log2(image_size)) - 2
        if n < 1 or 2 ** (n + 2) != image_size:
            raise ValueError(f"StyleGANDiscriminator needs a power-of-two image size >= 8, got {image_size}")
        self.image_size = image_size
        widths = [channels] + [channels * min(2 ** (i + 1), 4) for i in range(n)]
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.Sequential(*(DownBlock(a, b) for a, b in zip(widths[:-1], widths[1:])))
        self.conv_out = nn.Conv2d(widths[-1], widths[-1], 3, padding=1)
        self.fc = nn.Linear(widths[-1] * 16, widths[-1])
        self.head = nn.Linear(widths[-1], 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {list(images.shape)}")
        h = F.leaky_relu(self.conv_in(images), 0.2)
        h = F.leaky_relu(self.conv_out(self.blocks(h)), 0.2)
        h = F.leaky_relu(self.fc(h.flatten(1)), 0.2)
        return self.head(h).squeeze(1)


def build_discriminator(kind: str, image_size: int, channels: int, layers: int) -> nn.Module:
    """`kind` in DISCRIMINATORS; `layers` is the patch discriminator's depth (StyleGAN's follows image_size)."""
    if kind == "patch":
        return PatchDiscriminator(channels, layers)
    if kind == "stylegan":
        return StyleGANDiscriminator(image_size, channels)
    raise ValueError(f"discriminator must be one of {DISCRIMINATORS}, got {kind!r}")


def d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """Discriminator loss (scalar) from logits on real and on generated images."""
    if kind == "hinge":
        return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
    if kind == "non-saturating":
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
    raise ValueError(f"GAN loss must be one of {GAN_LOSSES}, got {kind!r}")


def g_loss(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """Generator loss (scalar) from the discriminator's logits on generated images."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "non-saturating":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"GAN loss must be one of {GAN_LOSSES}, got {kind!r}")


def adaptive_weight(nll: torch.Tensor, g_adv: torch.Tensor, last_layer: torch.Tensor, average=None,
                    max_weight: float = 1e4) -> torch.Tensor:
    """||d nll / d last_layer|| / (||d g_adv / d last_layer|| + 1e-4), clamped to [0, max_weight], detached
    (taming's VQGAN). Both graphs are retained for the final backward. `average` (optional) maps a local
    gradient to its mean over DDP ranks, so that the weight is that of the global batch."""
    nll_grad, = torch.autograd.grad(nll, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_adv, last_layer, retain_graph=True)
    if average is not None:
        nll_grad, g_grad = average(nll_grad), average(g_grad)
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def r1_penalty(logits_real: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """mean_b ||d sum(D(real_b)) / d real_b||^2 (scalar). `real` must require grad and `logits_real` = D(real);
    the graph is kept (create_graph) so that the penalty trains D."""
    grad, = torch.autograd.grad(logits_real.sum(), real, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()
