"""The official MAGE checkpoint converter, checked against a plain re-statement of the official forward pass."""
import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from maskgen.convert.mage import DROPPED_KEYS, convert_mage, split_state_dict
from maskgen.engine.optim import param_groups
from maskgen.errors import UserError
from maskgen.masking import token_masks
from maskgen.models.mage import MAGE, MAGEConfig
from maskgen.models.vqgan import VQGAN, VQGANConfig
from maskgen.models import from_pretrained

SPEC = Path(__file__).resolve().parents[3] / "shared" / "reference" / "checkpoints" / "official_mage_vitb_state_dict.json"
DEAD = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "mask_token",
        "decoder_pos_embed", "decoder_pred.weight", "decoder_pred.bias", "token_emb.position_ids"}


# ------------------------------------------------------------------ the reference, from raw tensors
def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _linear(sd, name, x):
    return x @ sd[name + ".weight"].t() + sd[name + ".bias"]


def _block(sd, p, x, heads):
    b, n, d = x.shape
    h = _ln(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
    qkv = _linear(sd, p + "attn.qkv", h).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    att = q @ k.transpose(-2, -1) * (d // heads) ** -0.5
    att = torch.exp(att - att.max(-1, keepdim=True).values)
    att = att / att.sum(-1, keepdim=True)
    x = x + _linear(sd, p + "attn.proj", (att @ v).transpose(1, 2).reshape(b, n, d))
    h = _ln(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
    return x + _linear(sd, p + "mlp.fc2", _gelu(_linear(sd, p + "mlp.fc1", h)))


def reference_logits(raw, tokens, mask, drop_mask, heads, dec_heads):
    """The official models_mage.py forward (LTH14/mage), eval mode, in float64 from the raw
    official state dict: [C0] = codebook + 76 (1100), [MASK] = vocab - 1."""
    sd = {k: v.double() for k, v in raw.items() if v.is_floating_point()}
    word = sd["token_emb.word_embeddings.weight"]
    vocab = word.shape[0]
    codebook = vocab - 1001
    b, n = tokens.shape
    ids = tokens.clone()
    ids[mask] = vocab - 1
    ids = torch.cat([torch.full((b, 1), codebook + 1100 - 1024), ids], 1)
    x = word[ids] + sd["token_emb.position_embeddings.weight"][: n + 1]
    x = _ln(x, sd["token_emb.LayerNorm.weight"], sd["token_emb.LayerNorm.bias"], 1e-6)
    keep = torch.cat([torch.ones(b, 1, dtype=torch.bool), ~drop_mask], 1)
    x = x[keep].reshape(b, -1, x.shape[-1])
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        x = _block(sd, f"blocks.{i}.", x, heads)
        i += 1
    x = _ln(x, sd["norm.weight"], sd["norm.bias"], 1e-6)
    x = _linear(sd, "decoder_embed", x)
    padded = x[:, 0:1].repeat(1, n + 1, 1)
    padded[keep] = x.reshape(-1, x.shape[-1])
    all_mask = torch.cat([torch.zeros(b, 1, dtype=torch.bool), mask], 1)
    x = torch.where(all_mask[..., None], x[:, 0:1].repeat(1, n + 1, 1), padded)
    x = x + sd["decoder_pos_embed_learned"]
    i = 0
    while f"decoder_blocks.{i}.norm1.weight" in sd:
        x = _block(sd, f"decoder_blocks.{i}.", x, dec_heads)
        i += 1
    x = _ln(x, sd["decoder_norm.weight"], sd["decoder_norm.bias"], 1e-6)
    h = _ln(_gelu(_linear(sd, "mlm_layer.fc", x)), sd["mlm_layer.ln.weight"], sd["mlm_layer.ln.bias"], 1e-5)
    return h @ word.t() + sd["mlm_layer.bias"]


# -------------------------------------------------------------------------------- state dicts
def official_vitb_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Exactly the JSON's keys, shapes and dtypes: random floats (std 0.02), arange for int64 (as
    shared/checks/mage writes its test checkpoint)."""
    g = torch.Generator().manual_seed(seed)
    spec = json.loads(SPEC.read_text())
    return {k: torch.arange(s[-1]).expand(*s).clone() if dt == "int64" else torch.randn(s, generator=g) * 0.02
            for k, (s, dt) in spec.items()}


def tiny_official_state_dict(seed: int = 0, dim: int = 32, grid: int = 4) -> dict[str, torch.Tensor]:
    """A small state dict in the official layout (dead tensors and `vqgan.*` included), random values."""
    cfg = MAGEConfig(image_size=grid * 8, token_grid=grid, codebook_size=16, vocab_layout="official",
                     embed_dim=dim, depth=2, num_heads=2, decoder_embed_dim=dim, decoder_depth=1,
                     decoder_num_heads=4)
    with torch.device("meta"):
        model = MAGE(cfg)
        tok = VQGAN(VQGANConfig(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1, z_channels=8, codebook_size=16))
    n = grid * grid + 1
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    shapes.update({"cls_token": (1, 1, dim), "pos_embed": (1, n, dim), "mask_token": (1, 1, dim),
                   "decoder_pos_embed": (1, n, dim), "patch_embed.proj.weight": (dim, 3, 16, 16),
                   "patch_embed.proj.bias": (dim,), "decoder_pred.weight": (768, dim),
                   "decoder_pred.bias": (768,)})
    shapes.update({f"vqgan.{k}": v.shape for k, v in tok.state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}
    sd["token_emb.position_ids"] = torch.arange(n)[None]
    return sd


def masks(batch, length, ratio, drop, seed=0):
    return token_masks(batch, length, ratio, drop, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ tiny layout
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    sd = tiny_official_state_dict()
    src = tmp_path_factory.mktemp("src") / "mage-tiny.pth"
    torch.save({"model": sd}, src)
    out = convert_mage(src, tmp_path_factory.mktemp("out") / "mage", num_heads=2, decoder_num_heads=4)
    return sd, from_pretrained(out)


def test_tiny_conversion_matches_the_reference(tiny):
    sd, model = tiny
    assert isinstance(model, MAGE) and not model.training and model.tokenizer is not None
    c = model.config
    assert (c.embed_dim, c.depth, c.decoder_depth, c.token_grid, c.codebook_size, c.image_size, c.vocab_layout) == \
        (32, 2, 1, 4, 16, 32, "official")
    tokens = torch.randint(0, 16, (3, 16), generator=torch.Generator().manual_seed(1))
    cases = [masks(3, 16, 0.75, 8), (torch.zeros(3, 16, dtype=torch.bool),) * 2,
             (torch.zeros(3, 16, dtype=torch.bool), masks(3, 16, 0.5, 0, seed=2)[1])]
    with torch.no_grad():
        for drop, mask in cases:
            ref = reference_logits(sd, tokens, mask, drop, 2, 4)
            ours = model(tokens, mask, drop).double()
            assert ours.shape == ref.shape == (3, 17, 16 + 1001)
            assert (ours - ref).abs().max().item() < 1e-4


def test_converter_drops_exactly_the_dead_tensors():
    keys = json.loads(SPEC.read_text())
    model_sd, tok_sd, dropped = split_state_dict(dict.fromkeys(keys, torch.zeros(1)))
    assert set(dropped) == DEAD and len(tok_sd) == 168 and len(model_sd) == 256
    assert set(DROPPED_KEYS) < DEAD


@pytest.mark.parametrize("change, message", [
    ("unexpected", "unexpected: blocks.0.attn.extra"),
    ("missing", "missing: norm.weight"),
    ("shape", "wrong shape/dtype: decoder_embed.bias"),
    ("vqgan-missing", "no tokenizer"),
    ("vqgan-broken", "tokenizer"),
    ("width", "num_heads"),
    ("vocab", "official layout"),
])
def test_converter_refuses_mismatches(tmp_path, change, message):
    sd = tiny_official_state_dict()
    heads = {"num_heads": 2, "decoder_num_heads": 4}
    if change == "unexpected":
        sd["blocks.0.attn.extra"] = torch.zeros(3)
    elif change == "missing":
        del sd["norm.weight"]
    elif change == "shape":
        sd["decoder_embed.bias"] = torch.zeros(7)
    elif change == "vqgan-missing":
        sd = {k: v for k, v in sd.items() if not k.startswith("vqgan.")}
    elif change == "vqgan-broken":
        del sd["vqgan.decoder.conv_out.bias"]
    elif change == "width":
        heads = {}
    elif change == "vocab":
        sd["token_emb.word_embeddings.weight"] = torch.zeros(40, 32)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match=message):
        convert_mage(tmp_path / "bad.pth", tmp_path / "out", **heads)


class _Payload:
    """Unpickling this runs code: what a malicious checkpoint would hold."""

    def __reduce__(self):
        return (print, ("this must never be printed",))


def test_converter_refuses_pickle_payloads_and_accepts_bare_state_dicts(tmp_path, capsys):
    sd = tiny_official_state_dict()
    torch.save({"model": sd, "args": _Payload()}, tmp_path / "pickled.pth")
    with pytest.raises(UserError, match="refusing"):
        convert_mage(tmp_path / "pickled.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists() and "never" not in capsys.readouterr().out
    torch.save(sd, tmp_path / "bare.pth")
    model = from_pretrained(convert_mage(tmp_path / "bare.pth", tmp_path / "out2", num_heads=2, decoder_num_heads=4))
    assert torch.equal(model.state_dict()["mlm_layer.bias"], sd["mlm_layer.bias"])
    with pytest.raises(UserError, match="not a MAGE checkpoint"):
        torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}}, tmp_path / "tok.pth")
        convert_mage(tmp_path / "tok.pth", tmp_path / "out3")


def test_converter_reads_a_checkpoint_as_the_official_training_script_writes_it(tmp_path):
    """main_pretrain.py saves {'model', 'optimizer', 'epoch', 'scaler', 'args'}: `args` is a pickled Namespace
    (with numpy scalars in it where the arguments came from numpy), which safe loading allows, nothing else."""
    import numpy as np

    sd = tiny_official_state_dict()
    args = argparse.Namespace(model="mage_vit_base_patch16", batch_size=64, blr=np.float64(1.5e-4),
                              mask_ratio_min=0.5, epochs=np.int64(1600), norm_pix_loss=np.bool_(False))
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 1599, "scaler": {},
                "args": args}, tmp_path / "official.pth")
    model = from_pretrained(convert_mage(tmp_path / "official.pth", tmp_path / "out", num_heads=2,
                                         decoder_num_heads=4))
    assert torch.equal(model.state_dict()["mlm_layer.bias"], sd["mlm_layer.bias"])


# ------------------------------------------------------------------------- the official ViT-B layout
@pytest.fixture(scope="module")
def vitb(tmp_path_factory):
    sd = official_vitb_state_dict()
    src = tmp_path_factory.mktemp("src") / "mage-vitb-1600.pth"
    torch.save({"model": sd}, src)
    out = convert_mage(src, tmp_path_factory.mktemp("out") / "mage-vitb")
    src.unlink()
    return sd, out, from_pretrained(out)


def test_vitb_conversion(vitb):
    sd, out, model = vitb
    assert (out / "model.safetensors").is_file() and (out / "tokenizer" / "model.safetensors").is_file()
    c = model.config
    assert (c.depth, c.embed_dim, c.num_heads, c.decoder_depth, c.decoder_embed_dim, c.decoder_num_heads) == \
        (12, 768, 12, 8, 768, 16)
    assert (c.token_grid, c.image_size, c.codebook_size, c.vocab_size, c.cls_id, c.mask_id, c.mlp_ratio) == \
        (16, 256, 1024, 2025, 1100, 2024, 4.0)
    state = model.state_dict()
    assert set(state) == {k for k in sd if not k.startswith("vqgan.") and k not in DEAD}
    assert all(torch.equal(state[k], sd[k]) for k in state)
    tok = model.tokenizer.state_dict()
    assert all(torch.equal(v, sd[f"vqgan.{k}"]) for k, v in tok.items()) and len(tok) == 168
    decay, no_decay = param_groups(model, 0.05)
    assert (len(decay["params"]), len(no_decay["params"])) == (85, 171)


def test_vitb_logits_match_the_reference(vitb):
    """Batch 1, one training-style mask (ratio 0.7: 180 masked, 128 of them dropped)."""
    sd, _, model = vitb
    tokens = torch.randint(0, 1024, (1, 256), generator=torch.Generator().manual_seed(0))
    drop, mask = masks(1, 256, 0.7, 128)
    with torch.no_grad():
        ours = model(tokens, mask, drop)
    ref = reference_logits(sd, tokens, mask, drop, 12, 16)
    assert ours.shape == (1, 257, 2025)
    assert (ours.double() - ref).abs().max().item() < 1e-4


def test_vitb_features_from_images(vitb):
    """shared/checks/mage: the loaded folder takes IMAGES [1, 3, 256, 256] and tokenizes them itself."""
    _, _, model = vitb
    with torch.no_grad():
        f = model.forward_features(torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)))
    assert f.shape == (1, 768) and torch.isfinite(f).all()


# ------------------------------------------------------------------ unchanged behaviour across refactors
# Recorded from main at 8e412b6, before the house rebuild (issue 13): a converted official-layout MAGE (dim 16,
# heads 2 / 4, grid 4, 16 codes), its values drawn from seed 0 in sorted key order, on these tokens and masks.
RECORDED_TOKENS = [[5, 11, 12, 8, 15, 9, 11, 5, 15, 0, 0, 1, 12, 7, 13, 12],
                   [6, 9, 2, 4, 14, 5, 2, 4, 11, 12, 10, 12, 13, 14, 2, 4]]
RECORDED_MASK = [[1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0]]
RECORDED_DROP = [[0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1, 1, 1, 1, 0]]
RECORDED_FREE_MASK = [[0, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0],
                      [0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]]
RECORDED = {
    "train_sum": [48.625163450604305, 48.243887457065284],  # logits [2, 17, 1017], summed per sample
    "train_abs_sum": [7637.091761430493, 7636.1323812184855],
    "train_0_first": [[0.5647133588790894, -0.460773229598999, -0.7160478830337524],  # [0, :4, :3]
                      [0.5483286380767822, -0.4467317461967468, -0.6978514194488525],
                      [0.6367908120155334, -0.42659735679626465, -0.7325646281242371],
                      [0.5773065090179443, -0.3065158724784851, -0.5596795082092285]],
    "train_1_last": [0.5540722012519836, 0.5801599621772766, 0.33323684334754944],  # [1, 16, -3:]
    "free_first": [[0.5634896159172058, -0.4615650773048401, -0.7189855575561523, -0.1066342443227768],  # [0, :3, :4]
                   [0.5513536334037781, -0.4505224823951721, -0.7172446846961975, -0.04254639148712158],
                   [0.6291916966438293, -0.41849538683891296, -0.7305350303649902, -0.10354194045066833]],
    "free_sum": -9.086371025070548,  # codebook logits [2, 17, 16] without dropping, summed
    "features_first": [[-0.5724581480026245, -0.8739931583404541, -0.1819583922624588, 1.5331987142562866],
                       [-0.5592019557952881, -0.7353305816650391, -0.20690232515335083, 1.5877004861831665]],
    "features_abs_sum": [14.109944969415665, 14.030594393610954],
}


def seeded_official_state_dict(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random official-layout tensors (std 0.3) drawn in sorted key order, so that they depend only on the key ->
    shape list and the seed; `token_emb.position_ids` is an arange."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shapes[k], generator=g) * 0.3 for k in sorted(shapes) if k != "token_emb.position_ids"}
    sd["token_emb.position_ids"] = torch.arange(shapes["token_emb.position_ids"][-1])[None]
    return sd


def test_logits_equal_the_numbers_recorded_before_the_house_rebuild(tmp_path):
    shapes = {k: list(v.shape) for k, v in tiny_official_state_dict(dim=16).items()}
    torch.save({"model": seeded_official_state_dict(shapes)}, tmp_path / "mage.pth")
    model = from_pretrained(convert_mage(tmp_path / "mage.pth", tmp_path / "out", num_heads=2, decoder_num_heads=4))
    tokens = torch.tensor(RECORDED_TOKENS)
    mask, drop, free = (torch.tensor(m, dtype=torch.bool) for m in (RECORDED_MASK, RECORDED_DROP, RECORDED_FREE_MASK))
    with torch.no_grad():
        train = model(tokens, mask, drop).double()
        free_logits = model(tokens, free)[..., :16].double()
        features = model.forward_features(tokens).double()
    assert train.shape == (2, 17, 16 + 1001)
    assert train.sum(dim=(1, 2)).tolist() == pytest.approx(RECORDED["train_sum"], abs=1e-3)
    assert train.abs().sum(dim=(1, 2)).tolist() == pytest.approx(RECORDED["train_abs_sum"], rel=1e-6)
    assert train[0, :4, :3].tolist() == [pytest.approx(r, abs=1e-5) for r in RECORDED["train_0_first"]]
    assert train[1, 16, -3:].tolist() == pytest.approx(RECORDED["train_1_last"], abs=1e-5)
    assert free_logits[0, :3, :4].tolist() == [pytest.approx(r, abs=1e-5) for r in RECORDED["free_first"]]
    assert free_logits.sum().item() == pytest.approx(RECORDED["free_sum"], abs=1e-4)
    assert features[:, :4].tolist() == [pytest.approx(r, abs=1e-5) for r in RECORDED["features_first"]]
    assert features.abs().sum(1).tolist() == pytest.approx(RECORDED["features_abs_sum"], rel=1e-6)
