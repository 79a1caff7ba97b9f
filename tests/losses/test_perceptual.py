"""Perceptual loss: a distance (0, symmetric, monotone in degradation), frozen, invisible to state_dict,
fp32 under autocast; lpips-vgg runs from local files only (fake weights here) and says what is missing."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from maskgen.errors import UserError
from maskgen.losses import PerceptualLoss
from maskgen.losses.perceptual import LPIPS_SCALE, LPIPS_SHIFT, VGG16_FILE

from conftest import cifar_jpegs


@pytest.fixture(scope="module")
def lite0():
    return PerceptualLoss("lite0", size=64)


@pytest.fixture(scope="module")
def photos():
    arrays = [np.array(Image.open(io.BytesIO(b)).convert("RGB")) for b, _ in cifar_jpegs(4)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def blur(x, sigma):
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    k2 = (k[:, None] * k[None, :]).expand(3, 1, 7, 7)
    return F.conv2d(F.pad(x, (3, 3, 3, 3), mode="reflect"), k2, groups=3)


def test_lite0_is_a_distance_that_grows_with_degradation(lite0, photos):
    x = photos
    assert torch.equal(lite0(x, x), torch.zeros(len(x)))
    noisy = [(x + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
             for s in (0.02, 0.08, 0.2)]
    blurred = [blur(x, s) for s in (0.5, 1.0, 2.0)]
    for degraded in (noisy, blurred):
        d = torch.stack([lite0(x, y) for y in degraded])  # [levels, B]
        assert (d > 0).all()
        assert (d[1:] > d[:-1]).all(), d  # every image, every step up in strength
    torch.testing.assert_close(lite0(x, noisy[1]), lite0(noisy[1], x))
    assert (lite0(x, x.flip(0)) > lite0(x, noisy[0])).all()  # other photos are farther than a little noise


def test_frozen_and_outside_the_owners_state(lite0, photos):
    owner = nn.Module()
    owner.layer = nn.Conv2d(3, 3, 1)
    owner.perceptual = lite0
    assert list(owner.state_dict()) == ["layer.weight", "layer.bias"]
    assert len(list(owner.parameters())) == 2 and not list(owner.buffers())
    frozen = list(lite0.frozen.parameters())
    assert frozen and not any(p.requires_grad for p in frozen)
    owner.train()  # the owner's train mode never reaches the frozen network
    assert not lite0.frozen.training and not any(m.training for m in lite0.frozen.modules())
    stats = {k: v.clone() for k, v in lite0.frozen.state_dict().items()}
    x = photos.clone().requires_grad_(True)
    lite0(x, photos.flip(0)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients reach the input ...
    assert all(p.grad is None for p in frozen)  # ... not the network
    assert all(torch.equal(v, lite0.frozen.state_dict()[k]) for k, v in stats.items())  # BatchNorm stats unchanged
    owner.double()  # .to() / .cuda() / .double() of the owner reach the hidden network
    assert all(p.dtype == torch.float64 for p in lite0.frozen.parameters())
    owner.float()
    assert all(p.dtype == torch.float32 for p in lite0.frozen.parameters())


def test_fp32_under_autocast_and_no_clamp(lite0, photos):
    y = photos.flip(0)
    ref = lite0(photos, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lite0(photos, y)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    over = (photos * 1.2 - 0.1).requires_grad_(True)  # partly outside [0, 1]: still gets a gradient there
    lite0(over, photos).sum().backward()
    assert over.grad[over.detach() > 1].abs().sum() > 0


def test_unknown_network():
    with pytest.raises(ValueError, match="lite0"):
        PerceptualLoss("alex")


# ------------------------------------------------------------------------------------- lpips-vgg
VGG_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
             (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]


@pytest.fixture
def fake_lpips(tmp_path, monkeypatch):
    """Random VGG16 `features.*` weights in a temporary TORCH_HOME and a random LPIPS linear-weights file."""
    g = torch.Generator().manual_seed(0)
    vgg = {}
    for i, cin, cout in VGG_CONVS:
        vgg[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        vgg[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.01
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(vgg, home / "hub" / "checkpoints" / VGG16_FILE)
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) * 0.1
            for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lins, tmp_path / "vgg.pth")
    monkeypatch.setenv("TORCH_HOME", str(home))
    return vgg, lins, tmp_path / "vgg.pth"


def test_lpips_vgg_matches_a_direct_computation(fake_lpips, photos):
    from torchvision.models.vgg import cfgs, make_layers

    vgg, lins, lin_path = fake_lpips
    loss = PerceptualLoss("lpips-vgg", size=0, linear_weights=str(lin_path))
    x, y = photos, photos.flip(0)
    # reference: torchvision's own VGG16 layer stack and the LPIPS v0.1 formula written out
    features = make_layers(cfgs["D"])
    features.load_state_dict({k[len("features."):]: v for k, v in vgg.items()})
    shift, scale = torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1)

    def taps(img):
        h, out = ((2 * img - 1) - shift) / scale, []
        for i, layer in enumerate(features):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                out.append(h)
        return out

    with torch.no_grad():
        ref = sum(((a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) -
                    b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)) ** 2 * lins[f"lin{i}.model.1.weight"]
                   ).sum(1).mean((1, 2)) for i, (a, b) in enumerate(zip(taps(x), taps(y))))
        out = loss(x, y)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    assert torch.equal(loss(x, x), torch.zeros(len(x)))
    assert not loss.state_dict()


def test_lpips_vgg_missing_files_name_the_file(fake_lpips, tmp_path, monkeypatch):
    _, _, lin_path = fake_lpips
    with pytest.raises(UserError, match="lpips_linear_weights.*lite0 works offline"):
        PerceptualLoss("lpips-vgg", linear_weights=str(tmp_path / "nope.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(UserError, match=f"{VGG16_FILE}.*lite0 works offline") as e:
        PerceptualLoss("lpips-vgg", linear_weights=str(lin_path))
    assert "\n" not in str(e.value)
