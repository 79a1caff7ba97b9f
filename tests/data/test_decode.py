import numpy as np
import pytest
import torch
from PIL import Image

from maskgen.data.decode import BadImage, decode_image
from maskgen.data.transforms import EvalTransform, PretrainTransform

from conftest import cifar_jpegs, png_bytes


def test_truncated_jpeg_and_non_image_raise():
    data, _ = cifar_jpegs(1)[0]
    with pytest.raises(BadImage):
        decode_image(data[: len(data) // 3])
    with pytest.raises(BadImage):
        decode_image(b"not an image at all")
    with pytest.raises(BadImage):
        decode_image(b"")
    assert decode_image(data).size == (32, 32)


def test_modes_become_8bit_rgb():
    gray = decode_image(png_bytes(Image.new("L", (5, 4), 77)))
    assert gray.mode == "RGB" and gray.size == (5, 4) and gray.getpixel((0, 0)) == (77, 77, 77)
    # RGBA is composited over white: alpha 0 -> white, alpha 255 -> the colour
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    out = decode_image(png_bytes(rgba))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 20, 30)
    pal = Image.new("P", (3, 3), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert decode_image(png_bytes(pal)).getpixel((1, 1)) == (200, 100, 50)
    cmyk = Image.new("CMYK", (3, 3), (0, 0, 0, 0))
    buf = __import__("io").BytesIO()
    cmyk.save(buf, format="JPEG")
    assert decode_image(buf.getvalue()).getpixel((1, 1))[0] > 240  # no ink = white


def test_16bit_png_is_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)  # mode I;16
    assert img.mode.startswith("I;16")
    out = decode_image(png_bytes(img))
    assert [out.getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]


def test_transforms_shapes_range_and_determinism():
    img = decode_image(cifar_jpegs(1)[0][0])
    t = PretrainTransform(16, scale=(0.2, 1.0))
    a = t(img, torch.Generator().manual_seed(3))
    b = t(img, torch.Generator().manual_seed(3))
    c = t(img, torch.Generator().manual_seed(4))
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    tiny = Image.new("RGB", (3, 2), (255, 0, 0))  # smaller than the crop: upsampled
    assert t(tiny, torch.Generator().manual_seed(0)).shape == (3, 16, 16)
    e = EvalTransform(24)(Image.new("RGB", (40, 30), (0, 255, 0)))
    assert e.shape == (3, 24, 24) and torch.allclose(e[1], torch.ones(24, 24))


def test_random_resized_crop_matches_torchvision_statistics():
    """Crop area and aspect follow torchvision's RandomResizedCrop.get_params (scale (0.2, 1), ratio 3/4-4/3)."""
    from torchvision.transforms import RandomResizedCrop

    t = PretrainTransform(32, scale=(0.2, 1.0))
    g = torch.Generator().manual_seed(0)
    ours = np.array([t.crop_box(300, 200, g)[2:] for _ in range(6000)], dtype=float)
    torch.manual_seed(0)
    img = Image.new("RGB", (300, 200))
    ref = np.array([RandomResizedCrop.get_params(img, (0.2, 1.0), (3 / 4, 4 / 3))[2:] for _ in range(6000)], dtype=float)
    for stat in (lambda hw: hw[:, 0] * hw[:, 1] / 60000, lambda hw: hw[:, 1] / hw[:, 0]):
        a, b = stat(ours), stat(ref)
        assert abs(a.mean() - b.mean()) < 0.01 and abs(a.std() - b.std()) < 0.01
    assert (ours[:, 0] <= 200).all() and (ours[:, 1] <= 300).all()
