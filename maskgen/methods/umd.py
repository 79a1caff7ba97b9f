"""`maskgen train umd`: UMD, unified masked diffusion (Hansen-Estruch et al., arXiv 2406.17688), as the reference's
`trainers/train_ae.py:update_fn`.

Each batch of B images (model space: pixels in [-1, 1]) is split, not coin-flipped: the last n = int(B r) images
(r = `no_noise_prob`) are clean and the first B - n are noised.
- clean "representation step": time input 0, no label, `mask_ratio_no_noise` (0.75) of the patches masked;
  L_clean = mean over the masked pixels of (x0_pred - x0)², no per-patch normalisation.
- noised step: t ~ U{0..T-1}, x_t = q_sample(x0, t, ε), time input t + 1, labels (with `use_labels`, a label
  replaced by the null class with probability `label_dropout`), `mask_ratio` (0.375) masked at every t;
  L_noisy = ½ mean over the visible pixels of (ε_pred - ε)² + ½ mean over the masked pixels of (x0_pred - x0)²;
  with mask_ratio 0 both means run over all pixels.
- L = (1 - n/B) L_noisy + (n/B) L_clean; r = 1 is the clean step alone (MAE-like), r = 0 the noised alone (DiT,
  MaskDiT). "Mean over masked pixels" is mean(se · m) / mean(m) with the token mask m upsampled to pixels.

Weight decay as the reference: every parameter is decayed except the CLS tokens, the mask embedding and biases
(LayerNorm scales and position tables are decayed, unlike MAE). The class-conditional fine-tuning stage is the same
method with `use_labels` (`model.num_classes` from the data when 0), a fresh label embedder (`train.init_from`
loads the rest), the optimizer re-initialised, and an EMA of decay 1 - `ema_rate` · B / 256 made in that stage.

Latent mode (`umd.autoencoder`): the same objective on the latents of a frozen autoencoder, which rides along with
the model: our VQGAN tokenizer (its continuous latent, before quantisation) or a local diffusers AutoencoderKL (a
posterior sample, as the reference). Latents are multiplied by `model.latent_scale`: the VAE's scaling_factor, else
1 / std of the latents of 512 training images, measured when training starts; config.yaml records it.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from .. import distributed as dist
from ..data.decode import BadImage, decode_image
from ..data.sources import open_source
from ..data.transforms import EvalTransform
from ..diffusion_schedule import network_time
from ..engine.method import HookContext, Method
from ..errors import ConfigError, UserError
from ..models import from_pretrained
from ..models.diffusers_vae import DiffusersVAE
from ..models.umd import UMD, UMDConfig
from ..options import Options, option
from ..registry import METHODS
from ..sampling import samples_to_images, sampler_for

log = logging.getLogger("maskgen")

NO_DECAY = ("cls_tokens", "mask_token")


@dataclass
class UMDObjective(Options):
    """The `umd:` section: UMD's objective (defaults: the reference's pre-training)."""

    no_noise_prob: float = option(0.5, "share r of each batch that is clean (the last int(B r) images): the MAE-like "
                                       "representation step; 1: clean only (MAE-like), 0: noised only (DiT, MaskDiT)",
                                  min=0.0, max=1.0)
    mask_ratio: float = option(0.375, "patches masked in the noised images, at every t (0: none, DiT)", min=0.0, lt=1.0)
    mask_ratio_no_noise: float = option(0.75, "patches masked in the clean images", gt=0.0, lt=1.0)
    use_labels: bool = option(False, "condition the noised images on their class (the generative fine-tuning stage); "
                                     "model.num_classes is taken from the data when 0")
    label_dropout: float = option(0.1, "probability that a label is replaced by the null class (classifier-free "
                                       "guidance)", min=0.0, max=1.0)
    ema_rate: float = option(0.0, "EMA step per 256 images: train.ema_decay = 1 - ema_rate x B / 256 (fine-tuning "
                                  "stage: 1e-4, i.e. 0.9999 at B = 256); 0: no EMA", min=0.0, lt=1.0)
    autoencoder: str = option("", "latent mode: a maskgen tokenizer folder (diffusion on its continuous latent "
                                  "before quantisation) or diffusers:DIR, a local diffusers AutoencoderKL folder "
                                  "(never downloaded); empty: diffusion on pixels")


def masked_mean(se: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference's masked mean: se [B, C, h, w], mask [B, 1, h, w] (1 = counted) -> mean(se · m) / mean(m),
    i.e. the mean of se over the counted pixels and channels (fp32)."""
    return (se.float() * mask).mean() / mask.mean()


def umd_loss(model: UMD, x0: torch.Tensor, labels: torch.Tensor | None, o: UMDObjective) -> tuple[torch.Tensor, dict]:
    """UMD's loss on x0 [B, C, h, w] in model space (labels [B] with `use_labels`, else None) -> (loss, logs).
    Randomness (t, ε, masks, label dropout) from torch's global RNG."""
    b, c = x0.shape[:2]
    n_clean = int(b * o.no_noise_prob)
    n_noise = b - n_clean
    loss = x0.new_zeros((), dtype=torch.float32)
    logs = {}
    if n_noise:
        x = x0[:n_noise]
        t = torch.randint(0, model.schedule.num_timesteps, (n_noise,), device=x0.device)
        eps = torch.randn_like(x)
        y = None
        if labels is not None:
            y = labels[:n_noise]
            drop = torch.rand(n_noise, device=y.device) < o.label_dropout
            y = torch.where(drop, torch.full_like(y, model.null_class), y)
        pred, mask = model(model.schedule.q_sample(x, t, eps), network_time(t), y, o.mask_ratio)
        se_eps, se_x0 = (pred[:, c:].float() - eps) ** 2, (pred[:, :c].float() - x) ** 2
        if o.mask_ratio == 0:
            loss_eps, loss_x0 = se_eps.mean(), se_x0.mean()
        else:
            m = model.pixel_mask(mask)
            loss_eps, loss_x0 = masked_mean(se_eps, 1 - m), masked_mean(se_x0, m)
        noisy = 0.5 * loss_eps + 0.5 * loss_x0
        loss = loss + (n_noise / b) * noisy
        logs.update(loss_noisy=noisy.detach(), loss_eps=loss_eps.detach(), loss_x0_noisy=loss_x0.detach())
    if n_clean:
        x = x0[n_noise:]
        time = torch.zeros(n_clean, dtype=torch.long, device=x0.device)
        pred, mask = model(x, time, None, o.mask_ratio_no_noise)
        clean = masked_mean((pred[:, :c].float() - x) ** 2, model.pixel_mask(mask))
        loss = loss + (n_clean / b) * clean
        logs["loss_clean"] = clean.detach()
    return loss, logs


@METHODS.register("umd", model=UMDConfig, options=UMDObjective,
                  summary="UMD: one auto-encoder for clean high-mask reconstruction and masked diffusion "
                          "(features and DDIM sampling)")
class UMDMethod(Method):

    @classmethod
    def from_config(cls, cfg) -> "UMDMethod":
        """Resolve what the stage takes from elsewhere: `model.num_classes` from the data (with `use_labels`) and
        `train.ema_decay` from `ema_rate` and the effective batch; config.yaml records both."""
        o = cfg.objective
        if o.use_labels and not cfg.model.num_classes:
            source = open_source(cfg.data.path, cfg.data.split)
            if not source.classes:
                raise UserError(f"umd.use_labels needs labelled data, but {cfg.data.path} has no classes")
            cfg.model = dataclasses.replace(cfg.model, num_classes=max(source.classes) + 1)
            log.info("model.num_classes = %d (from %s)", cfg.model.num_classes, cfg.data.path)
        autoencoder = None
        if o.autoencoder:
            autoencoder = load_autoencoder(o.autoencoder)
            cfg.model = latent_model_config(cfg, autoencoder)
        if o.ema_rate > 0:
            batch = cfg.train.batch_size * cfg.train.accum_steps * dist.world_size()
            decay = 1.0 - o.ema_rate * batch / 256
            if cfg.train.ema_decay not in (0.0, decay):
                raise ConfigError(f"umd.ema_rate {o.ema_rate} gives train.ema_decay {decay:g} at batch {batch}, but "
                                  f"train.ema_decay is {cfg.train.ema_decay:g}: set only one of them")
            if decay <= 0:
                raise ConfigError(f"umd.ema_rate {o.ema_rate} x batch {batch} / 256 >= 1: lower it")
            cfg.train.ema_decay = decay
        return cls(cfg, autoencoder)

    def __init__(self, cfg, autoencoder: torch.nn.Module | None = None):
        super().__init__()
        o = self.objective = cfg.objective
        m = cfg.model
        if cfg.data.image_size != m.image_size:
            raise ConfigError(f"data.image_size {cfg.data.image_size} differs from model.image_size {m.image_size}: "
                              f"set both to the same size")
        if cfg.data.views != 1:
            raise ConfigError(f"data.views={cfg.data.views}: umd reads one view per image (set data.views=1)")
        if o.use_labels and o.no_noise_prob == 1.0:
            raise ConfigError("umd.use_labels conditions the noised images, but umd.no_noise_prob=1 has none")
        if m.latent_channels and autoencoder is None:
            raise ConfigError(f"model.latent_channels {m.latent_channels} asks for latent mode, which needs "
                              f"umd.autoencoder: a maskgen tokenizer folder, or diffusers:DIR (a local AutoencoderKL)")
        self.umd = UMD(m)
        if autoencoder is not None:
            self.umd.set_tokenizer(autoencoder)

    def release_model(self) -> UMD:
        return self.umd

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """The reference's mask: no weight decay for the CLS tokens, the mask embedding and biases; everything else
        (LayerNorm scales and position tables included) decayed."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                skip = name.endswith("bias") or name.split(".")[-1] in NO_DECAY
                (no_decay if skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def forward_loss(self, batch: dict):
        labels = None
        if self.objective.use_labels:
            labels = batch["label"]
            if bool((labels < 0).any()) or bool((labels >= self.umd.config.num_classes).any()):
                raise UserError(f"umd.use_labels: the data has images without a label or with a label outside "
                                f"0..{self.umd.config.num_classes - 1} (model.num_classes)")
        return umd_loss(self.umd, self.umd.to_model_space(batch["image"]), labels, self.objective)

    def hooks(self):
        return [sample_grid]


def load_autoencoder(spec: str) -> torch.nn.Module:
    """`umd.autoencoder` -> the frozen autoencoder: diffusers:DIR (a local AutoencoderKL) or a maskgen tokenizer
    (weights / checkpoint / run directory)."""
    if spec.startswith("diffusers:"):
        return DiffusersVAE.from_folder(spec.removeprefix("diffusers:"))
    model = from_pretrained(spec)
    if not hasattr(model, "encode_latent"):
        raise UserError(f"umd.autoencoder {spec} holds a '{model.model_name}' model, not an autoencoder (a maskgen "
                        f"tokenizer, or diffusers:DIR)")
    return model


@torch.no_grad()
def latent_scale(autoencoder: torch.nn.Module, cfg, num_images: int = 512) -> float:
    """1 / std of the latents of the first `num_images` training images (centre crops): the factor that gives the
    diffusion unit-variance data, as Stable Diffusion's 0.18215 was chosen."""
    source = open_source(cfg.data.path, cfg.data.split)
    transform = EvalTransform(cfg.data.image_size)
    images = []
    for i in range(len(source)):
        data = source[i].data
        try:
            images.append(transform(decode_image(data) if isinstance(data, bytes) else data))
        except BadImage:
            continue
        if len(images) == num_images:
            break
    if not images:
        raise UserError(f"no readable image in {cfg.data.path} to measure the latent scale")
    z = torch.cat([autoencoder.encode_latent(torch.stack(images[i:i + 64])) for i in range(0, len(images), 64)])
    return 1.0 / float(z.float().std())


def latent_model_config(cfg, autoencoder: torch.nn.Module) -> UMDConfig:
    """cfg.model with latent_channels / latent_downsample from the autoencoder and latent_scale: the config's when
    set, else a diffusers VAE's scaling_factor, else measured on the data (`latent_scale`)."""
    m, ac = cfg.model, autoencoder.config
    for key, value in (("latent_channels", ac.z_channels), ("latent_downsample", ac.downsample_factor)):
        if getattr(m, key) not in (0, 1, value):
            raise ConfigError(f"model.{key} is {getattr(m, key)} but umd.autoencoder gives {value}: leave it unset")
    scale = m.latent_scale or getattr(ac, "scaling_factor", None) or latent_scale(autoencoder, cfg)
    log.info("latent mode: %d-channel latents at 1/%d, scale %.5g", ac.z_channels, ac.downsample_factor, scale)
    return dataclasses.replace(m, latent_channels=ac.z_channels, latent_downsample=ac.downsample_factor,
                               latent_scale=scale)


@torch.no_grad()
def sample_grid(method: UMDMethod, ctx: HookContext) -> None:
    """samples/step_N.png: `vis.num_images` samples of the model's sampler with the `vis.sampler` options (a
    class-conditional model: classes 0, 1, ... in turn, one class per column), seeded by the step."""
    if not ctx.num_images:
        return
    g = torch.Generator(ctx.device).manual_seed(ctx.step)
    model = method.umd
    samples = sampler_for(model, **ctx.sampler_options).generate(model, ctx.num_images, generator=g)
    ctx.save_grid(samples_to_images(model, samples), "samples", nrow=model.config.num_classes or None)
