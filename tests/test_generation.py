"""`maskgen generate` / `edit` dispatch on what the loaded model declares (maskgen.generation), on a tiny
random MAGE with a tiny random VQGAN tokenizer: same images as the raw MaskGIT functions, one-line errors."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from maskgen.cli import main
from maskgen.errors import UserError
from maskgen.generation import edit_image, generate_images, generated_batches, load_generator_model
from maskgen.models import from_pretrained, save_pretrained
from maskgen.models.mage import MAGE, MAGEConfig
from maskgen.models.vqgan import VQGAN, VQGANConfig
from maskgen.sampling import Sampler, generate, inpaint_tokens, token_region
from maskgen.registry import SAMPLERS
from maskgen.seeding import per_image_generators


def tiny_models() -> tuple[MAGE, VQGAN]:
    torch.manual_seed(0)
    tok = VQGAN(VQGANConfig(ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=8, codebook_size=32,
                            norm_groups=4))
    mage = MAGE(MAGEConfig(image_size=16, token_grid=4, codebook_size=32, vocab_layout="compact", embed_dim=32,
                           depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2))
    torch.nn.init.normal_(mage.token_emb.word_embeddings.weight, std=0.5)  # samples depend on the input
    return mage, tok


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    mage, tok = tiny_models()
    return save_pretrained(mage.set_tokenizer(tok), tmp_path_factory.mktemp("mage") / "mage")


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A MAGE saved without its tokenizer, and a tokenizer alone."""
    mage, tok = tiny_models()
    root = tmp_path_factory.mktemp("bare")
    return save_pretrained(mage, root / "mage"), save_pretrained(tok, root / "tok")


def test_generated_batches_equal_the_raw_maskgit_functions(ckpt):
    """What `maskgen generate` writes for a seed is pinned to `maskgit.generate` with one generator per image."""
    model = from_pretrained(ckpt)
    raw = model.decode_tokens(generate(model, 5, 3, 4.5, 1.0, generator=per_image_generators(7, 0, 5)))
    got = torch.cat(list(generated_batches(model, 5, 5, seed=7, num_iter=3)))
    assert got.shape == (5, 3, 16, 16) and torch.equal(got, raw)
    # the defaults are the official ones, and batches hold images 0..4 whatever their size
    defaults = model.decode_tokens(generate(model, 2, 12, 4.5, 1.0, generator=per_image_generators(0, 0, 2)))
    assert torch.equal(next(iter(generated_batches(model, 2, 2))), defaults)
    split = torch.cat(list(generated_batches(model, 5, 2, seed=7, num_iter=3)))
    assert (split - raw).abs().max() < 1e-4


def test_generate_images_writes_the_raw_images(ckpt, tmp_path):
    model = from_pretrained(ckpt)
    generate_images(ckpt, tmp_path / "out", 3, seed=1, batch_size=2, progress=False, num_iter=2, temperature=0.5)
    raw = model.decode_tokens(generate(model, 3, 2, 4.5, 0.5, generator=per_image_generators(1, 0, 3)))
    for i in range(3):
        save_image(raw[i], tmp_path / f"raw{i}.png")
        written = np.asarray(Image.open(tmp_path / "out" / f"{i:06d}.png"))
        assert np.abs(written.astype(int) - np.asarray(Image.open(tmp_path / f"raw{i}.png"))).max() <= 1
    assert (tmp_path / "out-grid.png").is_file() and len(list((tmp_path / "out").iterdir())) == 3


def test_edit_goes_through_the_model_protocol(ckpt, tmp_path):
    model = from_pretrained(ckpt)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    out = edit_image("inpaint", ckpt, tmp_path / "in.png", tmp_path / "out.png", box="4,4,12,12", seed=3,
                     num_iter=2)
    x = torch.from_numpy(np.array(Image.open(tmp_path / "in.png"))).permute(2, 0, 1).float() / 255
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[4:12, 4:12] = True
    codes = model.encode_images((x * ~region)[None])
    raw = inpaint_tokens(model, codes, token_region(region, 4, 1), 2, generator=per_image_generators(3, 0, 1))
    expect = torch.where(region, model.decode_tokens(raw)[0], x)
    save_image(expect, tmp_path / "expect.png")
    got, want = (np.asarray(Image.open(p)).astype(int) for p in (out, tmp_path / "expect.png"))
    assert np.abs(got - want).max() <= 1 and (tmp_path / "out_panel.png").is_file()


def test_models_that_cannot_generate_or_edit(bare, ckpt, tmp_path, monkeypatch):
    no_tok, tok = bare
    with pytest.raises(UserError, match="holds a 'vqgan' model, which cannot generate images"):
        load_generator_model(tok)
    with pytest.raises(UserError, match="no tokenizer/ folder"):
        generate_images(no_tok, tmp_path / "x", 2, progress=False)

    class NoEdit(Sampler):
        pass

    SAMPLERS.register("no-edit-test")(NoEdit)
    monkeypatch.setattr(MAGE, "default_sampler", "no-edit-test")
    try:
        Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
        with pytest.raises(UserError, match="no-edit-test sampler cannot edit images"):
            edit_image("inpaint", ckpt, tmp_path / "in.png", tmp_path / "out.png", box="0,0,4,4")
        with pytest.raises(UserError, match="no option num_iter"):
            generate_images(ckpt, tmp_path / "x", 2, progress=False, num_iter=3)
    finally:
        SAMPLERS._entries.pop("no-edit-test", None)


def test_cli_flags_come_from_the_sampler_options(ckpt, tmp_path, capsys):
    for command in (["generate"], ["edit", "inpaint"], ["eval", "fid"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "maskgit sampler options" in text
        assert "--num-iter NUM_ITER decoding iterations (official: 12; README: 20) (default: 12)" in text
        assert "--choice-temperature" in text and "--temperature TEMPERATURE sampling temperature" in text
    with pytest.raises(SystemExit) as exit_:  # a usage error of argparse, before anything is loaded
        main(["generate", "--ckpt", str(ckpt), "--out", str(tmp_path / "g"), "--num-images", "2", "--num-iter", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --num-iter: 0 is below the minimum 1" in err
    assert not (tmp_path / "g").exists()
    assert main(["generate", "--ckpt", str(ckpt), "--out", str(tmp_path / "g"), "--num-images", "2",
                 "--num-iter", "2", "--choice-temperature", "0"]) == 0
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["000000.png", "000001.png"]


def test_fid_image_set_of_a_checkpoint_uses_the_sampler_options(ckpt):
    from maskgen.eval.image_sets import GeneratedImages, open_image_set

    images = open_image_set(str(ckpt), num_gen=3, seed=2, sampler_options={"num_iter": 2})
    assert isinstance(images, GeneratedImages)
    model = from_pretrained(ckpt)
    raw = model.decode_tokens(generate(model, 3, 2, generator=per_image_generators(2, 0, 3)))
    assert torch.equal(torch.cat(list(images.batches(3))), (raw * 255).round().clamp(0, 255).to(torch.uint8))
    with pytest.raises(UserError, match="choice_temperature"):  # before any image is generated
        GeneratedImages(str(ckpt), 3, choice_temperature=-1)
