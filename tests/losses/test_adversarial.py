"""GAN pieces: discriminator shapes and layout, loss formulas on known logits, adaptive weight, R1."""
import math

import pytest
import torch
from torch import nn

from maskgen.losses import (PatchDiscriminator, StyleGANDiscriminator, adaptive_weight, build_discriminator, d_loss,
                            g_loss, r1_penalty)
from maskgen.losses.adversarial import BlurDown

REAL = torch.tensor([2.0, 0.5, -1.0, 0.0])
FAKE = torch.tensor([-3.0, -0.5, 1.5, 0.2])


def test_hinge_values():
    # D: 0.5 * (mean relu(1 - real) + mean relu(1 + fake))
    expected_d = 0.5 * ((0 + 0.5 + 2.0 + 1.0) / 4 + (0 + 0.5 + 2.5 + 1.2) / 4)
    assert d_loss(REAL, FAKE, "hinge").item() == pytest.approx(expected_d)
    assert g_loss(FAKE, "hinge").item() == pytest.approx(-(-3.0 - 0.5 + 1.5 + 0.2) / 4)


def test_non_saturating_values():
    sp = lambda v: math.log1p(math.exp(v))  # softplus
    expected_d = 0.5 * (sum(sp(-r) for r in REAL.tolist()) / 4 + sum(sp(f) for f in FAKE.tolist()) / 4)
    assert d_loss(REAL, FAKE, "non-saturating").item() == pytest.approx(expected_d, rel=1e-6)
    # G: -log sigmoid(D(G)) = softplus(-D(G))
    assert g_loss(FAKE, "non-saturating").item() == pytest.approx(sum(sp(-f) for f in FAKE.tolist()) / 4, rel=1e-6)
    with pytest.raises(ValueError):
        g_loss(FAKE, "wasserstein")


def test_patch_discriminator_layout():
    d = PatchDiscriminator(channels=16, layers=2)
    assert d(torch.rand(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    assert PatchDiscriminator(channels=8, layers=3)(torch.rand(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in d.modules()) == 2
    # per-sample: a sample's logits do not depend on the rest of the batch (no batch statistics)
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(d(x)[:1], d(x[:1]))


def test_stylegan_discriminator_layout():
    d = build_discriminator("stylegan", 32, channels=8, layers=0)
    assert isinstance(d, StyleGANDiscriminator) and len(d.blocks) == 3  # 32 -> 16 -> 8 -> 4
    assert d(torch.rand(2, 3, 32, 32)).shape == (2,)
    assert [b.conv2.out_channels for b in d.blocks] == [16, 32, 32]
    with pytest.raises(ValueError, match="32x32"):
        d(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="power-of-two"):
        StyleGANDiscriminator(24)
    assert not d.state_dict().keys() & {"blocks.0.down.kernel"}  # the blur kernel is a constant, not saved


def test_blur_down_preserves_constants_and_halves():
    x = torch.full((1, 2, 8, 8), 3.0)
    y = BlurDown()(x)
    assert y.shape == (1, 2, 4, 4)
    torch.testing.assert_close(y[..., 1:-1, 1:-1], torch.full((1, 2, 2, 2), 3.0))  # kernel sums to 1


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    nll = (w * a).sum()  # d/dw = a, norm sqrt(30)
    g = (w * b).sum() ** 2  # d/dw = 2 (w.b) b = 2 * (-2 + 0.5) * b, norm 3 * sqrt(2)
    got = adaptive_weight(nll, g, w)
    assert got.item() == pytest.approx(math.sqrt(30) / (3 * math.sqrt(2) + 1e-4), rel=1e-6)
    assert not got.requires_grad
    (nll + g).backward()  # graphs retained for the real backward
    # clamped to 1e4 when the adversarial gradient vanishes
    v = torch.ones(3, requires_grad=True)
    assert adaptive_weight((v * 5).sum(), (v * 0).sum(), v).item() == 1e4


def test_r1_penalty_of_a_linear_discriminator():
    w = torch.randn(3, 4, 4, requires_grad=True)
    x = torch.rand(5, 3, 4, 4, requires_grad=True)
    logits = (x * w).flatten(1).sum(1)  # grad_x D = w for every sample
    r1 = r1_penalty(logits, x)
    assert r1.item() == pytest.approx(w.detach().pow(2).sum().item(), rel=1e-5)
    r1.backward()  # create_graph: the penalty trains D
    torch.testing.assert_close(w.grad, 2 * w.detach())
