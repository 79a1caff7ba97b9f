"""Decoding one image robustly: every PIL mode becomes 8-bit RGB; unreadable files raise BadImage."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a silently grey image


class BadImage(Exception):
    """The bytes are not a decodable image."""


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: gray, 16/32-bit gray, float, palette, RGBA/LA (over white), CMYK, YCbCr."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode `data` fully into an RGB image, or raise BadImage (truncated, not an image, zero-sized...)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBomb / EXIF chatter
            img = Image.open(io.BytesIO(data))
            img.load()
        if img.width < 1 or img.height < 1:
            raise BadImage("empty image")
        return to_rgb(img)
    except BadImage:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error...)
        raise BadImage(f"{type(e).__name__}: {e}") from None
