"""The sampler contract (maskgen.sampling.base): registration, options, the model protocol, command-line flags."""
import argparse
import math
from dataclasses import dataclass

import pytest
import torch

from maskgen.errors import ConfigError, UserError
from maskgen.generation import generated_batches
from maskgen.options import Options, option
from maskgen.registry import SAMPLERS
from maskgen.sampling import (MaskGITOptions, MaskGITScheduler, Sampler, add_sampler_arguments, generate,
                              inpaint_tokens, sampler_for, sampler_options_from_args, samples_to_images, token_region)

from test_maskgit import gen, tiny_mage


@dataclass
class GreyOptions(Options):
    level: float = option(0.5, "mean grey level", min=0.0, max=1.0)
    noise: float = option(0.1, "noise scale", min=0.0)


class GreySampler(Sampler):
    """Images [B, 3, 4, 4]: `level` plus uniform noise, each image from its own generator."""

    def set_timesteps(self, num_steps):
        pass

    @property
    def timesteps(self):
        return [0]

    def step(self, model_output, timestep, sample, **kw):
        return sample

    def generate(self, model, num_images, generator=None):
        gens = generator if isinstance(generator, list) else [generator] * num_images
        return torch.stack([self.options.level + self.options.noise * torch.rand(3, 4, 4, generator=g)
                            for g in gens])


class FakeModel:
    """Declares a sampler and nothing else: its samples are images."""

    model_name = "fake"
    default_sampler = "grey-test"


@pytest.fixture
def grey():
    cls = SAMPLERS.register("grey-test", options=GreyOptions)(GreySampler)
    yield cls
    SAMPLERS._entries.pop("grey-test", None)  # keep the registry as the other tests expect it


def test_a_new_sampler_generates_through_generated_batches(grey):
    assert grey.sampler_name == "grey-test" and grey.options_class is GreyOptions
    model = FakeModel()
    a = torch.cat(list(generated_batches(model, 5, 2, seed=3)))
    b = torch.cat(list(generated_batches(model, 5, 5, seed=3)))
    assert a.shape == (5, 3, 4, 4) and a.dtype == torch.float32 and torch.equal(a, b)  # batch-size independent
    assert 0.5 <= float(a.min()) and float(a.max()) <= 0.6
    dark = torch.cat(list(generated_batches(model, 2, 2, seed=3, level=0.0, noise="0.2")))  # strings are parsed
    assert float(dark.max()) <= 0.2 and not torch.equal(dark, a[:2])
    with pytest.raises(UserError, match="grey-test sampler has no option num_iter .*level, noise"):
        generated_batches(model, 2, 2, num_iter=3)  # checked at the call, not at the first batch
    with pytest.raises(UserError, match="cannot edit"):
        sampler_for(model).edit(model, a, torch.ones(4, 4, dtype=torch.bool))


@pytest.mark.parametrize("overrides, message", [
    ({"num_iter": 0}, "num_iter: 0 is below the minimum 1"),
    ({"num_iter": 2.5}, "num_iter: expected int"),
    ({"temperature": math.nan}, "temperature: nan is not a valid value"),
    ({"temperature": math.inf}, "temperature: inf is not a valid value"),
    ({"temperature": -1}, "temperature: -1.0 is below the minimum 0"),
    ({"choice_temperature": "-0.5"}, "choice_temperature: -0.5 is below the minimum 0"),
    ({"steps": 50}, "no option steps .*num_iter, choice_temperature, temperature"),
])
def test_bad_options_are_one_line_user_errors(overrides, message):
    with pytest.raises(UserError, match=message) as e:
        MaskGITScheduler(**overrides)
    assert "\n" not in str(e.value)
    model = FakeModel()
    model.default_sampler = "maskgit"
    with pytest.raises(UserError, match=message):
        sampler_for(model, **overrides)


def test_maskgit_options_and_timesteps():
    s = MaskGITScheduler()
    assert (s.num_iter, s.choice_temperature, s.temperature) == (12, 4.5, 1.0) and s.sampler_name == "maskgit"
    assert SAMPLERS.get("maskgit") is MaskGITScheduler and MaskGITScheduler.options_class is MaskGITOptions
    s = MaskGITScheduler(MaskGITOptions(num_iter=3), temperature=0)
    assert (s.num_iter, s.temperature) == (3, 0.0) and isinstance(s.temperature, float)
    s.set_timesteps(5)
    assert s.timesteps == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match="num_iter"):
        s.set_timesteps(0)
    with pytest.raises(TypeError, match="MaskGITOptions"):
        MaskGITScheduler(GreyOptions())


def test_mage_declares_the_protocol():
    m = tiny_mage(grid=4)  # image 32 px, 8 px tokens, no tokenizer attached
    with pytest.raises(UserError, match="no tokenizer/ folder"):
        sampler_for(m)
    with pytest.raises(UserError, match="'vqgan' model cannot generate images"):
        sampler_for(type("VQ", (), {"model_name": "vqgan"})())
    pixel = torch.zeros(32, 32, dtype=torch.bool)
    pixel[9:14, 20:30] = True
    assert torch.equal(m.sample_region(pixel, 1), token_region(pixel, 8, 1))
    m.check_can_sample = lambda: None  # as if a tokenizer were attached
    s = sampler_for(m, num_iter=3, choice_temperature=2.0)
    assert isinstance(s, MaskGITScheduler) and s.num_iter == 3
    codes = s.generate(m, 2, generator=[gen(1), gen(2)])
    assert torch.equal(codes, generate(m, 2, 3, 2.0, 1.0, generator=[gen(1), gen(2)]))
    region = token_region(pixel, 8, 0)
    edited = s.edit(m, codes, region, generator=gen(4))
    assert torch.equal(edited, inpaint_tokens(m, codes, region, 3, 2.0, 1.0, generator=gen(4)))
    assert torch.equal(edited[:, ~region], codes[:, ~region])


def test_samples_to_images_decodes_or_passes_through():
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    out = samples_to_images(FakeModel(), images)
    assert out.dtype == torch.float32 and torch.equal(out, images.float())
    decoder = type("D", (), {"decode_samples": lambda self, s: s.float()[:, None].expand(-1, 3, -1, -1) / 10})()
    assert samples_to_images(decoder, torch.ones(2, 4, 4, dtype=torch.long)).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="not images"):
        samples_to_images(FakeModel(), torch.zeros(2, 4, 4, dtype=torch.long))


def test_flags_from_sampler_options(grey):
    p = argparse.ArgumentParser()
    p.add_argument("--noise", type=int)  # a flag the command already has is not added twice
    add_sampler_arguments(p)
    help_text = p.format_help()
    assert "maskgit sampler options" in help_text and "grey-test sampler options" in help_text
    assert "decoding iterations (official: 12; README: 20) (default: 12)" in " ".join(help_text.split())
    args = p.parse_args(["--num-iter", "3", "--temperature", "0.5", "--level", "0.2"])
    assert sampler_options_from_args(args) == {"num_iter": 3, "temperature": 0.5, "level": 0.2}
    assert sampler_options_from_args(p.parse_args([])) == {}  # unset flags: the sampler's defaults
    with pytest.raises(SystemExit):
        p.parse_args(["--num-iter", "2.5"])
