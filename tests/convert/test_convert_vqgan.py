import json
import os
import re
from pathlib import Path

import pytest
import torch

from maskgen.convert.vqgan import convert_vqgan
from maskgen.errors import UserError
from maskgen.models.vqgan import VQGAN, VQGANConfig
from maskgen.models import from_pretrained

SPEC = Path(__file__).resolve().parents[3] / "shared" / "reference" / "checkpoints" / \
    "official_mage_tokenizer_state_dict.json"


def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the official tokenizer's keys, shapes and dtypes (in the file's order)."""
    g = torch.Generator().manual_seed(seed)
    spec = json.loads(SPEC.read_text())
    return {k: torch.randn(shape, generator=g) * 0.05 for k, (shape, dtype) in spec.items() if dtype == "float32"}


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    out = official_state_dict()
    assert len(out) == 168
    return out


@pytest.fixture(scope="module")
def converted(sd, tmp_path_factory) -> VQGAN:
    src = tmp_path_factory.mktemp("src") / "vqgan_jax_strongaug.ckpt"
    torch.save({"state_dict": sd}, src)
    out = tmp_path_factory.mktemp("out") / "tokenizer"
    assert convert_vqgan(src, out) == out
    return from_pretrained(out)


def test_convert_round_trip(sd, converted):
    assert isinstance(converted, VQGAN) and not converted.training
    cfg = converted.config
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.codebook_size, cfg.in_channels) == \
        (128, [1, 1, 2, 2, 4], 2, 256, 1024, 3)
    state = converted.state_dict()
    assert state.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(state[k], v), k


def test_converted_model_encodes_and_decodes(sd, converted):
    x = torch.rand(1, 3, 64, 64)  # f = 16 (256 px is covered by tests/models/test_vqgan.py)
    with torch.no_grad():
        z = converted.encode_latent(x)
        codes = converted.encode(x)
        assert z.shape == (1, 256, 4, 4) and codes.shape == (1, 4, 4) and codes.dtype == torch.long
        # the codes are the nearest rows of the source codebook to the encoder output
        flat = z[0].flatten(1).t().double()
        assert torch.equal(codes.flatten(), torch.cdist(flat, sd["quantize.embedding.weight"].double()).argmin(1))
        assert converted.decode(codes).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("wrap", ["bare", "mage"])
def test_other_containers(sd, tmp_path, wrap):
    src = tmp_path / "in.pth"
    if wrap == "bare":
        torch.save(sd, src)
    else:  # a MAGE model checkpoint: the tokenizer under "vqgan.", other tensors ignored
        torch.save({"model": {"blocks.0.norm1.weight": torch.ones(768),
                              **{f"vqgan.{k}": v for k, v in sd.items()}}}, src)
    model = from_pretrained(convert_vqgan(src, tmp_path / "out"))
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_small_layout_is_inferred(tmp_path):
    torch.manual_seed(0)
    ref = VQGAN(VQGANConfig(ch=32, ch_mult=[1, 2, 2], num_res_blocks=3, z_channels=64, codebook_size=512))
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "small.ckpt")
    model = from_pretrained(convert_vqgan(tmp_path / "small.ckpt", tmp_path / "out"))
    assert model.config == ref.config
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(model.encode(x), ref.encode(x))


def _write(tmp_path, sd) -> Path:
    src = tmp_path / "bad.ckpt"
    torch.save({"state_dict": sd}, src)
    return src


@pytest.mark.parametrize("key", ["decoder.up.3.block.0.nin_shortcut.weight", "quantize.embedding.weight",
                                 "encoder.conv_in.weight", "encoder.mid.block_2.norm1.bias"])
def test_missing_key_is_refused(sd, tmp_path, key):
    bad = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(UserError, match=re.escape(key)):
        convert_vqgan(_write(tmp_path, bad), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["encoder.conv_in.bias", "loss.discriminator.main.0.weight",
                                 "encoder.down.0.block.1.nin_shortcut.weight"])
def test_extra_key_is_refused(sd, tmp_path, key):
    with pytest.raises(UserError, match=f"unexpected.*{re.escape(key)}"):
        convert_vqgan(_write(tmp_path, {**sd, key: torch.zeros(128)}), tmp_path / "out")


@pytest.mark.parametrize("key, shape", [("decoder.up.3.block.0.nin_shortcut.weight", [256, 256, 3, 3]),
                                        ("decoder.conv_out.bias", [4]),
                                        ("encoder.down.2.block.0.nin_shortcut.weight", [256, 128, 1, 1])])
def test_wrong_shape_is_refused(sd, tmp_path, key, shape):
    with pytest.raises(UserError, match=re.escape(f"{key} {shape}")):
        convert_vqgan(_write(tmp_path, {**sd, key: torch.zeros(shape)}), tmp_path / "out")


def test_impossible_shapes_are_refused(sd, tmp_path):
    with pytest.raises(UserError, match=r"not multiples of ch=100 \(encoder\.conv_in\.weight\)"):
        convert_vqgan(_write(tmp_path, {**sd, "encoder.conv_in.weight": torch.zeros(100, 3, 3, 3)}), tmp_path / "o")
    # the official code hard-codes 32 GroupNorm groups: 16 channels cannot come from it
    narrow = VQGAN(VQGANConfig(ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, codebook_size=8, norm_groups=8))
    with pytest.raises(UserError, match="channel count 16 .* norm_groups=32"):
        convert_vqgan(_write(tmp_path, narrow.state_dict()), tmp_path / "o")
    with pytest.raises(UserError, match="not tensors"):
        convert_vqgan(_write(tmp_path, {**sd, "step": 3}), tmp_path / "o")
    torch.save({"model": {"blocks.0.norm1.weight": torch.ones(4)}}, tmp_path / "mage.pth")
    with pytest.raises(UserError, match="no 'vqgan"):
        convert_vqgan(tmp_path / "mage.pth", tmp_path / "o")
    with pytest.raises(UserError, match="no such file"):
        convert_vqgan(tmp_path / "absent.ckpt", tmp_path / "o")


class _Payload:
    def __reduce__(self):
        return os.system, ("touch MARKER",)


def test_pickle_payload_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "hook": _Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(UserError, match="refusing"):
        convert_vqgan(tmp_path / "evil.ckpt", tmp_path / "out")
    assert not (tmp_path / "MARKER").exists()
    assert not (tmp_path / "out").exists()
