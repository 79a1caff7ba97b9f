"""DDIM sampling for UMD (the reference's `gaussian_diffusion.ddim_sample_loop` and `train_ae.create_sample_fn`).

Grid of S steps on T = 1000: t = arange(T-1, 0, -(T // S)) followed by 0 (S + 1 model calls; 125 steps: 999,
991, ..., 7, 0). At each t the network gets time t + 1 and returns [x0 | ε] (2C channels):
  1. x0 = x0_from_eps(x_t, t, ε) (or the x0 head with `pred=x0`), clipped to [-1, 1] in pixel space;
  2. ε = eps_from_x0(x_t, t, x0), recomputed from the clipped x0;
  3. σ = η sqrt((1 - ᾱ') / (1 - ᾱ)) sqrt(1 - ᾱ / ᾱ'), ᾱ' = ᾱ of the next grid step;
     x' = sqrt(ᾱ') x0 + sqrt(1 - ᾱ' - σ²) ε + σ z;
and the call at t = 0 returns x0. Classifier-free guidance acts on the whole 2C output:
out = out(null class) + s (out(class) - out(null class)).

Why not diffusers' DDIMScheduler: none of its timestep spacings gives this grid ("trailing" gives 999 ... 7 and
then steps to ᾱ_0 without the final t = 0 call; "leading" gives 992 ... 0), and diffusers is not a dependency.
This scheduler keeps its shape (`set_timesteps` / `timesteps` / `step`). Checked against diffusers 0.42.1
(tests/sampling/test_ddim.py, run where diffusers is installed): with `squaredcos_cap_v2` betas, trailing spacing,
`clip_sample=True` and `use_clipped_model_output=True` its step equals ours at every grid step but the last.

The model declares (duck typing, `maskgen.sampling.base`): `schedule` (a `DiffusionSchedule`), `sample_shape`
(C, h, w), `clip_denoised`, `config.num_classes` (0: unconditional), `null_class`, and
`model(x_t, time, y) -> (out [B, 2C, h, w], mask)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..diffusion_schedule import DiffusionSchedule, network_time
from ..errors import UserError
from ..options import Options, option
from ..precision import autocast, resolve_precision
from ..registry import SAMPLERS
from .base import Generators, Sampler, precision_option, random_rows


@dataclass
class DDIMOptions(Options):
    """Options of the `ddim` sampler (defaults: the reference's)."""

    steps: int = option(125, "sampling steps S on the grid arange(T-1, 0, -(T // S)) + [0] (reference 125; "
                             "62 and 250 also evaluated)", min=1)
    eta: float = option(1.0, "DDIM η: 1 = stochastic, DDPM-like (reference); 0 = deterministic DDIM", min=0.0)
    cfg: float | None = option(None, "classifier-free guidance scale s on the whole output (1: none); default 1.5 "
                                     "(the reference's eval setting) for a class-conditional model, 1 otherwise",
                               min=0.0)
    class_label: str | None = option(None, "class of the samples: C, a list C1,C2,... (image i takes item i mod n) "
                                           "or 'all' (image i: class i mod num_classes, a balanced set); default "
                                           "'all' for a class-conditional model", flag="--class")
    pred: str = option("eps", "the head that drives sampling: eps (reference) or x0 (the x0 head, turned into ε)",
                       choices=("eps", "x0"))
    precision: str = precision_option()


@dataclass
class DDIMStepOutput:
    """prev_sample: x at the next grid step [B, C, h, w] (x0 after the last); pred_original_sample: x0 [B, C, h, w]."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def ddim_grid(num_timesteps: int, steps: int) -> list[int]:
    """The reference's grid: arange(T-1, 0, -(T // S)) + [0]."""
    if not 1 <= steps <= num_timesteps:
        raise UserError(f"--steps must be between 1 and the model's {num_timesteps} diffusion steps, got {steps}")
    return list(range(num_timesteps - 1, 0, -(num_timesteps // steps))) + [0]


@SAMPLERS.register("ddim", options=DDIMOptions)
class DDIMScheduler(Sampler):
    """The `ddim` sampler. `set_schedule(schedule, clip)` then `set_timesteps(S)` prepare `step`; `generate` does
    both from the model."""

    schedule: DiffusionSchedule | None = None
    clip = True

    def set_schedule(self, schedule: DiffusionSchedule, clip: bool = True) -> None:
        self.schedule, self.clip = schedule, clip
        self.set_timesteps(self.options.steps)

    def set_timesteps(self, num_steps: int) -> None:
        if self.schedule is None:
            raise RuntimeError("call set_schedule(schedule) before set_timesteps")
        self._timesteps = ddim_grid(self.schedule.num_timesteps, num_steps)
        self._next = dict(zip(self._timesteps, self._timesteps[1:]))

    @property
    def timesteps(self) -> list[int]:
        return self._timesteps

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: Generators = None) -> DDIMStepOutput:
        """model_output [B, 2C, h, w] ([x0 | ε]) at grid step `timestep` on sample x_t [B, C, h, w] -> the sample at
        the next grid step (σ z drawn per row from `generator`), or x0 at t = 0."""
        s, c = self.schedule, sample.shape[1]
        if self.options.pred == "x0":
            x0 = model_output[:, :c]
        else:
            x0 = s.x0_from_eps(sample, timestep, model_output[:, c:])
        if self.clip:
            x0 = x0.clamp(-1, 1)
        if timestep == self._timesteps[-1]:
            return DDIMStepOutput(x0, x0)
        eps = s.eps_from_x0(sample, timestep, x0)
        a, a_prev = (float(s.alphas_cumprod[i]) for i in (timestep, self._next[timestep]))
        sigma = self.options.eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        mean = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
        if sigma == 0:
            return DDIMStepOutput(mean, x0)
        z = random_rows(torch.randn, tuple(sample.shape), generator, sample.device, dtype=sample.dtype)
        return DDIMStepOutput(mean + sigma * z, x0)

    # ----------------------------------------------------------------------------- classes, guidance
    def labels(self, model, num_images: int, start: int = 0) -> torch.Tensor | None:
        """The class of images start .. start+num_images-1 as LongTensor [B] (None for an unconditional model)."""
        n = model.config.num_classes
        spec = self.options.class_label
        if not n:
            if spec is not None:
                raise UserError("this model is unconditional (it was not fine-tuned with labels): drop --class")
            return None
        if spec is None or spec.strip().lower() == "all":
            classes = list(range(n))
        else:
            try:
                classes = [int(v) for v in spec.split(",") if v.strip()]
            except ValueError:
                raise UserError(f"--class must be a class number, a list C1,C2,... or 'all', got {spec!r}") from None
            bad = [v for v in classes if not 0 <= v < n]
            if not classes or bad:
                raise UserError(f"--class {spec}: classes must lie in 0..{n - 1} (the model has {n})")
        return torch.tensor([classes[(start + i) % len(classes)] for i in range(num_images)], dtype=torch.long)

    def guidance(self, model) -> float:
        scale = self.options.cfg
        if not model.config.num_classes:
            if scale not in (None, 1.0):
                raise UserError("classifier-free guidance (--cfg) needs a class-conditional model")
            return 1.0
        return 1.5 if scale is None else scale

    @staticmethod
    def model_output(model, x: torch.Tensor, t: int, labels: torch.Tensor | None, scale: float) -> torch.Tensor:
        """The network's [x0 | ε] at grid step t [B, 2C, h, w], guided with `scale` (labels [B] or None)."""
        time = network_time(torch.full((len(x),), t, dtype=torch.long, device=x.device))
        if labels is None or scale == 1.0:
            return model(x, time, labels)[0]
        null = torch.full_like(labels, model.null_class)
        cond, uncond = model(torch.cat([x, x]), torch.cat([time, time]), torch.cat([labels, null]))[0].chunk(2)
        return uncond + scale * (cond - uncond)

    @torch.no_grad()
    def generate(self, model, num_images: int, generator: Generators = None, start: int = 0) -> torch.Tensor:
        """`num_images` samples [B, C, h, w] in model space from pure noise (row i from generator i)."""
        device = next(model.parameters()).device
        self.set_schedule(model.schedule, model.clip_denoised)
        labels = self.labels(model, num_images, start)
        labels = labels.to(device) if labels is not None else None
        scale = self.guidance(model)
        x = random_rows(torch.randn, (num_images, *model.sample_shape), generator, device)
        precision = resolve_precision(self.options.precision, device, "precision")
        for t in self.timesteps:
            with autocast(precision, device):
                out = self.model_output(model, x, t, labels, scale)
            x = self.step(out.float(), t, x, generator).prev_sample
        return x
