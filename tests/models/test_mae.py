"""MAE pinned to the official formulas (facebookresearch/mae `models_mae.py`, `util/pos_embed.py`), re-stated here."""
import math

import numpy as np
import pytest
import torch

from maskgen.errors import UserError
from maskgen.masking import random_masking
from maskgen.methods.mae import masked_mse
from maskgen.models.mae import MAE, MAEConfig, patchify, unpatchify

TINY = dict(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=4)


def tiny(**kw) -> MAE:
    torch.manual_seed(0)
    return MAE(MAEConfig(**{**TINY, **kw})).eval()


def official_sincos(dim: int, grid: int) -> np.ndarray:
    """`get_2d_sincos_pos_embed(dim, grid, cls_token=True)`, re-stated in NumPy."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # w goes first
    g = np.stack(g, axis=0).reshape(2, 1, grid, grid)
    emb = np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_patchify_order_and_round_trip():
    p = 4
    x = torch.randn(2, 3, 16, 12)
    patches = patchify(x, p)
    assert patches.shape == (2, 12, p * p * 3)
    # patch (i, j) element (a, b, c) sits at index (a * p + b) * 3 + c: the official (p, p, c) order
    i, j, a, b, c = 2, 1, 3, 0, 2
    assert patches[1, i * 3 + j, (a * p + b) * 3 + c] == x[1, c, i * p + a, j * p + b]
    square = torch.randn(2, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(square, p), p), square)


@pytest.mark.parametrize("dim,grid", [(32, 4), (768, 14)])
def test_position_tables_are_the_official_sincos(dim, grid):
    m = MAE(MAEConfig(image_size=grid * 2, patch_size=2, embed_dim=dim, depth=1, num_heads=4,
                      decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=4))
    assert m.pos_embed.shape == (1, 1 + grid * grid, dim)
    np.testing.assert_allclose(m.pos_embed[0].numpy(), official_sincos(dim, grid), atol=1e-6)
    np.testing.assert_allclose(m.decoder_pos_embed[0].numpy(), official_sincos(16, grid), atol=1e-6)
    assert not m.pos_embed.requires_grad and "pos_embed" not in dict(m.named_parameters())


@pytest.mark.parametrize("length,ratio", [(16, 0.75), (196, 0.75), (64, 0.6), (64, 0.0), (10, 0.95)])
def test_random_masking_keeps_int_l_times_one_minus_r(length, ratio):
    x = torch.randn(3, length, 8)
    kept, mask, ids_restore, ids_keep = random_masking(x, ratio, generator=torch.Generator().manual_seed(0))
    keep = int(length * (1 - ratio))
    assert kept.shape == (3, keep, 8) and ids_keep.shape == (3, keep)
    assert torch.equal(mask.sum(1), torch.full((3,), float(length - keep)))
    # the kept rows are x at ids_keep, and ids_keep is exactly where the mask is 0
    assert torch.equal(kept, x.gather(1, ids_keep[..., None].expand(-1, -1, 8)))
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(3, keep))
    # un-shuffling kept + padding with ids_restore puts every kept token back at its position
    padded = torch.cat([kept, torch.zeros(3, length - keep, 8)], 1).gather(1, ids_restore[..., None].expand(-1, -1, 8))
    assert torch.equal(padded * (1 - mask[..., None]), x * (1 - mask[..., None]))


def test_random_masking_with_explicit_noise_is_the_official_algorithm():
    noise = torch.rand(2, 16)
    _, mask, ids_restore, ids_keep = random_masking(torch.randn(2, 16, 4), 0.75, noise=noise)
    ids_shuffle = torch.argsort(noise, dim=1)  # official
    assert torch.equal(ids_keep, ids_shuffle[:, :4])
    official_mask = torch.ones(2, 16)
    official_mask[:, :4] = 0
    assert torch.equal(mask, torch.gather(official_mask, 1, torch.argsort(ids_shuffle, dim=1)))
    with pytest.raises(ValueError, match="noise must have shape"):
        random_masking(torch.randn(2, 16, 4), 0.75, noise=torch.rand(2, 15))


def test_loss_reads_masked_patches_only():
    m = tiny()
    images = torch.rand(2, 3, 32, 32)
    latent, mask, ids_restore, _ = m.forward_encoder(images, 0.75, generator=torch.Generator().manual_seed(1))
    pred = m.forward_decoder(latent, ids_restore)
    target = m.targets(images)
    loss = masked_mse(pred, target, mask)
    visible = target.clone()
    visible[mask == 0] += 5.0
    assert torch.equal(masked_mse(pred, visible, mask), loss)
    removed = target.clone()
    removed[mask == 1] += 5.0
    assert masked_mse(pred, removed, mask) > loss + 1


def test_norm_pix_targets_are_the_official_statistics():
    images = torch.rand(2, 3, 32, 32)
    m = tiny()
    patches = patchify((images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                       / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), 8)
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, keepdim=True)  # unbiased, as torch.var in the official forward_loss
    torch.testing.assert_close(m.targets(images), (patches - mean) / (var + 1.0e-6) ** 0.5)
    torch.testing.assert_close(tiny(norm_pix_loss=False).targets(images), patches)
    # the viewer's un-normalisation inverts the targets back to the input
    for norm_pix in (True, False):
        mm = tiny(norm_pix_loss=norm_pix)
        torch.testing.assert_close(mm.predictions_to_images(mm.targets(images), images), images, atol=1e-5, rtol=0)


def test_official_init_and_loss_at_init():
    m = tiny()
    w = m.patch_embed.proj.weight
    bound = math.sqrt(6 / (w[0].numel() + w.shape[0]))  # xavier_uniform of the projection viewed as a Linear
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert 0.01 < m.cls_token.std() < 0.03 and 0.01 < m.mask_token.std() < 0.03
    fc = m.blocks[0].mlp.fc1
    assert fc.weight.abs().max() <= math.sqrt(6 / sum(fc.weight.shape)) and torch.equal(fc.bias, torch.zeros_like(fc.bias))
    # norm-pix targets have unit variance and the initial predictions are small: the loss starts near 1
    images = torch.rand(8, 3, 32, 32)
    pred, mask = m(images)
    loss = masked_mse(pred, m.targets(images), mask).item()
    assert 0.9 < loss < 1.6, loss


def test_features_and_encoder_only():
    m = tiny()
    images = torch.rand(2, 3, 32, 32)
    assert m.default_pool == "cls"
    assert m.forward_features(images, "cls").shape == (2, 32)
    assert m.forward_features(images, "none").shape == (2, 17, 32)
    torch.testing.assert_close(m.forward_features(images, "cls"), m.forward_features(images, "none")[:, 0])
    mean = m.forward_features(images, "mean")
    assert torch.allclose(mean.mean(-1), torch.zeros(2), atol=1e-5)  # parameter-free LayerNorm
    enc = tiny(decoder_depth=0)
    assert not any(k.startswith("decoder") or k == "mask_token" for k in enc.state_dict())
    with pytest.raises(UserError, match="no decoder"):
        enc.masked_reconstruction(images)
    shared = {k: v for k, v in m.state_dict().items() if k in enc.state_dict()}
    enc.load_state_dict(shared, strict=True)  # the encoder's tensors are exactly the full model's minus the decoder
    torch.testing.assert_close(enc.forward_features(images), m.forward_features(images))


def test_masked_reconstruction_mask_matches_the_ratio():
    m = tiny()
    recon, pixel_mask = m.masked_reconstruction(torch.rand(3, 3, 32, 32), 0.75, torch.Generator().manual_seed(0))
    assert recon.shape == (3, 3, 32, 32) and float(recon.min()) >= 0 and float(recon.max()) <= 1
    assert pixel_mask.shape == (3, 1, 32, 32)
    assert torch.equal(pixel_mask.mean((1, 2, 3)), torch.full((3,), 12 / 16))  # 16 - int(16 x 0.25) patches removed


def test_classifier_starts_from_the_encoder_with_official_layer_ids():
    m = tiny()
    clf = m.as_classifier(num_classes=7, drop_path=0.2, pool="cls").eval()
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(clf.forward_features(images), m.forward_features(images, "cls"))
    assert clf(images).shape == (2, 7) and float(clf.head.weight.detach().std()) < 1e-4
    assert clf.default_pool == "cls"  # features of a fine-tuned classifier use its own pooling by default
    mean = m.as_classifier(7, pool="mean").eval()  # a new fc_norm at init == MAE's parameter-free mean pooling
    torch.testing.assert_close(mean.forward_features(images), m.forward_features(images, "mean"))
    assert not any(k.startswith(("encoder.decoder", "encoder.mask_token")) for k in clf.state_dict())
    ids = {n: clf.layer_id(n) for n, _ in clf.named_parameters()}
    assert ids["encoder.patch_embed.proj.weight"] == ids["encoder.cls_token"] == 0
    assert ids["encoder.blocks.1.mlp.fc1.weight"] == 2 and ids["head.weight"] == clf.num_layers == 3
    rates = [blk.drop_path.drop_prob if hasattr(blk.drop_path, "drop_prob") else 0.0 for blk in clf.encoder.blocks]
    assert rates == pytest.approx([0.0, 0.2])
