"""The official MAE checkpoint converter: both released layouts (from the reference key lists), every tensor used once,
the converted encoder checked against a re-statement of the official forward pass, clear errors otherwise."""
import json
from pathlib import Path

import pytest
import torch

from maskgen.convert.mae import convert_mae
from maskgen.errors import UserError
from maskgen.models import from_pretrained
from maskgen.models.mae import MAE, MAEConfig, patchify

from conftest import run_cli
from test_convert_mage import _block, _ln

REF = Path(__file__).resolve().parents[3] / "shared" / "reference" / "checkpoints"


def official_state_dict(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the keys and shapes of the official ViT-B file (`kind`: encoder / full)."""
    spec = json.loads((REF / f"official_mae_vitb_{kind}_state_dict.json").read_text())
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.02 for k, (shape, _) in spec.items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind,count", [("encoder", 150), ("full", 254)])
def test_official_layouts_convert_tensor_for_tensor(kind, count, tmp_path):
    sd = official_state_dict(kind)
    assert len(sd) == count
    torch.save({"model": sd, "epoch": 1599}, tmp_path / "mae.pth")
    out = convert_mae(tmp_path / "mae.pth", tmp_path / "out")
    model = from_pretrained(out)
    c = model.config
    assert (c.image_size, c.patch_size, c.embed_dim, c.depth, c.num_heads) == (224, 16, 768, 12, 12)
    assert (c.decoder_depth, c.decoder_embed_dim, c.decoder_num_heads) == ((8, 512, 16) if kind == "full" else (0, 512, 16))
    state = model.state_dict()
    assert set(state) == set(sd)  # every official tensor lands once, nothing else exists
    assert all(torch.equal(state[k], sd[k]) for k in sd)
    if kind == "full":
        recon, _ = model.masked_reconstruction(torch.rand(1, 3, 224, 224), 0.75, torch.Generator().manual_seed(0))
        assert recon.shape == (1, 3, 224, 224)


def test_converted_encoder_computes_the_official_forward(tmp_path):
    """A small model in the official layout (names pinned by the test above), converted, against MAE's
    `forward_encoder` with nothing masked re-stated in float64 from the raw tensors."""
    torch.manual_seed(0)
    cfg = MAEConfig(image_size=32, patch_size=8, embed_dim=768, depth=2, num_heads=12, decoder_embed_dim=512,
                    decoder_depth=1, decoder_num_heads=16)
    raw = {k: v + 0.01 * torch.randn_like(v) for k, v in MAE(cfg).state_dict().items()}  # pos tables perturbed too
    torch.save({"model": raw}, tmp_path / "mae.pth")
    model = from_pretrained(convert_mae(tmp_path / "mae.pth", tmp_path / "out")).double()
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    sd = {k: v.double() for k, v in raw.items()}
    x = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    w = sd["patch_embed.proj.weight"]  # [D, 3, p, p]: a conv with stride p == patches (c, p, p order) @ W^T
    patches = x.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(2, 16, -1)
    h = patches @ w.reshape(768, -1).t() + sd["patch_embed.proj.bias"] + sd["pos_embed"][:, 1:]
    h = torch.cat([(sd["cls_token"] + sd["pos_embed"][:, :1]).expand(2, -1, -1), h], 1)
    for i in range(2):
        h = _block(sd, f"blocks.{i}.", h, 12)
    ref = _ln(h, sd["norm.weight"], sd["norm.bias"], 1e-6)
    torch.testing.assert_close(model.forward_features(images, "none"), ref, atol=1e-9, rtol=1e-9)
    assert patchify(images, 8).shape == (2, 16, 192)


def test_bad_checkpoints_name_the_first_bad_key(tmp_path):
    torch.manual_seed(0)
    cfg = MAEConfig(image_size=32, patch_size=8, embed_dim=768, depth=1, num_heads=12, decoder_depth=0)
    good = MAE(cfg).state_dict()
    cases = {
        "missing": ({k: v for k, v in good.items() if k != "blocks.0.attn.qkv.bias"}, "missing: blocks.0.attn.qkv.bias"),
        "unexpected": ({**good, "blocks.0.extra.weight": torch.zeros(3)}, "unexpected: blocks.0.extra.weight"),
        "shape": ({**good, "norm.weight": torch.zeros(5)}, "norm.weight [5]"),
        "width": ({**good, "patch_embed.proj.weight": torch.zeros(40, 3, 8, 8)}, "no official MAE has width 40"),
        "not mae": ({"token_emb.word_embeddings.weight": torch.zeros(3, 4)}, "not an MAE checkpoint"),
    }
    for name, (sd, message) in cases.items():
        torch.save({"model": sd}, tmp_path / f"{name}.pth")
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
            convert_mae(tmp_path / f"{name}.pth", tmp_path / f"out-{name}")
    # a fine-tuning head beside the encoder is not part of it: dropped
    torch.save({"model": {**good, "head.weight": torch.zeros(1000, 768), "head.bias": torch.zeros(1000),
                          "fc_norm.weight": torch.ones(768), "fc_norm.bias": torch.zeros(768)}}, tmp_path / "h.pth")
    assert set(from_pretrained(convert_mae(tmp_path / "h.pth", tmp_path / "out-h")).state_dict()) == set(good)


def test_convert_and_reconstruct_cli(tmp_path):
    torch.manual_seed(0)
    cfg = MAEConfig(image_size=32, patch_size=8, embed_dim=768, depth=1, num_heads=12, decoder_embed_dim=64,
                    decoder_depth=1, decoder_num_heads=16)
    full = MAE(cfg).state_dict()
    torch.save({"model": full}, tmp_path / "full.pth")
    torch.save({"model": {k: v for k, v in full.items() if not k.startswith(("decoder", "mask_token"))}},
               tmp_path / "enc.pth")
    run_cli("convert", "mae", "--src", tmp_path / "full.pth", "--out", tmp_path / "full", "--target", "pixels",
            check=True)
    run_cli("convert", "mae", "--src", tmp_path / "enc.pth", "--out", tmp_path / "enc", check=True)
    assert from_pretrained(tmp_path / "full").config.norm_pix_loss is False
    from PIL import Image
    Image.new("RGB", (50, 40), (30, 120, 200)).save(tmp_path / "in.png")
    run_cli("reconstruct", "--ckpt", tmp_path / "full", "--image", tmp_path / "in.png", "--out", tmp_path / "r.png",
            "--mask-ratio", "0.5", check=True)
    panel = Image.open(tmp_path / "r.png")
    assert panel.size == (4 * 32 + 5 * 2, 32 + 2 * 2)  # input | masked | reconstruction | pasted, padding 2
    bad = run_cli("reconstruct", "--ckpt", tmp_path / "enc", "--image", tmp_path / "in.png", "--out", tmp_path / "e.png")
    assert bad.returncode == 2 and "no decoder" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("reconstruct", "--ckpt", tmp_path / "full", "--image", tmp_path / "in.png", "--out", tmp_path / "e.png",
                  "--mask-ratio", "1")
    assert bad.returncode == 2 and "--mask-ratio" in bad.stderr
