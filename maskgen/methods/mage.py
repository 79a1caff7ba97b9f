"""`maskgen train mage`: MAGE pre-training on VQGAN tokens (from images tokenized on the fly, or a token cache),
and MAGE-C when `mage.contrastive_weight > 0`.

The method owns MAGE's objective and data path: the masking-ratio distribution, the masks (`MAGEMasking`), the
label-smoothed token loss (`mage_loss`), the frozen tokenizer (`mage.tokenizer`) and the token cache
(`mage.token_cache`). The tokenizer travels with the model (saved in `tokenizer/` of every checkpoint), so
`maskgen.from_pretrained(run_dir)` can generate images and extract features.

MAGE-C (paper §3; the official repository has no MAGE-C code): two augmented views of each image both take
the MAGE loss; the encoder outputs of each masked view are average-pooled, an MLP projection head maps them
to `contrastive_dim`, and an InfoNCE loss (negatives gathered across ranks) is added with weight λ. The head is
training state only: the released model is the plain MAGE. λ, the temperature and the head's size are not
confirmed against the paper's appendix here; they are options with the documented defaults below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.token_cache import CachedTokens, TokenCache
from ..engine.method import HookContext, Method
from ..errors import ConfigError, UserError
from ..losses.contrastive import info_nce
from ..masking import TruncatedNormalRatio, token_masks
from ..models import from_pretrained
from ..models.mage import MAGE, MAGEConfig
from ..options import Options, option
from ..registry import METHODS
from ..sampling import samples_to_images, sampler_for


@dataclass
class MAGEObjective(Options):
    """The `mage:` section: MAGE's pre-training objective and data path (defaults: the paper's)."""

    tokenizer: str = option("", "tokenizer weights/run directory that turns images into tokens (required)")
    token_cache: str = option("", "read tokens from this `maskgen cache-tokens` file instead of tokenizing images")
    mask_ratio_mu: float = option(0.55, "masking-ratio truncated normal: centre before truncation")
    mask_ratio_std: float = option(0.25, "masking-ratio truncated normal: std before truncation", min=0.0)
    mask_ratio_min: float = option(0.5, "lowest masking ratio; ceil(L x this) tokens are always dropped from "
                                        "the encoder", min=0.0, max=1.0)
    mask_ratio_max: float = option(1.0, "highest masking ratio", min=0.0, max=1.0)
    ratio_per_sample: bool = option(False, "draw one masking ratio per sample (False: one per batch, official)")
    label_smoothing: float = option(0.1, "label smoothing of the token cross-entropy", min=0.0, lt=1.0)
    contrastive_weight: float = option(0.0, "MAGE-C: weight λ of the InfoNCE loss (0: plain MAGE; needs "
                                            "data.views=2; paper value unconfirmed here, 0.1 in the mage-c presets)",
                                       min=0.0)
    contrastive_temperature: float = option(0.2, "MAGE-C: InfoNCE temperature (unconfirmed; SimCLR-style 0.1-0.2)",
                                            min=1e-4)
    contrastive_hidden_dim: int = option(2048, "MAGE-C: hidden width of the MLP projection head", min=1)
    contrastive_dim: int = option(256, "MAGE-C: output width of the projection head", min=1)

    def validate(self):
        if not self.mask_ratio_min <= self.mask_ratio_max:
            raise ConfigError(f"need mask_ratio_min <= mask_ratio_max, got {self.mask_ratio_min}, "
                              f"{self.mask_ratio_max}")


class MAGEMasking:
    """The pre-training masks of MAGE for L tokens: a masking ratio per batch (official) or per sample from
    TN(mu, std) truncated to [min, max]; ceil(L x ratio) tokens masked, ceil(L x mask_ratio_min) of them dropped
    from the encoder (128 of 256 officially)."""

    def __init__(self, objective: MAGEObjective, num_tokens: int):
        o = objective
        self.num_tokens, self.per_sample = num_tokens, o.ratio_per_sample
        self.num_dropped = int(math.ceil(num_tokens * o.mask_ratio_min))
        self.ratio = TruncatedNormalRatio(o.mask_ratio_mu, o.mask_ratio_std, o.mask_ratio_min, o.mask_ratio_max)

    def sample(self, batch: int, generator: torch.Generator | None = None, device=None):
        """(ratio float64 [batch], drop_mask bool [B, L], mask bool [B, L]); randomness from `generator` (on
        `device`), or torch's global RNG."""
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        ratio = self.ratio.sample(batch if self.per_sample else 1, generator=generator, device=device).expand(batch)
        drop_mask, mask = token_masks(batch, self.num_tokens, ratio, self.num_dropped, generator=generator,
                                      device=device)
        return ratio, drop_mask, mask


def mage_loss(model: MAGE, tokens: torch.Tensor, masking: MAGEMasking, label_smoothing: float,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """MAGE's pre-training loss on tokens [B, L] / [B, h, w] (or images, tokenized) -> (loss, logs, pooled).

    loss: label-smoothed cross-entropy of the codebook logits against the true tokens, averaged over all masked
    tokens of the batch (dropped included); the logits are computed at the masked positions only, and over the
    K codebook rows only (the same numbers as slicing the full logits [:, 1:, :K], without the 2,025-way layer
    at every position). logs: `acc` (argmax accuracy on the masked tokens) and `mask_ratio` (mean sampled
    ratio), detached 0-d tensors. pooled [B, D]: the mean of the normed encoder outputs of the kept image
    tokens ([C0] excluded), which MAGE-C's contrastive head reads."""
    tokens = model.as_tokens(tokens)
    ratio, drop_mask, mask = masking.sample(tokens.shape[0], generator, device=tokens.device)
    latent = model.forward_encoder(tokens, mask, drop_mask)
    features = model.decoder_features(latent, mask, drop_mask)[:, 1:][mask]   # [M, Ddec], M masked tokens
    logits = model.codebook_logits(features).float()                          # [M, K]
    target = tokens[mask]
    count = max(target.numel(), 1)
    loss = F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction="sum") / count
    with torch.no_grad():
        acc = (logits.argmax(-1) == target).sum() / count
    return loss, {"acc": acc.detach(), "mask_ratio": ratio.float().mean()}, latent[:, 1:].mean(1)


class ProjectionHead(nn.Module):
    """MAGE-C's MLP on pooled encoder features: [B, D] -> [B, out]. Linear-LayerNorm-GELU-Linear (LayerNorm,
    not SimCLR's BatchNorm, so that the head is the same function on any number of ranks)."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@METHODS.register("mage", model=MAGEConfig, options=MAGEObjective,
                  summary="MAGE: masked generative encoder on VQGAN tokens (variable masking, [C0]/[C] padding)")
class MAGEMethod(Method):
    legacy_keys = {"data.tokenizer": "mage.tokenizer", "data.token_cache": "mage.token_cache",
                   "loss.sample_iters": "vis.sampler.num_iter", "loss.choice_temperature": "vis.sampler.choice_temperature",
                   **{f"model.{k}": f"mage.{k}" for k in MAGE.legacy_config_keys}}

    def __init__(self, cfg):
        super().__init__()
        o = self.objective = cfg.objective
        if cfg.data.image_size != cfg.model.image_size:
            raise ConfigError(f"data.image_size {cfg.data.image_size} differs from model.image_size "
                              f"{cfg.model.image_size}: MAGE reads images of the size its token grid was built for")
        self.mage = MAGE(cfg.model)
        self.masking = MAGEMasking(o, cfg.model.token_grid ** 2)
        if not o.tokenizer:
            raise UserError("mage.tokenizer is required: a tokenizer folder from `maskgen train tokenizer` or "
                            "`maskgen convert vqgan`")
        self.mage.set_tokenizer(from_pretrained(o.tokenizer))
        self.head = None
        if o.contrastive_weight > 0:
            if cfg.data.views != 2:
                raise ConfigError("mage.contrastive_weight > 0 (MAGE-C) needs two views per image: set data.views=2")
            if self.masking.num_dropped >= self.masking.num_tokens:
                raise ConfigError("MAGE-C pools the kept encoder tokens, but mage.mask_ratio_min drops them all")
            self.head = ProjectionHead(cfg.model.embed_dim, o.contrastive_hidden_dim, o.contrastive_dim)
        elif cfg.data.views != 1:
            raise ConfigError("data.views=2 is for MAGE-C: set mage.contrastive_weight > 0 (or data.views=1)")

    def build_dataset(self, cfg):
        """Images (tokenized on the fly by forward_loss), or the token cache `mage.token_cache`, checked against
        the attached tokenizer and the data settings."""
        path, data = cfg.objective.token_cache, cfg.data
        if not path:
            return super().build_dataset(cfg)
        cache = TokenCache(path)
        cache.check(tokenizer=self.mage.tokenizer, image_size=data.image_size, crop_scale=data.crop_scale,
                    interpolation=data.interpolation)
        return (CachedTokens(cache, cfg.train.seed, data.views, data.hflip),
                f"token cache {path} ({len(cache)} images, {cache.views} views + flips)")

    def release_model(self) -> MAGE:
        return self.mage

    def _tokens(self, batch: dict, view: str = "") -> torch.Tensor:
        return batch[f"tokens{view}"] if "tokens" in batch else self.mage.encode_images(batch[f"image{view}"])

    def loss(self, tokens: torch.Tensor, generator: torch.Generator | None = None):
        """`mage_loss` with this method's masking and label smoothing -> (loss, logs, pooled)."""
        return mage_loss(self.mage, tokens, self.masking, self.objective.label_smoothing, generator)

    def forward_loss(self, batch: dict):
        """MAGE: the token loss. MAGE-C: the token loss of both views (one masking ratio for the 2B inputs)
        + λ · InfoNCE(head(pool(view 1)), head(pool(view 2)))."""
        if self.head is None:
            loss, logs, _ = self.loss(self._tokens(batch))
            return loss, logs
        tokens = torch.cat([self._tokens(batch), self._tokens(batch, "2")])
        rec, logs, pooled = self.loss(tokens)
        z1, z2 = self.head(pooled).chunk(2)
        con, con_acc = info_nce(z1, z2, self.objective.contrastive_temperature)
        logs.update(mlm_loss=rec.detach(), contrastive_loss=con.detach(), contrastive_acc=con_acc)
        return rec + self.objective.contrastive_weight * con, logs

    def hooks(self):
        return [sample_grid]


@torch.no_grad()
def sample_grid(method: MAGEMethod, ctx: HookContext) -> None:
    """samples/step_N.png: `vis.num_images` images generated from scratch by the model's sampler with the
    `vis.sampler` options (seeded by the step)."""
    if not ctx.num_images:
        return
    g = torch.Generator(ctx.device).manual_seed(ctx.step)
    samples = sampler_for(method.mage, **ctx.sampler_options).generate(method.mage, ctx.num_images, generator=g)
    ctx.save_grid(samples_to_images(method.mage, samples), "samples")
