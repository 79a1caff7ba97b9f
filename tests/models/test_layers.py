"""maskgen.models.layers: blocks (plain and adaLN-Zero), drop-path, patch and sin-cos position embeddings.
References are written here from raw tensors (plain formulas, a NumPy re-statement of MAE's pos_embed)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskgen.models.layers import Block, DropPath, PatchEmbed, init_vit_weights, sincos_pos_embed_2d

BLOCK_KEYS = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
              "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"}


def randomize(module: torch.nn.Module, std: float = 0.2) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=std)


def ref_attn(blk: Block, h: torch.Tensor) -> torch.Tensor:
    """Softmax attention by hand (the official MAGE/MAE formula). h [B, N, D] -> [B, N, D]."""
    b, n, d = h.shape
    heads = blk.attn.num_heads
    q, k, v = (h @ blk.attn.qkv.weight.t() + blk.attn.qkv.bias).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5, -1)
    return (a @ v).transpose(1, 2).reshape(b, n, d) @ blk.attn.proj.weight.t() + blk.attn.proj.bias


def ref_mlp(blk: Block, h: torch.Tensor) -> torch.Tensor:
    pre = h @ blk.mlp.fc1.weight.t() + blk.mlp.fc1.bias
    return 0.5 * pre * (1 + torch.erf(pre / math.sqrt(2))) @ blk.mlp.fc2.weight.t() + blk.mlp.fc2.bias  # exact GELU


# ----------------------------------------------------------------------------------- Block, no condition
def test_block_without_cond_equals_the_pre_ln_formula():
    torch.manual_seed(0)
    blk = Block(32, 4).eval()
    randomize(blk)
    x = torch.randn(2, 5, 32)
    y = x + ref_attn(blk, F.layer_norm(x, (32,), blk.norm1.weight, blk.norm1.bias, 1e-6))
    y = y + ref_mlp(blk, F.layer_norm(y, (32,), blk.norm2.weight, blk.norm2.bias, 1e-6))
    out = blk(x)
    assert out.shape == (2, 5, 32)
    assert (out - y).abs().max().item() < 1e-5
    assert torch.equal(blk(x, None), out)


def test_block_state_dict_keys_are_the_official_ones():
    assert set(Block(32, 4).state_dict()) == BLOCK_KEYS
    # drop-path has no parameters: the same keys with stochastic depth
    assert set(Block(32, 4, drop_path=0.3).state_dict()) == BLOCK_KEYS
    assert Block(32, 4, mlp_ratio=2.0).mlp.fc1.weight.shape == (64, 32)
    assert Block(32, 4).norm1.eps == 1e-6


def test_block_rejects_a_condition_without_cond_dim():
    with pytest.raises(ValueError, match="cond_dim"):
        Block(32, 4)(torch.randn(1, 3, 32), torch.randn(1, 8))
    with pytest.raises(ValueError, match="divisible"):
        Block(30, 4)


# ----------------------------------------------------------------------------------- Block, adaLN-Zero
def test_adaln_zero_block_is_the_identity_at_init():
    torch.manual_seed(0)
    blk = Block(32, 4, cond_dim=16).eval()
    assert blk.norm1.weight is None and blk.norm2.weight is None  # no affine params in the norms
    assert torch.all(blk.adaLN_modulation[1].weight == 0) and torch.all(blk.adaLN_modulation[1].bias == 0)
    assert blk.adaLN_modulation[1].weight.shape == (6 * 32, 16)
    for _ in range(3):
        x, c = torch.randn(3, 7, 32) * 5, torch.randn(3, 16) * 5
        assert torch.equal(blk(x, c), x)
    # a model-level init (xavier on every Linear) keeps the modulation at zero
    init_vit_weights(blk)
    assert torch.all(blk.adaLN_modulation[1].weight == 0) and blk.attn.qkv.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="pass c"):
        blk(torch.randn(1, 3, 32))


def test_adaln_block_equals_the_dit_formula():
    torch.manual_seed(0)
    blk = Block(32, 4, mlp_ratio=2.0, cond_dim=16).eval()
    randomize(blk)
    x, c = torch.randn(2, 5, 32), torch.randn(2, 16)
    lin = blk.adaLN_modulation[1]
    mod = F.silu(c) @ lin.weight.t() + lin.bias  # [B, 6D]
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, i * 32:(i + 1) * 32, None].transpose(1, 2) for i in range(6))
    ln = lambda t: (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-6)  # noqa: E731
    y = x + gate1 * ref_attn(blk, ln(x) * (1 + scale1) + shift1)
    y = y + gate2 * ref_mlp(blk, ln(y) * (1 + scale2) + shift2)
    out = blk(x, c)
    assert (out - x).abs().max().item() > 0.1  # the modulation does something
    assert (out - y).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------------- DropPath
def test_drop_path_is_the_identity_in_eval_and_per_sample_in_training():
    p = 0.3
    dp = DropPath(p)
    x = torch.randn(4000, 3, 5) + 10
    assert torch.equal(dp.eval()(x), x)
    torch.manual_seed(0)
    y = dp.train()(x)
    dropped = (y == 0).flatten(1).all(1)
    kept = torch.isclose(y, x / (1 - p), rtol=1e-6, atol=0).flatten(1).all(1)
    assert torch.all(dropped ^ kept)  # each sample is either all 0 or all x / (1 - p)
    assert abs(dropped.float().mean().item() - p) < 0.03  # 4000 samples: std ~0.007
    assert torch.equal(DropPath(0.0).train()(x), x)


def test_block_drop_path_draws_one_bernoulli_per_branch_attention_first():
    """The hand-unrolled stochastic depth the fine-tuning classifier used before Block had drop_path:
    same RNG draws in the same order, so a seeded run gives the same masks (values to float rounding)."""
    def old_drop_path(x, rate):
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - rate)
        return x * keep / (1 - rate)

    torch.manual_seed(0)
    blocks = [Block(32, 4, drop_path=r) for r in (0.0, 0.25, 0.5)]
    for blk in blocks:
        randomize(blk)
    x = torch.randn(16, 5, 32)
    torch.manual_seed(123)
    new = x
    for blk in blocks:
        new = blk.train()(new)
    after_new = torch.rand(3)
    torch.manual_seed(123)
    old = x
    for blk, r in zip(blocks, (0.0, 0.25, 0.5)):
        branch = blk.attn(blk.norm1(old))
        old = old + (old_drop_path(branch, r) if r else branch)
        branch = blk.mlp(blk.norm2(old))
        old = old + (old_drop_path(branch, r) if r else branch)
    assert torch.equal(torch.rand(3), after_new)  # the same number of draws
    assert (new - old).abs().max().item() < 1e-5  # the same samples dropped (a different one would differ by O(1))
    with torch.no_grad():
        undropped = x
        for blk in blocks:
            undropped = blk.eval()(undropped)
    assert (new - undropped).abs().max().item() > 0.1  # (some sample was dropped)


# ----------------------------------------------------------------------------------- PatchEmbed
def test_patch_embed_shape_keys_and_errors():
    pe = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=24)
    assert set(pe.state_dict()) == {"proj.weight", "proj.bias"} and pe.proj.weight.shape == (24, 3, 8, 8)
    x = torch.randn(2, 3, 32, 32)
    out = pe(x)
    assert out.shape == (2, 16, 24) and pe.num_patches == 16
    # patch (row 1, col 2) is token 1*4+2 = 6, the dot product of its pixels with the kernel
    ref = (x[:, :, 8:16, 16:24, None] * pe.proj.weight.permute(1, 2, 3, 0)).sum((1, 2, 3)) + pe.proj.bias
    assert torch.allclose(out[:, 6], ref, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        pe(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="expects"):
        pe(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        PatchEmbed(img_size=30, patch_size=8)


# ----------------------------------------------------------------------------------- sin-cos position embedding
def mae_get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """facebookresearch/mae util/pos_embed.py, re-stated in NumPy (np.float -> np.float64)."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


@pytest.mark.parametrize("dim,grid", [(32, 4), (64, 7), (768, 14)])
def test_sincos_pos_embed_equals_mae(dim, grid):
    emb = sincos_pos_embed_2d(dim, grid, cls_token=True)
    assert emb.shape == (grid * grid + 1, dim) and emb.dtype == torch.float32
    assert torch.all(emb[0] == 0)
    ref = torch.from_numpy(mae_get_2d_sincos_pos_embed(dim, grid, cls_token=True)).float()  # as MAE loads it
    assert (emb - ref).abs().max().item() < 1e-6
    assert torch.equal(sincos_pos_embed_2d(dim, grid), emb[1:])


def test_sincos_pos_embed_closed_form():
    d, g = 32, 4
    emb = sincos_pos_embed_2d(d, g)
    omega = [1 / 10000 ** (i / 8) for i in range(8)]
    for row, col in [(0, 0), (1, 2), (3, 1)]:
        e = emb[row * g + col]
        # first half: the column (MAE's meshgrid(w, h)[0]), second half: the row; each [sin, cos]
        expect = ([math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
                  + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega])
        assert torch.allclose(e, torch.tensor(expect), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(30, 4)
