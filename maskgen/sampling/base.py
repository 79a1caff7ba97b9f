"""The sampler contract: how a generative model turns noise (or a partly known sample) into samples.

A sampler is a class registered with `@SAMPLERS.register(name, options=OptionsClass)` (maskgen.registry). In
the spirit of diffusers' schedulers it has `set_timesteps(n)` / `timesteps` / `step(...)`, and on top of them
the whole loop: `generate(model, num_images)` from scratch and, where the sampler can, `edit(model, samples,
region)`. A model declares what it can do by duck typing; nothing here imports maskgen.models:

    default_sampler: str                         name of the registered sampler that generates with it (required)
    check_can_sample() -> None                   raise UserError when it cannot sample now (optional)
    decode_samples(samples) -> images [B,3,H,W]  model space -> images in [0, 1] (absent: samples are images)
    encode_samples(images) -> samples            images -> model space, for editing (optional)
    sample_region(pixel_mask, dilate) -> mask    pixel region [B,H,W] or [H,W] -> region in sample space (editing)

`sampler_for(model, **options)` builds a model's sampler; `samples_to_images(model, samples)` is the one
decode-or-pass-through. `add_sampler_arguments(parser)` adds one command-line flag per option of every
registered sampler, `sampler_options_from_args(args)` collects the flags that were set.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Sequence

import torch

from ..errors import ConfigError, UserError
from ..options import Options, flag_type, option, parse_value
from ..registry import SAMPLERS

Generators = torch.Generator | Sequence[torch.Generator] | None
FLAG_PREFIX = "sampler__"  # argparse dest of a sampler option flag: FLAG_PREFIX + field name


@dataclasses.dataclass
class NoOptions(Options):
    """The options of a sampler registered without an options class: none."""


class Sampler:
    """Base of registered samplers. `Sampler(options=None, **overrides)`: `options` an `options_class` instance
    (default: its defaults), with `overrides` (option name -> value; strings are parsed) applied on top; the
    options dataclass checks the bounds (ConfigError, one line). Subclasses implement `set_timesteps`,
    `timesteps`, `step` and `generate`, and `edit` when they can regenerate part of a sample."""

    sampler_name: str | None = None  # set by SAMPLERS.register
    options_class: type = NoOptions  # set by SAMPLERS.register(name, options=...)

    def __init__(self, options: Options | None = None, **overrides: Any):
        cls = self.options_class
        name = self.sampler_name or type(self).__name__
        if options is None:
            options = cls()
        elif not isinstance(options, cls):
            raise TypeError(f"{name} sampler: options must be a {cls.__name__}, got {type(options).__name__}")
        if overrides:
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(overrides) - fields)
            if unknown:
                raise UserError(f"the {name} sampler has no option {', '.join(unknown)} (its options: "
                                f"{', '.join(f.name for f in dataclasses.fields(cls)) or 'none'})")
            hints = typing.get_type_hints(cls)
            try:
                values = {k: parse_value(hints[k], v, k) for k, v in overrides.items()}
                options = dataclasses.replace(options, **values)
            except ConfigError as e:
                raise ConfigError(f"{name} sampler option {e}") from None
        self.options = options

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    # ------------------------------------------------------------------ the diffusers-style step contract
    def set_timesteps(self, num_steps: int) -> None:
        """Use `num_steps` steps from now on."""
        raise NotImplementedError

    @property
    def timesteps(self) -> list:
        """The steps of one sampling loop, in order; each is passed to `step`."""
        raise NotImplementedError

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, **kwargs):
        """One update: the model's output on `sample` at `timestep` -> an output dataclass (the next sample)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- the whole loop
    def generate(self, model, num_images: int, generator: Generators = None, start: int = 0) -> torch.Tensor:
        """`num_images` samples from scratch, in the model's sample space (e.g. codes [B, h, w]; turn them into
        images with `samples_to_images`). `generator`: a torch.Generator, one per image, or None (global RNG).
        `start`: the index of the first image in the whole set (a sampler that varies images by index, e.g. the
        classes of a class-balanced set, uses it; image i's content depends on i, never on the batching). A sampler
        whose `generate` has no `start` parameter is called without it."""
        raise NotImplementedError

    def edit(self, model, samples: torch.Tensor, region: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """`samples` with `region` (bool, in sample space, e.g. [B, h, w] or [h, w]; True = regenerate)
        regenerated and everything else kept."""
        raise UserError(f"the {self.sampler_name or type(self).__name__} sampler cannot edit images")


def row_generators(generator: Generators, batch: int) -> list[torch.Generator] | None:
    """`generator` as one generator per row of a batch of `batch` (None when it is one generator or None)."""
    if generator is None or isinstance(generator, torch.Generator):
        return None
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch}")
    return gens


def random_rows(draw, shape: tuple[int, ...], generator: Generators, device, **kwargs) -> torch.Tensor:
    """`draw(shape, generator=..., device=...)` (torch.rand / torch.randn) [B, ...]; with a list of generators row i
    comes from generator i alone, so a row does not depend on the rest of the batch."""
    gens = row_generators(generator, shape[0])
    if gens is None:
        return draw(shape, generator=generator, device=device, **kwargs)
    return torch.stack([draw(shape[1:], generator=g, device=device, **kwargs) for g in gens])


def _model_name(model) -> str:
    return getattr(model, "model_name", None) or type(model).__name__


def check_can_generate(model, source: str | None = None) -> None:
    """Raise UserError when the model declares no sampler, or when its own `check_can_sample()` (if it has one)
    says it cannot sample now; `source` (e.g. the checkpoint it came from) goes into the message."""
    if getattr(model, "default_sampler", None) is None:
        raise UserError(f"{source} holds a '{_model_name(model)}' model, which cannot generate images" if source else
                        f"a '{_model_name(model)}' model cannot generate images (it declares no default_sampler)")
    check = getattr(model, "check_can_sample", None)
    if check is not None:
        try:
            check()
        except UserError as e:
            if source is None:
                raise
            raise UserError(f"{source}: {e}") from None


def sampler_for(model, **options: Any) -> Sampler:
    """The sampler `model.default_sampler` names, with `options` over its defaults (`check_can_generate` first)."""
    check_can_generate(model)
    return SAMPLERS.get(model.default_sampler)(**options)


@torch.no_grad()
def samples_to_images(model, samples: torch.Tensor) -> torch.Tensor:
    """Samples in `model`'s space -> float images [B, 3, H, W] in [0, 1] on the CPU: `model.decode_samples`
    where the model has it, else the samples are images already."""
    decode = getattr(model, "decode_samples", None)
    images = decode(samples) if decode is not None else samples
    if not images.is_floating_point() or images.dim() != 4:
        raise ValueError(f"the '{_model_name(model)}' model's samples are not images (it has no decode_samples): "
                         f"got {images.dtype} {list(images.shape)}")
    return images.float().cpu()


# ------------------------------------------------------------------------------------- command line
def precision_option():
    """The `precision` option every sampler has (one flag, `--precision`): the arithmetic of its model calls."""
    return option("fp32", "arithmetic of the model calls: fp32, bf16 autocast, or auto (bf16 where its matmuls are "
                          "faster: CUDA with bf16, a CPU with native bf16; 1.7-3x faster generation on a Xeon with AMX, "
                          "BENCHMARKS.md). fp32 by default, so that a seed gives the same images on every machine",
                  choices=("auto", "fp32", "bf16"))


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option of every registered sampler (`num_iter` -> `--num-iter`, or the option's own `flag`), in
    one argument group per sampler, typed by the field, default None (unset: the sampler's own default). A flag the
    parser already has, or that an earlier sampler added, is not added again."""
    taken = set(parser._option_string_actions)  # noqa: SLF001 (argparse has no public accessor)
    for name in SAMPLERS.names():
        cls = SAMPLERS.get(name).options_class
        hints = typing.get_type_hints(cls)
        group = None
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            bounds = {k: v for k, v in f.metadata.items() if k in ("choices", "min", "max", "gt", "lt")}
            if flag in taken:
                continue
            taken.add(flag)
            if group is None:
                group = parser.add_argument_group(f"{name} sampler options")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            group.add_argument(flag, dest=FLAG_PREFIX + f.name, default=None, metavar=f.name.upper(),
                               type=flag_type(hints[f.name], flag, **bounds),
                               help=f.metadata.get("help", "") + ("" if default is None else f" (default: {default})"))


def sampler_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler options set on the command line (flags added by `add_sampler_arguments`), for `sampler_for`."""
    return {k[len(FLAG_PREFIX):]: v for k, v in vars(args).items() if k.startswith(FLAG_PREFIX) and v is not None}
