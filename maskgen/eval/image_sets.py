"""The two image sets of `maskgen eval fid`: folders, shards, named datasets, or a checkpoint whose model generates.

Every set yields uint8 batches [B, 3, H, W] (one H, W per set). Images of a named dataset ('cifar10-test',
'mnist5k-train', ...) are decoded once from their source files to RGB pixels and passed on in memory, never
re-encoded (in particular never re-JPEG'd: a lossy copy of the reference shifts FID, MAGE issue #8).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from ..data.decode import BadImage, decode_image
from ..data.loader import subset
from ..data.sources import NAMED_SETS, SPLITS, folder_splits, open_source
from ..errors import UserError
from ..generation import generated_batches, load_generator_model
from ..sampling import sampler_for

log = logging.getLogger("maskgen")


def parse_named(spec: str) -> tuple[str, str] | None:
    """'cifar10-test' -> ('cifar10', 'test'); 'cifar10' -> ('cifar10', 'train'); anything else -> None."""
    name, _, split = spec.partition("-")
    if name in NAMED_SETS and (split in SPLITS or not split) and not Path(spec).exists():
        return name, split or "train"
    return None


def _fit(img: Image.Image, size: int | None, target: tuple[int, int] | None) -> Image.Image:
    """Resize the shorter side to `size` + centre crop (when size is given), else resize to `target` (w, h)."""
    if size:
        img = TF.center_crop(TF.resize(img, size, TF.InterpolationMode.BICUBIC), [size, size])
    elif target is not None and img.size != target:
        img = img.resize(target, Image.BICUBIC)
    return img


class SourceImages:
    """Images of a `maskgen.data.sources` source (folder, shards, named dataset), labels ignored. `skipped`: how
    many unreadable images the last `batches()` pass left out."""

    def __init__(self, spec: str, image_size: int | None = None, limit: int = 0):
        named = parse_named(spec)
        if named is None and not Path(spec).exists() and ".tar" not in spec and "{" not in spec:
            raise UserError(f"image set not found: {spec} (a folder, shards, {', '.join(NAMED_SETS)}[-train|-test], or "
                            f"a checkpoint of a model that generates)")
        if named is None and (splits := folder_splits(spec)):
            example = Path(spec) / ("test" if "test" in splits else splits[0])
            raise UserError(f"{spec} holds splits ({', '.join(splits)}): name the one to compare, e.g. {example}")
        self.source = open_source(*named) if named else open_source(spec)
        self.indices = subset(len(self.source), limit)
        self.name, self.image_size, self.limit = spec, image_size, limit
        self.cache_id = f"{named[0]}-{named[1]}" if named else None
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        target, batch, resized = None, [], 0
        self.skipped = 0
        for i in self.indices:
            s = self.source[i]
            try:
                img = s.data if not isinstance(s.data, bytes) else decode_image(s.data)
            except BadImage as e:
                self.skipped += 1
                log.warning("skipped unreadable image %s (%s)", s.name, e)
                continue
            target = target or (None if self.image_size else img.size)
            resized += int(not self.image_size and img.size != target)
            batch.append(torch.from_numpy(np.asarray(_fit(img.convert("RGB"), self.image_size, target)).copy())
                         .permute(2, 0, 1))
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)
        if self.skipped:
            log.warning("%s: %d unreadable images were skipped", self.name, self.skipped)
        if resized:
            log.warning("%s: %d images differ in size from the first one and were resized to %dx%d (use --image-size "
                        "to resize every image the same way)", self.name, resized, *target)


class GeneratedImages:
    """`num_images` images generated from scratch by a checkpoint's model with its sampler (`sampler_options` over
    the sampler's defaults), image i seeded by (seed, i) as `maskgen generate`."""

    def __init__(self, ckpt: str, num_images: int, seed: int = 0, device: str = "cpu", **sampler_options):
        if num_images < 2:
            raise UserError("--num-gen must be at least 2 to generate images from a model")
        self.model = load_generator_model(ckpt, device)
        sampler_for(self.model, **sampler_options)  # bad options fail here, before any image is made
        self.name, self.num_images, self.seed, self.device = ckpt, num_images, seed, device
        self.sampler_options = sampler_options
        self.cache_id = None

    def __len__(self) -> int:
        return self.num_images

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for images in generated_batches(self.model, self.num_images, batch_size, self.seed, self.device,
                                        **self.sampler_options):
            yield (images * 255).round().clamp(0, 255).to(torch.uint8)


def is_checkpoint(spec: str) -> bool:
    """Whether `spec` is a weights / checkpoint / run directory rather than a folder of images."""
    p = Path(spec)
    return p.is_dir() and ((p / "config.json").is_file() or (p / "checkpoints").is_dir())


def open_image_set(spec: str, image_size: int | None = None, limit: int = 0, num_gen: int = 1000, seed: int = 0,
                   device: str = "cpu", sampler_options: dict | None = None):
    """A folder / shards / named dataset (SourceImages) or a checkpoint of a model that generates (GeneratedImages,
    `num_gen` images, `sampler_options` for its sampler)."""
    if is_checkpoint(spec):
        return GeneratedImages(spec, num_gen, seed, device=device, **(sampler_options or {}))
    return SourceImages(spec, image_size, limit)
