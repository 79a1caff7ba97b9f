"""Image transforms with explicit random generators, so augmentation is a function of (seed, epoch, index).

Output: float tensors [3, S, S] in [0, 1] (no mean/std normalisation, as MAE/MAGE feed the tokenizer).
"""
from __future__ import annotations

import math

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
           "nearest": InterpolationMode.NEAREST}


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


class PretrainTransform:
    """MAE/MAGE pre-training: RandomResizedCrop(size, scale, ratio 3/4-4/3) + random horizontal flip, then
    optionally SimCLR's colour jitter (strength s, with p 0.8; brightness, contrast, saturation, hue in that
    order) and random grayscale (two-view contrastive methods)."""

    def __init__(self, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic",
                 hflip: bool = True, color_jitter: float = 0.0, grayscale: float = 0.0):
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip
        self.interpolation = INTERPOLATIONS[interpolation]
        self.color_jitter, self.grayscale = color_jitter, grayscale

    def crop_box(self, width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w) as torchvision's RandomResizedCrop.get_params, drawn from `g`."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(g, *self.scale)
            aspect = math.exp(_uniform(g, *log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=g))
                left = int(torch.randint(0, width - w + 1, (), generator=g))
                return top, left, h, w
        # fallback: central crop at the clamped aspect ratio
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, g: torch.Generator) -> torch.Tensor:
        top, left, h, w = self.crop_box(img.width, img.height, g)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], self.interpolation)
        if self.hflip and torch.rand((), generator=g).item() < 0.5:
            img = TF.hflip(img)
        if self.color_jitter > 0 and torch.rand((), generator=g).item() < 0.8:
            s = self.color_jitter
            img = TF.adjust_brightness(img, _uniform(g, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s))
            img = TF.adjust_contrast(img, _uniform(g, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s))
            img = TF.adjust_saturation(img, _uniform(g, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s))
            img = TF.adjust_hue(img, _uniform(g, -min(0.5, 0.2 * s), min(0.5, 0.2 * s)))
        if self.grayscale > 0 and torch.rand((), generator=g).item() < self.grayscale:
            img = TF.to_grayscale(img, num_output_channels=3)
        return TF.to_tensor(img)


class EvalTransform:
    """Evaluation: resize the shorter side to size / crop_fraction, then centre-crop `size`."""

    def __init__(self, size: int, crop_fraction: float = 1.0, interpolation="bicubic"):
        self.size, self.resize = size, int(round(size / crop_fraction))
        self.interpolation = INTERPOLATIONS[interpolation]

    def __call__(self, img: Image.Image, g: torch.Generator | None = None) -> torch.Tensor:
        img = TF.resize(img, self.resize, self.interpolation)
        img = TF.center_crop(img, [self.size, self.size])
        return TF.to_tensor(img).clamp_(0, 1)


def build_transform(data_cfg) -> PretrainTransform | EvalTransform:
    if data_cfg.augment == "pretrain":
        return PretrainTransform(data_cfg.image_size, data_cfg.crop_scale, interpolation=data_cfg.interpolation,
                                 hflip=data_cfg.hflip, color_jitter=data_cfg.color_jitter,
                                 grayscale=data_cfg.grayscale)
    return EvalTransform(data_cfg.image_size, interpolation=data_cfg.interpolation)
