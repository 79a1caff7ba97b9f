import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from maskgen.errors import ConfigError
from maskgen.models import create_model
from maskgen.models.vqgan import VQGAN, ResBlock, VQGANConfig

SPEC = Path(__file__).resolve().parents[3] / "shared" / "reference" / "checkpoints" / \
    "official_mage_tokenizer_state_dict.json"
SMALL = dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, z_channels=16, codebook_size=32, norm_groups=8)


def small(**kw) -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(VQGANConfig(**{**SMALL, **kw}))


@pytest.fixture(scope="module")
def official() -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(VQGANConfig()).eval()


def n_params(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


# ------------------------------------------------------------------------------------- layout
def test_default_layout_matches_official_state_dict(official):
    spec = json.loads(SPEC.read_text())
    sd = official.state_dict()
    assert len(spec) == 168
    assert list(sd) == list(spec)
    assert {k: list(v.shape) for k, v in sd.items()} == {k: v[0] for k, v in spec.items()}
    assert round(n_params(official), 2) == 54.52
    assert round(n_params(official.encoder), 2) == 23.78
    assert round(n_params(official.decoder), 2) == 30.48
    assert round(n_params(official.quantize), 2) == 0.26


def test_official_quirks(official):
    sd = official.state_dict()
    assert "encoder.conv_in.bias" not in sd and "decoder.conv_in.bias" in sd
    assert sd["encoder.conv_out.weight"].shape == (256, 512, 1, 1) and "encoder.conv_out.bias" in sd
    assert not any(k.endswith(("conv1.bias", "conv2.bias")) for k in sd)
    assert not any("attn" in k or "quant_conv" in k or "downsample" in k for k in sd)
    assert sd["decoder.up.1.block.0.nin_shortcut.weight"].shape == (128, 128, 1, 1)
    assert sd["decoder.up.3.block.0.nin_shortcut.weight"].shape == (256, 256, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in sd and "decoder.up.4.upsample.conv.bias" in sd
    norms = [m for m in official.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 and m.affine for m in norms)


def test_registry_and_config():
    cfg = VQGANConfig()
    assert cfg.ch_mult == [1, 1, 2, 2, 4] and cfg.downsample_factor == 16
    assert VQGANConfig().ch_mult is not cfg.ch_mult
    model = create_model("vqgan", **SMALL)
    assert isinstance(model, VQGAN) and model.model_name == "vqgan" and model.config_class is VQGANConfig
    assert model.config.downsample_factor == 4


@pytest.mark.parametrize("kw, word", [
    (dict(ch=48), "norm_groups"),
    (dict(ch=8, norm_groups=16, ch_mult=[2, 3]), "norm_groups"),
    (dict(codebook_size=1), "codebook_size"),
    (dict(ch_mult=[]), "ch_mult"),
    (dict(ch_mult=[1, 0]), "ch_mult"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(z_channels=0), "z_channels"),
    (dict(commitment_beta=-1.0), "commitment_beta"),
])
def test_config_rejects_impossible_values(kw, word):
    with pytest.raises(ConfigError, match=word) as e:
        VQGANConfig(**kw)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------- shapes
def test_official_encode_decode_shapes(official):
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        codes = official.encode(x)
        assert codes.shape == (1, 16, 16) and codes.dtype == torch.long
        assert 0 <= codes.min() and codes.max() < 1024
        y = official.decode(codes)
    assert y.shape == (1, 3, 256, 256) and y.dtype == torch.float32
    assert 0 <= y.min() and y.max() <= 1


@pytest.mark.parametrize("ch_mult, side, grid", [([1, 2], 32, 16), ([1, 1, 2], 32, 8), ([1, 2, 2], 32, 8), ([2], 8, 8)])
def test_small_configs(ch_mult, side, grid):
    model = small(ch_mult=ch_mult, num_res_blocks=2, codebook_size=64)
    assert model.config.downsample_factor == side // grid
    x = torch.rand(2, 3, side, grid * 2 * (side // grid))  # non-square too
    out = model(x)
    assert out["recon"].shape == x.shape
    assert out["codes"].shape == (2, grid, 2 * grid) and out["codes"].dtype == torch.long
    assert out["codebook_loss"].dim() == 0 and out["commitment_loss"].dim() == 0
    assert model.encode_latent(x).shape == (2, 16, grid, 2 * grid)
    assert torch.equal(model.encode(x), out["codes"])
    assert model.decode(out["codes"]).shape == x.shape


def test_bad_inputs_are_refused():
    model = small()
    with pytest.raises(ValueError, match="divisible by 4"):
        model.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode(torch.full((1, 8, 8), 32))


def test_decode_clamps_but_decode_latent_does_not():
    model = small()
    with torch.no_grad():
        model.decoder.conv_out.bias.fill_(5.0)
    codes = torch.randint(0, 32, (1, 8, 8))
    raw = model.decode_latent(model.embed_codes(codes))
    assert raw.max() > 1
    assert torch.equal(model.decode(codes), raw.clamp(0, 1))


def test_encode_is_deterministic_and_gradient_free():
    model = small().eval()
    x = torch.rand(2, 3, 32, 32)
    a = model.encode(x)
    with torch.no_grad():
        b = model.encode(x)
    assert torch.equal(a, b) and not a.requires_grad
    assert not model.decode(a).requires_grad


# ------------------------------------------------------------------------------------- blocks
def test_resblock_shortcut_quirk():
    torch.manual_seed(0)
    blk = ResBlock(16, 32, groups=8)
    for p in blk.parameters():  # make the GroupNorm affines non-trivial
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 16, 8, 8)
    h = blk.conv1(F.silu(blk.norm1(x)))
    h = blk.conv2(F.silu(blk.norm2(h)))
    assert blk.nin_shortcut.weight.shape == (32, 32, 1, 1)
    torch.testing.assert_close(blk(x), blk.nin_shortcut(h) + h)  # x itself is not added

    same = ResBlock(16, 16, groups=8)
    h = same.conv2(F.silu(same.norm2(same.conv1(F.silu(same.norm1(x))))))
    assert same.nin_shortcut is None
    torch.testing.assert_close(same(x), x + h)


def test_encoder_downsamples_by_average_pooling():
    """The encoder equals a hand-written forward with 2x2 avg_pool2d after every level but the last."""
    model = small()
    x = torch.rand(1, 3, 32, 32)
    enc = model.encoder
    h = enc.conv_in(x)
    for i, level in enumerate(enc.down):
        for blk in level.block:
            h = blk(h)
        if i < len(enc.down) - 1:
            h = F.avg_pool2d(h, 2)
    h = enc.conv_out(F.silu(enc.norm_out(enc.mid.block_2(enc.mid.block_1(h)))))
    torch.testing.assert_close(model.encode_latent(x), h)


def test_decoder_runs_levels_last_to_first_with_nearest_upsampling():
    model = small()
    dec = model.decoder
    z = torch.randn(1, 16, 8, 8)
    h = dec.mid.block_2(dec.mid.block_1(dec.conv_in(z)))
    for i in (2, 1, 0):
        for blk in dec.up[i].block:
            h = blk(h)
        if i:
            h = dec.up[i].upsample.conv(h.repeat_interleave(2, 2).repeat_interleave(2, 3))
    h = dec.conv_out(F.silu(dec.norm_out(h)))
    torch.testing.assert_close(model.decode_latent(z), h)


# ------------------------------------------------------------------------------------- quantiser
def test_quantize_picks_nearest_code():
    model = small(codebook_size=64)
    torch.nn.init.normal_(model.quantize.embedding.weight)
    z = torch.randn(3, 16, 5, 7)
    z_q, codes, _, _ = model.quantize(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 16)
    brute = torch.cdist(flat.double(), model.quantize.embedding.weight.double()).argmin(1)
    assert codes.shape == (3, 5, 7) and codes.dtype == torch.long
    assert torch.equal(codes.flatten(), brute)
    assert torch.equal(z_q, model.embed_codes(codes))


def test_quantize_chunked_distances_agree():
    model = small(codebook_size=64)
    torch.nn.init.normal_(model.quantize.embedding.weight)
    z = torch.randn(2, 16, 8, 8)
    full = model.quantize.nearest(z)
    model.quantize.max_block = 64 * 3  # 3 rows per chunk, the last one partial
    assert torch.equal(model.quantize.nearest(z), full)


def test_quantize_losses_and_straight_through_gradient():
    model = small()
    torch.nn.init.normal_(model.quantize.embedding.weight)
    x = torch.rand(2, 3, 32, 32)
    z = model.encode_latent(x)
    z_q, codes, cb, commit = model.quantize(z)
    e = model.embed_codes(codes).detach()
    torch.testing.assert_close(cb, ((e - z.detach()) ** 2).mean())
    torch.testing.assert_close(commit, ((z.detach() - e) ** 2).mean())

    # codebook loss moves only the codebook, commitment loss only the encoder
    cb.backward(retain_graph=True)
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad is None
    model.zero_grad(set_to_none=True)
    commit.backward(retain_graph=True)
    assert model.quantize.embedding.weight.grad is None
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)

    # straight-through: d(sum(g * z_q))/dz = g, and nothing reaches the codebook
    g = torch.randn_like(z_q)
    (z_grad,) = torch.autograd.grad((z_q * g).sum(), z, retain_graph=True)
    torch.testing.assert_close(z_grad, g)
    (z_q * g).sum().backward()
    assert model.quantize.embedding.weight.grad is None
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_forward_trains_encoder_decoder_and_codebook():
    model = small()
    out = model(torch.rand(2, 3, 32, 32))
    loss = out["recon"].abs().mean() + out["codebook_loss"] + 0.25 * out["commitment_loss"]
    loss.backward()
    for name in ("encoder.conv_in.weight", "decoder.conv_out.weight", "quantize.embedding.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_quantize_under_bf16_autocast_matches_fp32():
    model = small(codebook_size=64)
    torch.nn.init.normal_(model.quantize.embedding.weight)
    z = torch.randn(2, 16, 8, 8)
    ref = model.quantize(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, codes, cb, commit = model.quantize(z)
        out = model(torch.rand(1, 3, 32, 32))
    assert torch.equal(codes, ref[1])
    assert z_q.dtype == torch.float32 and cb.dtype == torch.float32
    torch.testing.assert_close(cb, ref[2])
    assert out["codes"].dtype == torch.long and torch.isfinite(out["recon"].float()).all()


def test_codebook_stats():
    model = small(codebook_size=8)
    codes = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])
    stats = model.codebook_stats(codes)
    torch.testing.assert_close(stats["usage"], torch.tensor(0.5))
    torch.testing.assert_close(stats["perplexity"], torch.tensor(4.0))
    one = model.codebook_stats(torch.zeros(3, 4, 4, dtype=torch.long))
    torch.testing.assert_close(one["perplexity"], torch.tensor(1.0))
    torch.testing.assert_close(one["usage"], torch.tensor(1 / 8))
    skew = model.codebook_stats(torch.tensor([0, 0, 0, 1]))
    p = torch.tensor([0.75, 0.25])
    torch.testing.assert_close(skew["perplexity"], torch.exp(-(p * p.log()).sum()))
