"""The UMD auto-encoder: shapes, the reference's variants, adaLN-Zero at init, the condition token, features."""
import math

import pytest
import torch

from maskgen.api import build_config
from maskgen.models.layers import Block
from maskgen.models.umd import NUM_CLS, UMD, UMD_VARIANTS, UMDConfig, timestep_embedding


def tiny(**kw) -> UMD:
    torch.manual_seed(0)
    cfg = dict(image_size=16, patch_size=4, embed_dim=32, depth=2, decoder_depth=1, num_heads=2)
    return UMD(UMDConfig(**{**cfg, **kw})).eval()


def test_shapes_and_masking_counts():
    m = tiny()
    x = torch.randn(3, 3, 16, 16)
    pred, mask = m(x, torch.zeros(3, dtype=torch.long), mask_ratio=0.375)
    assert pred.shape == (3, 6, 16, 16)  # [x0 | eps], 2C channels
    assert mask.shape == (3, 16) and mask.sum(1).tolist() == [16 - int(16 * 0.625)] * 3
    latent, _, _ = m.forward_encoder(x, m.condition(torch.zeros(3)), mask_ratio=0.75)
    assert latent.shape == (3, NUM_CLS + 4, 32)
    pm = m.pixel_mask(mask)
    assert pm.shape == (3, 1, 16, 16) and pm.sum().item() == mask.sum().item() * 16


def test_the_reference_variants_and_the_b4_preset():
    assert UMD_VARIANTS == {"S": (384, 12, 4, 6), "B": (768, 12, 4, 12), "L": (1024, 24, 8, 16)}
    c = build_config("umd", "umd-b4-in64").model
    assert (c.embed_dim, c.depth, c.decoder_depth, c.num_heads) == UMD_VARIANTS["B"]
    assert (c.image_size, c.patch_size, c.num_patches, c.schedule) == (64, 4, 256, "cosine")


def test_adaln_zero_blocks_are_the_identity_and_time_has_no_effect_at_init():
    m = tiny(num_classes=5)
    x = torch.randn(2, 7, 32)
    c = torch.randn(2, 32)
    blocks = [b for b in m.modules() if isinstance(b, Block)]
    assert len(blocks) == 3 and all(b.adaLN_modulation is not None for b in blocks)
    for b in blocks:
        torch.testing.assert_close(b(x, c), x)
    assert torch.count_nonzero(m.cls_tokens) == 0
    img = torch.randn(2, 3, 16, 16)
    a = m(img, torch.tensor([0, 0]))[0]
    b = m(img, torch.tensor([500, 1000]), torch.tensor([1, 5]))[0]
    torch.testing.assert_close(a, b)  # every modulation is zero: the condition cannot act yet


def test_without_adaln_the_condition_is_a_token_and_acts_at_init():
    m = tiny(adaln=False)
    assert all(b.adaLN_modulation is None for b in m.modules() if isinstance(b, Block))
    assert m.final_modulation is None and m.decoder_norm.weight is not None
    img = torch.randn(2, 3, 16, 16)
    assert not torch.allclose(m(img, torch.tensor([0, 0]))[0], m(img, torch.tensor([500, 500]))[0])


def test_time_embedding_is_the_references_sinusoid():
    e = timestep_embedding(torch.tensor([0.0, 7.0]), 8)
    assert e[0].tolist() == [0.0] * 4 + [1.0] * 4
    f1 = math.exp(-math.log(1e4) * 1 / 3)  # i = 1 of half = 4: exp(-log(1e4) i / (half - 1))
    assert e[1, 1].item() == pytest.approx(math.sin(7 * f1), rel=1e-6)
    assert e[1, 5].item() == pytest.approx(math.cos(7 * f1), rel=1e-6)
    assert e[1, 3].item() == pytest.approx(math.sin(7 * 1e-4), rel=1e-4)


def test_features_are_the_mean_cls_output_clean_or_noised():
    m = tiny()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        latent, _, _ = m.forward_encoder(images * 2 - 1, m.condition(torch.zeros(2)))
        torch.testing.assert_close(m.forward_features(images), latent[:, :NUM_CLS].mean(1))
        torch.testing.assert_close(m.forward_features(images, pool="mean"), latent[:, NUM_CLS:].mean(1))
        clean = m.forward_features(images)
        m.feature_t = 50
        noised = m.forward_features(images)
        assert not torch.allclose(clean, noised)
        torch.testing.assert_close(noised, m.forward_features(images))  # the noise is seeded
    with pytest.raises(ValueError, match="pool"):
        m.forward_features(images, pool="max")
