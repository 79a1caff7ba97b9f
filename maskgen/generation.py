"""What `maskgen generate` and `maskgen edit` do, as functions.

Images are RGB files; models come from `from_pretrained` (a weights folder, checkpoint or run directory). What a
model can do is what it declares (the protocol of `maskgen.sampling.base`): it generates when it names a
`default_sampler`, and edits when it also has `encode_samples` / `sample_region` and its sampler can `edit`.
Sampler options (`num_iter=...` for MaskGIT) are keyword arguments passed on to `sampler_for`.
"""
from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.utils import make_grid, save_image

from .data.decode import BadImage, decode_image
from .errors import UserError
from .models import from_pretrained
from .outputs import atomic_write, prepare_dir, prepare_file
from .progress import progress_bar
from .sampling import Sampler, check_can_generate, sampler_for, samples_to_images
from .seeding import per_image_generators

EDIT_KINDS = ("inpaint", "outpaint", "uncrop")


WEIGHTS = ("auto", "ema", "raw")


def load_generator_model(ckpt: str | os.PathLike, device: str = "cpu", weights: str = "auto"):
    """The model saved in `ckpt`, in eval mode, checked able to generate: it names a `default_sampler`, and its
    `check_can_sample()` (MAGE: a tokenizer is attached) passes. `weights`: "auto" = its EMA weights where the
    checkpoint has them (samplers use the EMA, as DiT and UMD), else the trained ones; "ema" (an error without
    them); "raw" = the trained weights."""
    if weights not in WEIGHTS:
        raise UserError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    model = from_pretrained(ckpt, ema={"auto": "auto", "ema": True, "raw": False}[weights], device=device)
    check_can_generate(model, source=str(ckpt))
    return model


def generated_batches(model, num_images: int, batch_size: int, seed: int = 0, device: str = "cpu",
                      **sampler_options: Any) -> Iterator[torch.Tensor]:
    """Generation from scratch in batches with the model's sampler (`sampler_options` over its defaults): images
    [n, 3, H, W] in [0, 1] on the CPU, image i seeded by (seed, i), so the images do not depend on batch_size.
    The sampler is built (and its options checked) at the call, before the first batch is asked for."""
    if num_images < 0 or batch_size < 1:
        raise UserError("the number of images must be >= 0 and the batch size >= 1")
    return _batches(model, sampler_for(model, **sampler_options), num_images, batch_size, seed, device)


@torch.no_grad()
def _batches(model, sampler: Sampler, num_images: int, batch_size: int, seed: int, device) -> Iterator[torch.Tensor]:
    takes_start = "start" in inspect.signature(sampler.generate).parameters  # optional in the contract
    for first in range(0, num_images, batch_size):
        n = min(batch_size, num_images - first)
        samples = sampler.generate(model, n, generator=per_image_generators(seed, first, n, device),
                                   **({"start": first} if takes_start else {}))
        yield samples_to_images(model, samples)


def generate_images(ckpt: str | os.PathLike, out: str | os.PathLike, num_images: int, seed: int = 0,
                    batch_size: int = 16, device: str = "cpu", progress: bool = True, weights: str = "auto",
                    **sampler_options: Any) -> Path:
    """Generate `num_images` images from scratch into `out/` as 000000.png ... and a contact sheet of the first 64
    beside the folder (`grid_path(out)`, so that the folder holds the samples only, as FID tools read it);
    `sampler_options` (e.g. num_iter=20) go to the model's sampler; `weights`: see `load_generator_model`."""
    if num_images < 1 or batch_size < 1:
        raise UserError("--num-images and --batch-size must be at least 1")
    out = prepare_dir(out, "output folder")
    grid_file = prepare_file(grid_path(out), "grid image")
    model = load_generator_model(ckpt, device, weights)
    batches = generated_batches(model, num_images, batch_size, seed, device, **sampler_options)
    grid = []
    with progress_bar(total=num_images, unit="img", desc="generate", enabled=progress) as bar:
        for first, images in zip(range(0, num_images, batch_size), batches):
            for i, img in enumerate(images):
                save_png(img, out / f"{first + i:06d}.png")
            grid.extend(images[: max(0, 64 - len(grid))])
            bar.update(len(images))
    save_png(make_grid(torch.stack(grid), nrow=8), grid_file)
    return out


def grid_path(out: str | os.PathLike) -> Path:
    """Where `generate_images` puts the contact sheet of folder `out`: OUT-grid.png beside it."""
    out = Path(out).absolute()
    return out.parent / f"{out.name}-grid.png"


def save_png(image: torch.Tensor, path: Path) -> None:
    """[3, H, W] in [0, 1] -> PNG at `path`, complete or not at all."""
    with atomic_write(path) as tmp:
        save_image(image, tmp, format="png")


# ------------------------------------------------------------------------------------------- editing
def load_image(path: str | os.PathLike, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image file -> ([3, size, size] in [0, 1], original (width, height))."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such image: {path}")
    try:
        img = decode_image(path.read_bytes())
    except BadImage as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    return TF.to_tensor(img.resize((size, size), Image.BICUBIC)), img.size


def _parse_box(box: str, scale_x: float, scale_y: float, size: int) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (float(v) for v in box.split(","))
    except ValueError:
        raise UserError(f"--box must be x0,y0,x1,y1 in pixels, got {box!r}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise UserError(f"--box must be four finite numbers, got {box!r}")
    x0, x1 = round(x0 * scale_x), round(x1 * scale_x)
    y0, y1 = round(y0 * scale_y), round(y1 * scale_y)
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise UserError(f"--box {box} is empty or outside the image")
    return x0, y0, x1, y1


def edit_region(kind: str, size: int, original_size: tuple[int, int], box: str | None = None,
                mask: str | None = None, pad: int | None = None) -> torch.Tensor:
    """Pixel mask [size, size] bool, True where `kind` regenerates:
    inpaint: inside --box or the white part of --mask; uncrop: outside --box; outpaint: a border of --pad
    pixels (of the original image) on every side, the image shrunk into the middle."""
    w, h = original_size
    region = torch.zeros(size, size, dtype=torch.bool)
    if kind == "outpaint":
        if pad is None or pad < 1:
            raise UserError("outpaint needs --pad N (pixels added on every side), N >= 1")
        p = round(pad * size / (max(w, h) + 2 * pad))
        if p < 1 or 2 * p >= size:
            raise UserError(f"--pad {pad} is too {'small' if p < 1 else 'large'} for a {w}x{h} image")
        region[:] = True
        region[p:size - p, p:size - p] = False
        return region
    if (box is None) == (mask is None) or (kind == "uncrop" and mask is not None):
        raise UserError("inpaint needs exactly one of --box or --mask; uncrop needs --box")
    if box is not None:
        x0, y0, x1, y1 = _parse_box(box, size / w, size / h, size)
        region[y0:y1, x0:x1] = True
        return ~region if kind == "uncrop" else region
    m = Image.open(mask).convert("L") if Path(mask).is_file() else None
    if m is None:
        raise UserError(f"no such mask image: {mask}")
    if m.size != (w, h):
        raise UserError(f"mask is {m.size[0]}x{m.size[1]} but the image is {w}x{h}: they must be the same size")
    region = TF.to_tensor(m.resize((size, size), Image.NEAREST))[0] > 0.5
    if not bool(region.any()):
        raise UserError("the mask selects no pixel (white = regenerate)")
    return region


def edit_image(kind: str, ckpt: str | os.PathLike, image: str | os.PathLike, out: str | os.PathLike,
               box: str | None = None, mask: str | None = None, pad: int | None = None, seed: int = 0,
               dilate: int = 1, device: str = "cpu", **sampler_options: Any) -> Path:
    """Regenerate a region of `image` with the model's sampler (`sampler_options` over its defaults) and write the
    result to `out` (at the model's resolution) and a panel (input | masked input | result) next to it as
    OUT_panel.png. The pixels of the region are zeroed, the image is encoded to the model's samples
    (`encode_samples`), the region becomes a region of the samples (`sample_region`; MAGE: the tokens that
    overlap it plus `dilate` tokens, as the maintainer's inpainting), the sampler regenerates it (`edit`) and the
    pixels outside the region are pasted back from the input."""
    if kind not in EDIT_KINDS:
        raise UserError(f"unknown edit '{kind}' (choose {', '.join(EDIT_KINDS)})")
    out = prepare_file(out, "output image")
    model = load_generator_model(ckpt, device)
    sampler = sampler_for(model, **sampler_options)
    if type(sampler).edit is Sampler.edit or not all(hasattr(model, a) for a in ("encode_samples", "sample_region")):
        raise UserError(f"{ckpt}: the '{model.model_name}' model with its {sampler.sampler_name} sampler cannot "
                        f"edit images")
    size = model.config.image_size
    x, original_size = load_image(image, size)
    region = edit_region(kind, size, original_size, box, mask, pad)
    if kind == "outpaint":  # shrink the image into the kept centre
        keep = (~region).nonzero()
        top, left = int(keep[:, 0].min()), int(keep[:, 1].min())
        inner = size - 2 * top
        canvas = torch.zeros_like(x)
        canvas[:, top:top + inner, left:left + inner] = TF.resize(x, [inner, inner], antialias=True)
        x = canvas
    if bool(region.all()):
        raise UserError("the region covers the whole image: use `maskgen generate` instead")
    masked = x * (~region).float()  # pixels of the region are zeroed before encoding (official practice)
    with torch.no_grad():
        samples = model.encode_samples(masked[None].to(device))
        samples = sampler.edit(model, samples, model.sample_region(region, dilate),
                               generator=per_image_generators(seed, 0, 1, device))
        result = samples_to_images(model, samples)[0]
    result = torch.where(region, result, x)
    save_png(result, out)
    save_png(make_grid(torch.stack([x, masked, result]), nrow=3, padding=2, pad_value=1.0),
              out.with_name(out.stem + "_panel.png"))
    return out
