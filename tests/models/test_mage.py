import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from maskgen.engine.optim import param_groups
from maskgen.errors import ConfigError, UserError
from maskgen.methods.mage import MAGEMasking, MAGEObjective, mage_loss
from maskgen.models import create_model, from_pretrained, save_pretrained
from maskgen.models.layers import Block
from maskgen.models.mage import MAGE, MAGEConfig
from maskgen.models.vqgan import VQGAN, VQGANConfig

SPEC = Path(__file__).resolve().parents[3] / "shared" / "reference" / "checkpoints" / "official_mage_vitb_state_dict.json"
DEAD = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "mask_token",
        "decoder_pos_embed", "decoder_pred.weight", "decoder_pred.bias", "token_emb.position_ids"}


def tiny_config(**kw) -> MAGEConfig:
    base = dict(image_size=32, token_grid=4, codebook_size=64, vocab_layout="compact", embed_dim=32, depth=2,
                num_heads=2, decoder_embed_dim=48, decoder_depth=1, decoder_num_heads=4)
    return MAGEConfig(**{**base, **kw})


def tiny_tokenizer(codebook_size: int = 64) -> VQGAN:
    torch.manual_seed(1)  # 32 px -> 4x4 tokens
    return VQGAN(VQGANConfig(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1, z_channels=16,
                             codebook_size=codebook_size))


@pytest.fixture
def model() -> MAGE:
    torch.manual_seed(0)
    return MAGE(tiny_config()).eval()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample_masks(model: MAGE, batch: int, generator: torch.Generator, **objective):
    """MAGE's pre-training masks (the method's objective, paper defaults unless overridden) for `model`."""
    return MAGEMasking(MAGEObjective(**objective), model.config.num_tokens).sample(batch, generator)


def pretrain_loss(model: MAGE, tokens: torch.Tensor, generator: torch.Generator, **objective):
    """(loss, logs) of the MAGE method's objective (paper defaults unless overridden)."""
    o = MAGEObjective(**objective)
    loss, logs, _ = mage_loss(model, tokens, MAGEMasking(o, model.config.num_tokens), o.label_smoothing, generator)
    return loss, logs


# ----------------------------------------------------------------------------- config and layout
def test_vocabulary_layouts():
    off = MAGEConfig()
    assert (off.vocab_size, off.cls_id, off.mask_id, off.num_tokens) == (2025, 1100, 2024, 256)
    assert MAGEMasking(MAGEObjective(), off.num_tokens).num_dropped == 128
    small = MAGEConfig(codebook_size=16, token_grid=4, image_size=64, vocab_layout="official")
    assert (small.vocab_size, small.cls_id, small.mask_id) == (1017, 92, 1016)
    compact = tiny_config()
    assert (compact.vocab_size, compact.cls_id, compact.mask_id) == (66, 64, 65)
    with pytest.raises(ConfigError, match="num_heads"):
        MAGEConfig(embed_dim=32, num_heads=5)
    with pytest.raises(ConfigError, match="mask_ratio"):
        MAGEObjective(mask_ratio_min=0.8, mask_ratio_max=0.6)
    with pytest.raises(TypeError):  # the objective is not part of the architecture any more
        MAGEConfig(mask_ratio_min=0.5)
    with pytest.raises(ConfigError, match="vocab_layout"):
        MAGEConfig(vocab_layout="bert")


def test_official_vitb_layout_on_meta():
    """Our state_dict is the official one minus the dead tensors and the tokenizer, with equal shapes."""
    spec = json.loads(SPEC.read_text())
    with torch.device("meta"):
        m = create_model("mage")
    ours = {k: list(v.shape) for k, v in m.state_dict().items()}
    official = {k: s for k, (s, _) in spec.items() if not k.startswith("vqgan.") and k not in DEAD}
    assert ours == official
    assert len(ours) == 433 - 168 - len(DEAD) == 256
    # heads: encoder 12 x 64, decoder 16 x 48 (official mage_vit_base_patch16)
    assert m.blocks[0].attn.num_heads == 12 and m.decoder_blocks[0].attn.num_heads == 16
    assert m.mlm_layer.ln.eps == 1e-5 and m.norm.eps == m.token_emb.LayerNorm.eps == m.blocks[0].norm1.eps == 1e-6
    # official ViT-B: encoder + token_emb 86.81 M; decoder + mlm 58.87 M with the dead decoder_pos_embed
    # [1, 257, 768] and decoder_pred 768 -> 768, which are absent here
    count = {"enc": 0, "dec": 0}
    for name, p in m.named_parameters():
        count["enc" if name.startswith(("token_emb.", "blocks.", "norm.")) else "dec"] += p.numel()
    assert round(count["enc"] / 1e6, 2) == 86.81
    assert round((count["dec"] + 257 * 768 + 768 * 768 + 768) / 1e6, 2) == 58.87


def test_weight_decay_groups_follow_the_official_rule():
    """official MAGE (timm 0.3.2 add_weight_decay): no decay only for 1-D tensors and names ending in '.bias'
    (89 / 173 officially, of which
    4 decayed and 2 non-decayed tensors are dead and absent here); embeddings and the 3-D
    decoder_pos_embed_learned are decayed, mlm_layer.bias is not."""
    with torch.device("meta"):
        m = create_model("mage")
    decay, no_decay = param_groups(m, 0.05)
    assert len(decay["params"]) == 85 and len(no_decay["params"]) == 171
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"token_emb.word_embeddings.weight", "token_emb.position_embeddings.weight",
            "decoder_pos_embed_learned"} <= decayed
    assert "mlm_layer.bias" in {names[id(p)] for p in no_decay["params"]}


def test_init_follows_the_official_recipe(model):
    assert torch.all(model.mlm_layer.bias == 0) and torch.all(model.decoder_embed.bias == 0)
    assert torch.all(model.blocks[0].norm1.weight == 1) and torch.all(model.mlm_layer.ln.bias == 0)
    assert model.token_emb.word_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert model.decoder_pos_embed_learned.std().item() == pytest.approx(0.02, rel=0.15)
    w = model.blocks[0].mlp.fc1.weight  # xavier_uniform bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max().item() <= math.sqrt(6 / sum(w.shape)) + 1e-6
    assert not hasattr(model.token_emb, "position_ids")


def test_block_matches_manual_attention():
    torch.manual_seed(0)
    blk = Block(32, 4).eval()
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 5, 32)
    h = F.layer_norm(x, (32,), blk.norm1.weight, blk.norm1.bias, 1e-6)
    q, k, v = (h @ blk.attn.qkv.weight.t() + blk.attn.qkv.bias).view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, -1)
    y = x + ((a @ v).transpose(1, 2).reshape(2, 5, 32) @ blk.attn.proj.weight.t() + blk.attn.proj.bias)
    h = F.layer_norm(y, (32,), blk.norm2.weight, blk.norm2.bias, 1e-6)
    y = y + F.gelu(h @ blk.mlp.fc1.weight.t() + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.t() + blk.mlp.fc2.bias
    assert torch.allclose(blk(x), y, atol=1e-5)


# ----------------------------------------------------------------------------------- forward pass
def test_encoder_decoder_shapes(model):
    c = model.config
    tokens = torch.randint(0, 64, (3, 16))
    ratio, drop, mask = sample_masks(model, 3, gen())
    latent = model.forward_encoder(tokens, mask, drop)
    assert latent.shape == (3, 1 + 16 - 8, 32)  # ceil(16 x 0.5) dropped
    logits = model.forward_decoder(latent, mask, drop)
    assert logits.shape == (3, 17, c.vocab_size)
    assert model.forward_encoder(tokens).shape == (3, 17, 32)
    assert torch.equal(model(tokens.view(3, 4, 4), mask, drop), logits)  # [B, h, w] tokens accepted


def test_cls_token_is_never_masked_and_masked_ids_are_ignored(model):
    tokens = torch.randint(0, 64, (2, 16))
    everything = torch.ones(2, 16, dtype=torch.bool)
    emb = model.embed(tokens, everything)
    ids = torch.tensor([[model.config.cls_id] + [model.config.mask_id] * 16] * 2)
    assert torch.allclose(emb, model.token_emb(ids))
    _, drop, mask = sample_masks(model, 2, gen(1))
    other = torch.where(mask, torch.randint(0, 64, (2, 16)), tokens)  # change only masked tokens
    assert torch.equal(model(tokens, mask, drop), model(other, mask, drop))


def test_decoder_pads_all_masked_positions_with_the_c_feature(model):
    """Masked-but-kept encoder outputs are discarded: the decoder input there is the [C] feature."""
    _, drop, mask = sample_masks(model, 2, gen(2))
    assert (mask & ~drop).any()
    latent = torch.randn(2, 1 + 16 - 8, 32)
    logits = model.forward_decoder(latent, mask, drop)
    keep = ~torch.cat([torch.zeros(2, 1, dtype=torch.bool), drop], 1)
    masked_kept = torch.cat([torch.zeros(2, 1, dtype=torch.bool), mask], 1)[keep].view(2, -1)
    changed = latent.clone()
    changed[masked_kept] += 5.0
    assert torch.equal(model.forward_decoder(changed, mask, drop), logits)
    visible = ~masked_kept
    visible[:, 0] = False
    changed = latent.clone()
    changed[visible] += 5.0
    assert not torch.allclose(model.forward_decoder(changed, mask, drop), logits)


def test_dropping_changes_only_what_the_encoder_sees(model):
    """With nothing dropped, the masked positions are in the encoder input; dropped, they are removed."""
    tokens = torch.randint(0, 64, (1, 16))
    _, drop, mask = sample_masks(model, 1, gen(3))
    full = model(tokens, mask, None)
    dropped = model(tokens, mask, drop)
    assert full.shape == dropped.shape and not torch.allclose(full, dropped)


# ------------------------------------------------------------------------------------------ loss
def test_loss_at_init_is_log_codebook_size():
    """official MAGE: about ln 1024 = 6.93 at init (measured on the official code: 6.94), label smoothing included."""
    torch.manual_seed(0)
    m = MAGE(tiny_config(codebook_size=1024, vocab_layout="official"))
    loss, logs = pretrain_loss(m, torch.randint(0, 1024, (8, 16)), gen())
    assert loss.item() == pytest.approx(6.94, abs=0.05)
    assert 0.5 <= logs["mask_ratio"].item() <= 1.0 and 0 <= logs["acc"].item() <= 1
    torch.manual_seed(0)
    m = MAGE(tiny_config())
    assert pretrain_loss(m, torch.randint(0, 64, (8, 16)), gen())[0].item() == pytest.approx(math.log(64), abs=0.05)


def test_loss_is_label_smoothed_ce_over_all_masked_tokens(model):
    tokens = torch.randint(0, 64, (4, 16))
    loss, logs = pretrain_loss(model, tokens, gen(7))
    ratio, drop, mask = sample_masks(model, 4, gen(7))
    assert torch.all(ratio == ratio[0])  # one ratio per batch (official)
    logits = model(tokens, mask, drop)[:, 1:, :64]
    logp = logits.log_softmax(-1)
    per = 0.9 * -logp.gather(-1, tokens[..., None])[..., 0] + 0.1 * -logp.mean(-1)
    assert loss.item() == pytest.approx(per[mask].mean().item(), abs=1e-5)  # dropped ones included
    acc = (logits.argmax(-1) == tokens)[mask].float().mean()
    assert logs["acc"].item() == pytest.approx(acc.item()) and logs["mask_ratio"].item() == pytest.approx(ratio[0])


def test_ratio_per_sample():
    torch.manual_seed(0)
    m = MAGE(tiny_config(token_grid=8, image_size=64))
    ratio, drop, mask = sample_masks(m, 16, gen(), ratio_per_sample=True)
    assert len(set(ratio.tolist())) == 16
    assert mask.sum(1).tolist() == [math.ceil(64 * r) for r in ratio.tolist()] and drop.sum(1).eq(32).all()


def test_every_parameter_gets_a_gradient_and_the_output_matrix_is_detached(model):
    model.train()
    loss, _ = pretrain_loss(model, torch.randint(0, 64, (2, 16)), gen())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # the word embeddings get gradient from the input side only: rows of unused ids get none
    used = {model.config.cls_id, model.config.mask_id}
    grad = model.token_emb.word_embeddings.weight.grad
    unused_rows = [i for i in range(model.config.vocab_size) if i not in used]
    assert grad[unused_rows].abs().sum() == 0 and grad[sorted(used)].abs().sum() > 0


def test_tiny_model_learns():
    torch.manual_seed(0)
    m = MAGE(tiny_config(dropout=0.0))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    tokens = (torch.arange(16) * 5 % 64).expand(8, 16)  # one fixed pattern: learnable from positions
    first = None
    for step in range(100):
        loss, logs = pretrain_loss(m, tokens, gen(step))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0 and logs["acc"].item() > 0.9


# -------------------------------------------------------------------------------------- features
def test_forward_features_pools(model):
    tokens = torch.randint(0, 64, (2, 16))
    x = model.token_emb(torch.cat([torch.full((2, 1), model.config.cls_id), tokens], 1))
    for blk in model.blocks:
        x = blk(x)
    mean = F.layer_norm(x[:, 1:].mean(1), (32,), eps=1e-6)  # before the final norm, no affine
    assert torch.allclose(model.forward_features(tokens), mean, atol=1e-6)
    assert torch.allclose(model.forward_features(tokens, pool="cls"), model.norm(x)[:, 0], atol=1e-6)
    assert torch.allclose(model.forward_features(tokens.view(2, 4, 4), pool="none"), model.norm(x), atol=1e-6)
    with pytest.raises(ValueError):
        model.forward_features(tokens, pool="max")
    with pytest.raises(UserError, match="no tokenizer"):
        model.forward_features(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="16 tokens"):
        model.forward_features(torch.randint(0, 64, (2, 25)))


# ------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_travels_with_the_model_but_is_not_part_of_it(model, tmp_path):
    tok = tiny_tokenizer()
    n_params, n_state = len(list(model.parameters())), len(model.state_dict())
    model.tokenizer = tok  # attribute assignment does not register a sub-module
    assert model.tokenizer is tok and "tokenizer" not in dict(model.named_children())
    assert len(list(model.parameters())) == n_params and len(model.state_dict()) == n_state
    assert not any(p.requires_grad for p in tok.parameters()) and not tok.training
    model.train()
    assert not tok.training
    model.to(torch.float64)
    assert tok.encoder.conv_in.weight.dtype == torch.float64
    model.to(torch.float32)
    images = torch.rand(2, 3, 32, 32)
    codes = tok.encode(images)
    model.eval()
    assert torch.equal(model.forward_features(images), model.forward_features(codes))
    assert pretrain_loss(model, images, gen())[0].item() == pretrain_loss(model, codes, gen())[0].item()
    assert model.decode_tokens(codes.view(2, 16)).shape == (2, 3, 32, 32)

    out = save_pretrained(model, tmp_path / "mage")
    assert (out / "tokenizer" / "model.safetensors").is_file() and (out / "model.safetensors").is_file()
    loaded = from_pretrained(out)
    assert isinstance(loaded, MAGE) and not loaded.training and loaded.tokenizer is not None
    for k, v in tok.state_dict().items():
        assert torch.equal(loaded.tokenizer.state_dict()[k], v), k
    assert torch.equal(loaded.forward_features(images), model.forward_features(images))
    # saving without a tokenizer removes a stale one
    model.tokenizer = None
    save_pretrained(model, out)
    assert not (out / "tokenizer").exists() and from_pretrained(out).tokenizer is None


def test_tokenizer_must_fit(model):
    with pytest.raises(UserError, match="codes"):
        model.set_tokenizer(tiny_tokenizer(codebook_size=32))
    wrong_grid = VQGAN(VQGANConfig(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=16, codebook_size=64))
    with pytest.raises(UserError, match="grid"):
        model.set_tokenizer(wrong_grid)
