"""A test-only method added as new files only: a model, a method, a sampler, registered from outside the package.

`MASKGEN_PLUGINS=toy_method` (with this folder on PYTHONPATH) makes `maskgen train toy`, `maskgen generate`
and `maskgen.from_pretrained` see it; tests/test_plugin_method.py drives it through the normal command line.
A denoising auto-encoder on [B, 3, S, S] images: the sampler starts from seeded uniform noise and applies the
model `steps` times.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from maskgen.engine.method import HookContext, Method
from maskgen.options import Options, option
from maskgen.registry import METHODS, MODELS, SAMPLERS
from maskgen.sampling import Sampler, samples_to_images, sampler_for


@dataclass
class ToyConfig(Options):
    image_size: int = option(16, "image side", min=4)
    hidden: int = option(32, "hidden width", min=1)


@MODELS.register("toy-autoencoder", config=ToyConfig)
class ToyAutoencoder(nn.Module):
    default_sampler = "toy-denoise"

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        d = 3 * config.image_size ** 2
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, config.hidden), nn.ReLU())
        self.decoder = nn.Linear(config.hidden, d)

    def forward_features(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """images [B, 3, S, S] -> [B, hidden]."""
        return self.encoder(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> denoised images [B, 3, S, S] in (0, 1)."""
        return self.decoder(self.encoder(images)).view_as(images).sigmoid()


@dataclass
class ToyObjective(Options):
    noise: float = option(0.1, "std of the Gaussian noise added to the inputs", min=0.0)


@METHODS.register("toy", model=ToyConfig, options=ToyObjective, summary="test-only denoising auto-encoder")
class ToyMethod(Method):
    def __init__(self, cfg):
        super().__init__()
        self.model, self.noise = ToyAutoencoder(cfg.model), cfg.objective.noise

    def release_model(self) -> ToyAutoencoder:
        return self.model

    def forward_loss(self, batch: dict):
        x = batch["image"]
        loss = F.mse_loss(self.model(x + self.noise * torch.randn_like(x)), x)
        return loss, {"noise": self.noise}

    def hooks(self):
        return [toy_grid]


def toy_grid(method: ToyMethod, ctx: HookContext) -> None:
    samples = sampler_for(method.model, **ctx.sampler_options).generate(method.model, ctx.num_images)
    ctx.save_grid(samples_to_images(method.model, samples), "samples")


@dataclass
class ToySamplerOptions(Options):
    steps: int = option(2, "denoising passes of the toy sampler", min=1)


@SAMPLERS.register("toy-denoise", options=ToySamplerOptions)
class ToySampler(Sampler):
    def set_timesteps(self, num_steps: int) -> None:
        self.options.steps = num_steps

    @property
    def timesteps(self) -> list[int]:
        return list(range(self.options.steps))

    def step(self, model_output, timestep, sample, **kw):
        return model_output

    @torch.no_grad()
    def generate(self, model, num_images: int, generator=None) -> torch.Tensor:
        s = model.config.image_size
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * num_images
        x = torch.stack([torch.rand(3, s, s, generator=g) for g in gens])
        for t in self.timesteps:
            x = self.step(model(x), t, x)
        return x
