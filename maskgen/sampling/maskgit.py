"""MaskGIT-style iterative decoding for MAGE: generation from scratch and token-space editing.

A port of the official `gen_img_uncond.py` (LTH14/mage; itself MaskGIT's `parallel_decode`).
The canvas starts with every unknown token masked ([C0] is prepended by the model). At step s of T:
  1. codebook logits from the model (encoder on all 1+L tokens, nothing dropped);
  2. sample every position (temperature 1 = official) and keep the known tokens;
  3. ratio = (s+1)/T, mask_ratio = cos(pi/2 * ratio), n = floor(U0 * mask_ratio) clamped to
     [1, #unknown - 1], U0 = the number of unknown tokens at the start (L for generation);
  4. confidence = log p(sampled) + choice_temperature * (1 - ratio) * Gumbel noise, +inf for known tokens;
  5. the n lowest-confidence tokens are masked again for the next step.
After the last step the final sampled ids are returned (every position filled).

Differences from the official script, all documented choices:
- Randomness comes from explicit `torch.Generator`s (the official code mixed torch and numpy global RNGs).
  `generator` may also be a list with one generator per image: each row then draws only from its own
  generator, so a batch gives exactly the images that one-by-one calls with the same generators give
  (up to float rounding of batched matmuls).
- The number to re-mask is computed per row. In generation from scratch every row has the same counts at
  every step, so this equals the official single value for the batch; for editing, U0 is each row's own
  number of tokens to regenerate.
- Re-masking picks exactly n tokens by rank (stable sort), where the official `conf <= cutoff` could pick
  more on exact ties.
- Tokens are drawn by inverting the CDF (one uniform per position, `categorical`) instead of
  `torch.multinomial`: the same distribution, ~1,000x fewer random numbers for K = 1,024 codes; a seed gives
  other images than maskgen's sampler before issue 18 did.
- The confidence uses the model's untempered probabilities; `temperature` only reshapes the sampling
  distribution (1.0 = official; 0 = argmax).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..options import Options, option
from ..precision import autocast, resolve_precision
from ..registry import SAMPLERS
from .base import Generators, Sampler, precision_option, random_rows

UNKNOWN = -1  # canvas value of a token to generate


@dataclass
class MaskGITOptions(Options):
    """Options of the `maskgit` sampler (defaults: the official `gen_img_uncond.py`)."""

    num_iter: int = option(12, "decoding iterations (official: 12; README: 20)", min=1)
    choice_temperature: float = option(4.5, "Gumbel noise scale on the confidence, annealed to 0 (official: 4.5; "
                                            "README FID: 6.0)", min=0.0)
    temperature: float = option(1.0, "sampling temperature of the tokens (0: argmax)", min=0.0)
    precision: str = precision_option()


@dataclass
class MaskGITStepOutput:
    """sampled: LongTensor [B, L], every position filled (known tokens unchanged);
    unknown: BoolTensor [B, L], the positions masked again for the next step."""

    sampled: torch.Tensor
    unknown: torch.Tensor


def categorical(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """probs [B, L, K] (rows summing to ~1) -> one draw per position [B, L] by inverting the CDF: one uniform u
    per position (row i from generator i when `generator` is a list), the first id whose cumulative probability
    exceeds u x the row's total. The same distribution as `torch.multinomial(probs, 1)`, which on a CPU draws K
    exponentials per position (35 % of a generation step; BENCHMARKS.md "MAGE speed"); ids of probability 0
    are never drawn."""
    cdf = probs.float().cumsum(-1)                                                     # [B, L, K]
    u = random_rows(torch.rand, probs.shape[:2], generator, probs.device)              # [B, L]
    # u < 1 gives u x total < total in round-to-nearest, so the first cumulative value above it belongs to an id
    # of probability > 0; the clamp only guards against NaN rows
    ids = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None], right=True).squeeze(-1)
    return ids.clamp_max(probs.shape[-1] - 1)


@SAMPLERS.register("maskgit", options=MaskGITOptions)
class MaskGITScheduler(Sampler):
    """The `maskgit` sampler: decoding schedule and per-step update (in the spirit of diffusers'
    AmusedScheduler), and the whole loop for generation (`generate`) and token-space editing (`edit`).

    Built as `MaskGITScheduler(num_iter=12, choice_temperature=4.5, temperature=1.0)` (any subset, keywords) or
    `MaskGITScheduler(MaskGITOptions(...))`. `timesteps` lists the steps 0..num_iter-1;
    `step(logits, s, tokens, unknown, initial_unknown, generator)` turns one step's model output into the next
    canvas."""

    options: MaskGITOptions

    @property
    def num_iter(self) -> int:
        return self.options.num_iter

    @property
    def choice_temperature(self) -> float:
        return self.options.choice_temperature

    @property
    def temperature(self) -> float:
        return self.options.temperature

    def set_timesteps(self, num_steps: int) -> None:
        """Decode in `num_steps` iterations (num_iter)."""
        self.options = dataclasses.replace(self.options, num_iter=num_steps)

    @property
    def timesteps(self) -> list[int]:
        return list(range(self.num_iter))

    def mask_ratio(self, step: int) -> float:
        """Fraction of the initially unknown tokens still masked after `step`: cos(pi/2 * (step+1)/T)."""
        return math.cos(math.pi / 2.0 * (step + 1) / self.num_iter)

    def num_to_mask(self, step: int, initial_unknown: torch.Tensor, unknown_now: torch.Tensor) -> torch.Tensor:
        """[B] long: floor(U0 * mask_ratio) clamped to [1, #unknown - 1] (official), and never more than
        #unknown (so known tokens are never masked; 0 when nothing is unknown)."""
        n = torch.floor(initial_unknown.double() * self.mask_ratio(step)).long()
        n = torch.maximum(torch.ones_like(n), torch.minimum(unknown_now - 1, n))
        return torch.minimum(n, unknown_now)

    def sample(self, logits: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """logits [B, L, K] -> ids [B, L]: categorical at `temperature` (argmax when 0)."""
        if self.temperature == 0:
            return logits.argmax(-1)
        return categorical(torch.softmax(logits.float() / self.temperature, dim=-1), generator)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, unknown: torch.Tensor,
             initial_unknown: torch.Tensor | None = None, generator: Generators = None) -> MaskGITStepOutput:
        """One decoding step.

        model_output: logits [B, L, K] (codebook logits of the current canvas); timestep: the step s;
        sample: tokens [B, L] long (values at unknown positions are ignored); unknown [B, L] bool;
        initial_unknown [B] long (default: L). Draws the samples, then the Gumbel noise, from `generator`
        (a Generator, one per row, or torch's global RNG)."""
        logits, step, tokens = model_output, timestep, sample
        b, n, _ = logits.shape
        if initial_unknown is None:
            initial_unknown = torch.full((b,), n, dtype=torch.long, device=logits.device)
        sampled = torch.where(unknown, self.sample(logits, generator), tokens)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, sampled.clamp_min(0)[..., None]).squeeze(-1)
        u = random_rows(torch.rand, (b, n), generator, logits.device).clamp_min(torch.finfo(torch.float32).tiny)
        gumbel = -torch.log(-torch.log(u))
        ratio = (step + 1) / self.num_iter
        confidence = logp + self.choice_temperature * (1.0 - ratio) * gumbel
        confidence = confidence.masked_fill(~unknown, math.inf)
        count = self.num_to_mask(step, initial_unknown.to(logits.device), unknown.sum(1))
        order = confidence.argsort(dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=logits.device).expand(b, n))
        return MaskGITStepOutput(sampled=sampled, unknown=rank < count[:, None])

    @torch.no_grad()
    def decode(self, model, num_images_or_canvas: int | torch.Tensor, generator: Generators = None, *,
               callback: Callable[[int, MaskGITStepOutput], None] | None = None) -> torch.Tensor:
        """The decoding loop with a MAGE model -> codes LongTensor [B, h, w].

        `num_images_or_canvas`: a number of images (every token generated), or a canvas LongTensor [B, h, w]
        (or [B, L]) of codes in which `UNKNOWN` (-1) marks the tokens to generate; the others are kept as they
        are. `generator`: a torch.Generator on the model's device, a list of one per image, or None (torch's
        global RNG). `callback(step, output)` sees every step's `MaskGITStepOutput`. The model runs in eval mode
        (its mode is restored afterwards). Decode the codes to images with `model.decode_samples(codes)`."""
        cfg = model.config
        device = _model_device(model)
        g, length = cfg.token_grid, cfg.num_tokens
        if isinstance(num_images_or_canvas, int):
            tokens = torch.full((num_images_or_canvas, length), UNKNOWN, dtype=torch.long, device=device)
        else:
            canvas = num_images_or_canvas
            if canvas.is_floating_point() or canvas.dim() not in (2, 3) or canvas[0].numel() != length:
                raise ValueError(f"canvas must be integer codes [B, {g}, {g}] or [B, {length}], got "
                                 f"{canvas.dtype} {list(canvas.shape)}")
            tokens = canvas.reshape(canvas.shape[0], length).long().to(device)
            bad = (tokens != UNKNOWN) & ((tokens < 0) | (tokens >= cfg.codebook_size))
            if bool(bad.any()):
                raise ValueError(f"canvas codes must lie in [0, {cfg.codebook_size}) or be UNKNOWN ({UNKNOWN})")
        b = tokens.shape[0]
        unknown = tokens == UNKNOWN
        initial_unknown = unknown.sum(1)
        was_training = model.training
        model.eval()
        precision = resolve_precision(self.options.precision, device, "precision")
        try:
            sampled = tokens
            if bool(initial_unknown.any()):
                for step in self.timesteps:
                    with autocast(precision, device):
                        logits = model.token_logits(tokens, unknown)
                    out = self.step(logits, step, tokens, unknown, initial_unknown, generator)
                    if callback is not None:
                        callback(step, out)
                    sampled, unknown = out.sampled, out.unknown
                    tokens = sampled.masked_fill(unknown, UNKNOWN)
        finally:
            model.train(was_training)
        return sampled.view(b, g, g)

    def generate(self, model, num_images: int, generator: Generators = None, start: int = 0) -> torch.Tensor:
        """`num_images` codes [B, h, w] generated from scratch (`start` plays no part)."""
        return self.decode(model, num_images, generator)

    def edit(self, model, samples: torch.Tensor, region: torch.Tensor, generator: Generators = None, *,
             callback: Callable[[int, MaskGITStepOutput], None] | None = None) -> torch.Tensor:
        """codes [B, h, w] with the tokens of `region` ([B, h, w] or [h, w] bool) regenerated; the others never
        change. Inpainting: the region is a hole; outpainting / uncropping: everything outside the kept part."""
        region = region.to(device=samples.device, dtype=torch.bool).expand_as(samples)
        return self.decode(model, samples.long().masked_fill(region, UNKNOWN), generator, callback=callback)


def _model_device(model) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def generate(model, num_images_or_canvas: int | torch.Tensor, num_iter: int = 12, choice_temperature: float = 4.5,
             temperature: float = 1.0, generator: Generators = None, *,
             callback: Callable[[int, MaskGITStepOutput], None] | None = None) -> torch.Tensor:
    """`MaskGITScheduler.decode` with these options -> codes LongTensor [B, h, w]."""
    sampler = MaskGITScheduler(num_iter=num_iter, choice_temperature=choice_temperature, temperature=temperature)
    return sampler.decode(model, num_images_or_canvas, generator, callback=callback)


def inpaint_tokens(model, codes: torch.Tensor, region_mask: torch.Tensor, num_iter: int = 12,
                   choice_temperature: float = 4.5, temperature: float = 1.0, generator: Generators = None, *,
                   callback: Callable[[int, MaskGITStepOutput], None] | None = None) -> torch.Tensor:
    """`MaskGITScheduler.edit` with these options: the tokens of `codes` [B, h, w] where `region_mask` [B, h, w]
    (or [h, w]) is True regenerated. See `token_region` to go from a pixel mask to tokens."""
    sampler = MaskGITScheduler(num_iter=num_iter, choice_temperature=choice_temperature, temperature=temperature)
    return sampler.edit(model, codes, region_mask, generator, callback=callback)


def token_region(pixel_mask: torch.Tensor, factor: int, dilate: int = 0) -> torch.Tensor:
    """Pixel mask [B, H, W] or [H, W] (True = to regenerate) -> token mask [B, H/f, W/f] (or [h, w]): a token is
    selected when any of its f x f pixels is, then the selection grows by `dilate` tokens (the maintainer's
    inpainting example masked one token beyond the hole, LTH14/mage issue #3)."""
    squeeze = pixel_mask.dim() == 2
    m = pixel_mask.bool()
    m = m[None] if squeeze else m
    if m.shape[-1] % factor or m.shape[-2] % factor:
        raise ValueError(f"mask size {list(m.shape[-2:])} is not a multiple of the token size {factor}")
    t = F.max_pool2d(m[:, None].float(), factor, factor)
    if dilate > 0:
        t = F.max_pool2d(t, 2 * dilate + 1, 1, padding=dilate)
    t = t[:, 0] > 0
    return t[0] if squeeze else t

