"""`maskgen train tokenizer`: the VQGAN tokenizer trained with MaskGIT's / taming's recipe.

loss = recon_weight x (L1 | L2)                         pixels
     + perceptual_weight x perceptual distance          frozen lite0 or LPIPS-VGG (optional)
     + codebook_weight x (codebook + beta x commitment)  VQ, beta = model.commitment_beta (0.25)
     + entropy_weight x (per-position entropy - entropy of the batch-mean code distribution)   dead-code guard
     + adversarial terms from step disc_start on (optional):
       w x g_adv(D(recon))  with w = disc_weight x adaptive weight (or disc_weight),  + d_loss + r1_weight x R1
plus, optionally, dead-code restarts (every restart_every steps, unused codes jump onto batch latents).
Whole-batch statistics (the entropy's code distribution, the adaptive weight's gradients) are averaged over
DDP ranks, so N processes train like one process with the same global batch.

The engine has ONE optimizer and ONE backward over the whole method, so generator and discriminator are
trained by the same backward with disjoint gradients: the generator term evaluates D through detached
copies of its parameters (no gradient reaches D), the discriminator term sees `recon.detach()` (no gradient
reaches the generator). The discriminator is a trainable submodule (saved in the training state, not in the
released VQGAN); the perceptual network is frozen and kept out of state_dict / parameters / DDP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..distributed import broadcast_, mean_over_ranks
from ..engine.method import HookContext, Method
from ..errors import ConfigError
from ..losses import (GAN_LOSSES, PerceptualLoss, adaptive_weight, build_discriminator, d_loss, g_loss,
                      r1_penalty)
from ..losses.metrics import psnr
from ..models.vqgan import VQGAN, VQGANConfig
from ..options import Options, option
from ..registry import METHODS


@dataclass
class TokenizerObjective(Options):
    """Defaults: pixel + VQ losses only (fast); the presets turn on the rest of MaskGIT's recipe."""

    recon: str = option("l1", "pixel reconstruction loss", choices=("l1", "l2"))
    recon_weight: float = option(1.0, "weight of the pixel reconstruction loss", min=0.0)
    codebook_weight: float = option(1.0, "weight of the VQ codebook + beta x commitment loss", min=0.0)
    perceptual: str = option("none", "perceptual loss network: lite0 (EfficientNet-Lite0, offline) or lpips-vgg "
                                     "(LPIPS v0.1, needs local VGG16 + LPIPS weights)",
                             choices=("none", "lite0", "lpips-vgg"))
    perceptual_weight: float = option(0.1, "weight of the perceptual loss (MaskGIT: 0.1 with LPIPS; lite0 has no "
                                           "learned channel weights and ~100x larger gradients: use ~0.001)", min=0.0)
    perceptual_size: int = option(224, "resize images to this side before the perceptual network (0: as they are)",
                                  min=0)
    lpips_vgg_weights: str | None = option(None, "torchvision vgg16-397923af.pth (default: "
                                                 "$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth)")
    lpips_linear_weights: str | None = option(None, "LPIPS v0.1 linear layers vgg.pth (default: from the installed "
                                                    "lpips package)")
    disc: str = option("none", "discriminator: patch (PatchGAN, GroupNorm) or stylegan (residual, blur "
                               "downsampling; needs a power-of-two image size)", choices=("none", "patch", "stylegan"))
    disc_loss: str = option("hinge", "GAN loss for both players", choices=GAN_LOSSES)
    disc_weight: float = option(0.8, "weight of the generator's adversarial loss (taming: 0.8 x adaptive weight; "
                                     "MaskGIT: 0.1, not adaptive)", min=0.0)
    disc_start: int = option(0, "optimizer step at which the adversarial terms (both players) switch on", min=0)
    disc_adaptive: bool = option(True, "scale the generator's adversarial loss by ||grad nll|| / ||grad g_adv|| at "
                                       "the decoder's last layer (taming)")
    disc_channels: int = option(64, "discriminator base width", min=1)
    disc_layers: int = option(3, "stride-2 convolutions of the patch discriminator", min=1)
    r1_weight: float = option(0.0, "R1 penalty cost on real images, cost x E||grad_x D||^2 (MaskGIT: 10 with "
                                    "stylegan)", min=0.0)
    entropy_weight: float = option(0.0, "weight of the codebook entropy loss against dead codes (MaskGIT: 0.1)",
                                   min=0.0)
    entropy_temperature: float = option(0.01, "softmax temperature on negative code distances (MaskGIT: 0.01)",
                                        gt=0.0)
    restart_every: int = option(0, "dead-code restarts: every N optimizer steps (and at step 0, which initialises "
                                   "the codebook from data), codes unused since the last restart move onto random "
                                   "encoder outputs of the batch (0: off)", min=0)

    def validate(self):
        if self.r1_weight > 0 and self.disc == "none":
            raise ConfigError("r1_weight > 0 needs a discriminator (set disc=patch or disc=stylegan)")


def codebook_entropy_loss(z: torch.Tensor, codebook: torch.Tensor, temperature: float, average=None):
    """MaskGIT's entropy loss. z [B, C, h, w] latents, codebook [K, C]. With p_n = softmax(-||z_n - e_k||^2 / T)
    over codes k: returns (loss, sample_entropy, mean_entropy) where sample_entropy = mean_n H(p_n) (low: each
    latent is near one code) and mean_entropy = H(mean_n p_n) (high: the batch uses many codes);
    loss = sample_entropy - mean_entropy. Computed in fp32; gradients reach z and the codebook.
    `average` (optional) maps the local mean distribution [K] to the mean over all DDP ranks, so that the
    batch-level term is that of the global batch (as in one process)."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        e = codebook.float()
        sq_dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        log_p = torch.log_softmax(-sq_dist / temperature, dim=1)
        p = log_p.exp()
        sample_entropy = -(p * log_p).sum(1).mean()
        mean_p = p.mean(0) if average is None else average(p.mean(0))
        mean_entropy = -(mean_p * torch.log(mean_p + 1e-5)).sum()  # MaskGIT's +1e-5 keeps log finite
    return sample_entropy - mean_entropy, sample_entropy, mean_entropy


@METHODS.register("tokenizer", model=VQGANConfig, options=TokenizerObjective,
                  summary="VQGAN tokenizer (MaskGIT/MAGE architecture): pixel + perceptual + VQ + entropy + "
                          "adversarial losses")
class TokenizerMethod(Method):
    """`vqgan` (released) + optional `disc` (trained, kept in the training state) + optional frozen
    `perceptual` (never saved). `image_size` is only needed by the StyleGAN discriminator."""

    @classmethod
    def from_config(cls, cfg) -> "TokenizerMethod":
        f = cfg.model.downsample_factor
        if cfg.data.image_size % f:
            raise ConfigError(f"data.image_size {cfg.data.image_size} is not a multiple of the tokenizer's "
                              f"downsampling factor {f} (2^(len(model.ch_mult) - 1))")
        return cls(cfg.model, cfg.objective, cfg.data.image_size)

    def __init__(self, model_cfg: VQGANConfig, loss_cfg: TokenizerObjective, image_size: int = 256):
        super().__init__()
        self.vqgan = VQGAN(model_cfg)
        self.loss_cfg = loss_cfg
        self.disc = None
        if loss_cfg.disc != "none":
            _check_disc(loss_cfg, image_size)
            self.disc = build_discriminator(loss_cfg.disc, image_size, loss_cfg.disc_channels, loss_cfg.disc_layers)
        if loss_cfg.restart_every:
            # codes used since the last restart (summed over ranks): saved with the training state for exact resume
            self.register_buffer("code_usage", torch.zeros(model_cfg.codebook_size))
            self._restarted_at = -1  # the step whose restart already ran (micro-steps share a step)
        self.perceptual = None
        if loss_cfg.perceptual != "none":  # built last: its random init must not shift the other modules' init
            self.perceptual = PerceptualLoss(loss_cfg.perceptual, loss_cfg.perceptual_size,
                                             loss_cfg.lpips_vgg_weights, loss_cfg.lpips_linear_weights)

    def release_model(self) -> VQGAN:
        return self.vqgan

    def forward_loss(self, batch: dict):
        cfg, x = self.loss_cfg, batch["image"]
        z = self.vqgan.encode_latent(x)
        track = cfg.restart_every > 0 and self.training and torch.is_grad_enabled()
        if track:
            self.restart_dead_codes(z, batch["step"])
        z_q, codes, codebook_loss, commitment_loss = self.vqgan.quantize(z)
        if track:
            counts = torch.bincount(codes.flatten(), minlength=self.code_usage.numel()).float()
            self.code_usage += mean_over_ranks(counts)  # only "zero or not" matters
        recon = self.vqgan.decode_latent(z_q).float()  # not clamped (see PerceptualLoss)

        rec = F.l1_loss(recon, x) if cfg.recon == "l1" else F.mse_loss(recon, x)
        nll = cfg.recon_weight * rec  # the reconstruction terms the adaptive weight balances against
        logs = {"recon": rec.detach()}
        if self.perceptual is not None:
            perceptual = self.perceptual(recon, x).mean()
            nll = nll + cfg.perceptual_weight * perceptual
            logs["perceptual"] = perceptual.detach()
        vq = codebook_loss + self.vqgan.config.commitment_beta * commitment_loss
        loss = nll + cfg.codebook_weight * vq
        logs["vq"] = vq.detach()
        if cfg.entropy_weight > 0:
            entropy, sample_entropy, mean_entropy = codebook_entropy_loss(
                z, self.vqgan.quantize.embedding.weight, cfg.entropy_temperature,
                average=lambda t: mean_over_ranks(t, differentiable=True))
            loss = loss + cfg.entropy_weight * entropy
            logs.update(entropy=entropy.detach(), entropy_sample=sample_entropy.detach(),
                        entropy_mean=mean_entropy.detach())
        if self.disc is not None:
            g_term, d_term, adv_logs = self.adversarial_terms(x, recon, nll, batch["step"])
            loss = loss + g_term + d_term
            logs.update(adv_logs)

        stats = self.vqgan.codebook_stats(codes)
        logs.update(psnr=psnr(recon.detach(), x), usage=stats["usage"], perplexity=stats["perplexity"])
        return loss, logs

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, step: int) -> None:
        """At step 0 and every `restart_every` steps (once per step), move every code unused since the last
        restart onto a random latent of the batch (z [B, C, h, w]); rank 0 draws them and broadcasts, so every
        rank's codebook stays identical. At step 0 no code has been used yet: the whole codebook starts on data."""
        if step % self.loss_cfg.restart_every or step == self._restarted_at:
            return
        self._restarted_at = step
        dead = (self.code_usage == 0).nonzero().flatten()
        if len(dead):
            candidates = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            new = candidates[torch.randint(len(candidates), (len(dead),), device=z.device)].float()
            broadcast_(new, src=0)
            weight = self.vqgan.quantize.embedding.weight
            weight[dead] = new.to(weight.dtype)
        self.code_usage.zero_()

    def adversarial_terms(self, x: torch.Tensor, recon: torch.Tensor, nll: torch.Tensor, step: int):
        """(generator term, discriminator term, logs) for images x, reconstructions recon (in the graph) and the
        reconstruction loss nll. The generator term's gradient reaches only the tokenizer, the discriminator
        term's only D. Before `disc_start` both are off (0); the discriminator term still holds every D
        parameter (times 0) so that DDP (find_unused_parameters=False) sees a gradient for each."""
        cfg = self.loss_cfg
        use_r1 = cfg.r1_weight > 0
        if step < cfg.disc_start:
            d_term = sum(p.sum() for p in self.disc.parameters()) * 0.0
            logs = {k: 0.0 for k in ("g_adv", "d_loss", "disc_weight", "logits_real", "logits_fake")}
            return recon.new_zeros(()), d_term, ({**logs, "r1": 0.0} if use_r1 else logs)

        # generator: D through detached parameters and buffers, so only the tokenizer receives this gradient
        detached = {k: v.detach() for k, v in (*self.disc.named_parameters(), *self.disc.named_buffers())}
        g_adv = g_loss(functional_call(self.disc, detached, (recon,)), cfg.disc_loss)
        weight = torch.tensor(cfg.disc_weight, device=recon.device)
        if cfg.disc_adaptive and torch.is_grad_enabled():
            weight = weight * adaptive_weight(nll, g_adv, self.vqgan.decoder.conv_out.weight, mean_over_ranks)

        # discriminator: detached images, so only D receives this gradient
        real = x.detach().requires_grad_(use_r1 and torch.is_grad_enabled())
        logits_real, logits_fake = self.disc(real), self.disc(recon.detach())
        d_term = d = d_loss(logits_real, logits_fake, cfg.disc_loss)
        logs = {"g_adv": g_adv.detach(), "d_loss": d.detach(), "disc_weight": weight.detach(),
                "logits_real": logits_real.detach().float().mean(), "logits_fake": logits_fake.detach().float().mean()}
        if use_r1:
            r1 = r1_penalty(logits_real, real) if real.requires_grad else torch.zeros((), device=x.device)
            d_term = d_term + cfg.r1_weight * r1
            logs["r1"] = r1.detach()
        return weight * g_adv, d_term, logs

    def hooks(self):
        return [reconstruction_grid]


def _check_disc(cfg: TokenizerObjective, image_size: int) -> None:
    if cfg.disc == "stylegan" and (image_size < 8 or 2 ** int(math.log2(image_size)) != image_size):
        raise ConfigError(f"loss.disc=stylegan needs a power-of-two data.image_size >= 8, got {image_size}")
    if cfg.disc == "patch" and image_size // 2 ** cfg.disc_layers < 3:
        raise ConfigError(f"loss.disc_layers={cfg.disc_layers} is too deep for {image_size}-px images "
                          f"(the patch discriminator needs image_size / 2^layers >= 3)")


@torch.no_grad()
def reconstruction_grid(method: TokenizerMethod, ctx: HookContext) -> None:
    """samples/recon_step_N.png: originals (top rows) above their reconstructions; logs PSNR and usage."""
    if ctx.images is None:
        return
    x = ctx.images.to(ctx.device)
    codes = method.vqgan.encode(x)
    y = method.vqgan.decode(codes)
    ctx.save_grid(torch.cat([x, y]), "reconstructions", prefix="recon_", nrow=min(8, len(x)))
    stats = method.vqgan.codebook_stats(codes)
    ctx.log({"eval/psnr": float(psnr(y, x)), "eval/usage": float(stats["usage"])})
