"""What `maskgen generate`, `maskgen edit` and `maskgen features` do, as functions.

Images are RGB files; models come from `from_pretrained` (a MAGE folder, checkpoint or run directory with
its tokenizer attached).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import save_file
from torchvision.utils import make_grid, save_image

from .errors import UserError
from .progress import progress_bar
from .sampling.maskgit import inpaint_tokens, token_region, generate as maskgit_generate

EDIT_KINDS = ("inpaint", "outpaint", "uncrop")


def load_generator_model(ckpt: str | os.PathLike, device: str = "cpu"):
    """A MAGE model with its tokenizer, in eval mode."""
    from .models.mage import MAGE
    from .weights import from_pretrained

    model = from_pretrained(ckpt, device=device)
    if not isinstance(model, MAGE):
        raise UserError(f"{ckpt} holds a '{model.model_name}' model; generation and editing need a MAGE model")
    if model.tokenizer is None:
        raise UserError(f"{ckpt} has no tokenizer/ folder, so its tokens cannot be turned into images")
    return model


def _per_image_generators(seed: int, first: int, count: int, device) -> list[torch.Generator]:
    """One generator per image, seeded by (seed, image index): image i is the same whatever the batch size."""
    from .data.loader import mix_seed

    return [torch.Generator(device).manual_seed(mix_seed(seed, first + i)) for i in range(count)]


@torch.no_grad()
def generated_batches(model, num_images: int, batch_size: int, seed: int = 0, num_iter: int = 12,
                      choice_temperature: float = 4.5, temperature: float = 1.0,
                      device: str = "cpu") -> Iterator[torch.Tensor]:
    """MaskGIT generation from scratch in batches: images [n, 3, H, W] in [0, 1] on the CPU, image i seeded by
    (seed, i), so the images do not depend on batch_size."""
    for first in range(0, num_images, batch_size):
        n = min(batch_size, num_images - first)
        codes = maskgit_generate(model, n, num_iter, choice_temperature, temperature,
                                 generator=_per_image_generators(seed, first, n, device))
        yield model.decode_tokens(codes).float().cpu()


def generate_images(ckpt: str | os.PathLike, out: str | os.PathLike, num_images: int, seed: int = 0,
                    num_iter: int = 12, choice_temperature: float = 4.5, temperature: float = 1.0,
                    batch_size: int = 16, device: str = "cpu", progress: bool = True) -> Path:
    """Generate `num_images` images from scratch into `out/` as 000000.png ... plus grid.png (first 64)."""
    if num_images < 1 or batch_size < 1 or num_iter < 1:
        raise UserError("--num-images, --batch-size and --num-iter must be at least 1")
    model = load_generator_model(ckpt, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid = []
    with progress_bar(total=num_images, unit="img", desc="generate", enabled=progress) as bar:
        batches = generated_batches(model, num_images, batch_size, seed, num_iter, choice_temperature, temperature,
                                    device)
        for first, images in zip(range(0, num_images, batch_size), batches):
            for i, img in enumerate(images):
                save_image(img, out / f"{first + i:06d}.png")
            grid.extend(images[: max(0, 64 - len(grid))])
            bar.update(len(images))
    save_image(make_grid(torch.stack(grid), nrow=8), out / "grid.png")
    return out


# ------------------------------------------------------------------------------------------- editing
def _load_image(path: str | os.PathLike, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image file -> ([3, size, size] in [0, 1], original (width, height))."""
    from .data.decode import BadImage, decode_image

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
               num_iter: int = 12, choice_temperature: float = 4.5, temperature: float = 1.0, dilate: int = 1,
               device: str = "cpu") -> Path:
    """Regenerate a region of `image` with MAGE and write the result to `out` (at the model's resolution) and a
    panel (input | masked input | result) next to it as OUT_panel.png. The region's tokens start masked (one
    token beyond the pixel region with dilate=1, as the maintainer's inpainting), the other tokens stay fixed;
    pixels outside the region are pasted back from the input."""
    if kind not in EDIT_KINDS:
        raise UserError(f"unknown edit '{kind}' (choose {', '.join(EDIT_KINDS)})")
    model = load_generator_model(ckpt, device)
    size, f = model.config.image_size, model.config.downsample_factor
    x, original_size = _load_image(image, size)
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
    masked = x * (~region).float()  # pixels of the region are zeroed before tokenizing (official practice)
    with torch.no_grad():
        codes = model.encode_images(masked[None].to(device))
        tokens = token_region(region, f, dilate=dilate)
        codes = inpaint_tokens(model, codes, tokens, num_iter, choice_temperature, temperature,
                               generator=_per_image_generators(seed, 0, 1, device))
        result = model.decode_tokens(codes)[0].float().cpu()
    result = torch.where(region, result, x)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(result, out)
    save_image(make_grid(torch.stack([x, masked, result]), nrow=3, padding=2, pad_value=1.0),
               out.with_name(out.stem + "_panel.png"))
    return out


# ------------------------------------------------------------------------------------------ features
def extract_features(ckpt: str | os.PathLike, data: str, out: str | os.PathLike, split: str = "train",
                     pool: str = "mean", image_size: int | None = None, batch_size: int = 64, limit: int = 0,
                     device: str = "cpu", progress: bool = True) -> Path:
    """Features of every image of `data` (eval transform: resize + centre crop; see
    `maskgen.eval.features.compute_features`) into a safetensors file with `features` float32 [N, D] and
    `labels` int64 [N] (-1 = unlabeled)."""
    from .eval.features import compute_features, load_encoder

    model = load_encoder(ckpt, device)
    feats, labels = compute_features(model, data, split, pool=pool, image_size=image_size, batch_size=batch_size,
                                     limit=limit, device=device, progress=progress)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": feats, "labels": labels}, str(out),
              metadata={"ckpt": str(ckpt), "data": str(data), "split": split, "pool": pool})
    return out
