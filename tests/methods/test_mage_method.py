"""`maskgen train mage`, `generate`, `edit`, `features` end to end on tiny models."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import maskgen
from maskgen.api import build_config
from maskgen.eval.image_sets import GeneratedImages, open_image_set
from maskgen.models.mage import MAGE
from maskgen.models.vqgan import VQGAN
from maskgen.models import save_pretrained

from conftest import make_folder, run_cli

pytestmark = pytest.mark.slow
BASE = ["--config", "mage-tiny", "data.limit=64"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A random-init tokenizer with the tokenizer-tiny architecture (32 px -> 8x8 tokens, 64 codes)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "tok"
    save_pretrained(VQGAN(build_config("tokenizer", "tokenizer-tiny").model), path)
    return path


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    run = tmp_path_factory.mktemp("mage") / "run"
    run_cli("train", "mage", *BASE, f"mage.tokenizer={tokenizer}", "train.max_steps=4", "--run-dir", run, check=True)
    return run


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_training_outputs_and_loss_at_init(trained):
    assert math.isclose(losses(trained)[1], math.log(64), abs_tol=0.15)  # label-smoothed CE at init ~ ln K
    model = maskgen.from_pretrained(trained)
    assert isinstance(model, MAGE) and isinstance(model.tokenizer, VQGAN)
    assert (trained / "samples" / "step_00000004.png").is_file()
    ckpt = sorted((trained / "checkpoints").glob("step_*"))[-1]
    assert (ckpt / "tokenizer" / "model.safetensors").is_file()
    assert not any(k.startswith("tokenizer") for k in load_file(str(ckpt / "model.safetensors")))


def test_mage_resume_is_exact(tokenizer, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*BASE, f"mage.tokenizer={tokenizer}"]
    run_cli("train", "mage", *common, "train.max_steps=4", "--run-dir", a, check=True)
    run_cli("train", "mage", *common, "train.max_steps=2", "--run-dir", b, check=True)
    run_cli("train", "mage", *common, "train.max_steps=4", "--run-dir", b, "--resume", "auto", check=True)
    wa = load_file(str(a / "checkpoints" / "step_00000004" / "model.safetensors"))
    wb = load_file(str(b / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # masking and dropout are reseeded per step
    assert losses(a) == losses(b)


def test_token_cache_training_and_mismatch(tokenizer, tmp_path):
    cache = tmp_path / "cache.safetensors"
    run_cli("cache-tokens", "--tokenizer", tokenizer, "--data", make_folder(tmp_path / "imgs", 64), "--out", cache,
            "--views", 2, "--image-size", 32, check=True)
    ok = run_cli("train", "mage", *BASE, f"mage.tokenizer={tokenizer}", f"mage.token_cache={cache}",
                 "train.max_steps=2", "--run-dir", tmp_path / "run", check=True)
    assert "token cache" in ok.stderr
    torch.manual_seed(1)
    other = tmp_path / "other"
    save_pretrained(VQGAN(build_config("tokenizer", "tokenizer-tiny").model), other)
    bad = run_cli("train", "mage", *BASE, f"mage.tokenizer={other}", f"mage.token_cache={cache}",
                  "train.max_steps=2", "--run-dir", tmp_path / "bad")
    assert bad.returncode == 2 and "was made with tokenizer" in bad.stderr and "Traceback" not in bad.stderr


def test_generate_is_seeded_and_batch_independent(trained, tmp_path):
    args = ["generate", "--ckpt", trained, "--num-images", 3, "--num-iter", 3]
    run_cli(*args, "--out", tmp_path / "a", "--batch-size", 3, check=True)
    run_cli(*args, "--out", tmp_path / "b", "--batch-size", 1, check=True)
    run_cli(*args, "--out", tmp_path / "c", "--seed", 1, check=True)
    read = lambda d, i: np.asarray(Image.open(tmp_path / d / f"{i:06d}.png"))
    for i in range(3):
        assert read("a", i).shape == (32, 32, 3)
        # same images whatever the batch size (up to float rounding of batched matmuls)
        assert np.abs(read("a", i).astype(int) - read("b", i)).mean() < 1.0
    assert any(not np.array_equal(read("a", i), read("c", i)) for i in range(3))
    assert (tmp_path / "a-grid.png").is_file()
    # the image set that `maskgen eval fid --input1 CKPT --num-gen N` scores is what `maskgen generate` writes
    assert isinstance(open_image_set(str(trained), num_gen=3), GeneratedImages)
    scored = torch.cat(list(GeneratedImages(str(trained), 3, seed=0, num_iter=3).batches(3))).permute(0, 2, 3, 1).numpy().astype(int)
    written = np.stack([read("a", i) for i in range(3)]).astype(int)
    assert np.abs(scored - written).max() <= 1 and (scored != written).mean() < 0.01  # <=1: rounding of .5


def test_edit_inpaint_keeps_outside_pixels(trained, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    run_cli("edit", "inpaint", "--ckpt", trained, "--image", tmp_path / "in.png", "--box", "8,8,24,24",
            "--out", tmp_path / "out.png", "--num-iter", 3, check=True)
    src, out = (np.asarray(Image.open(tmp_path / f)).astype(int) for f in ("in.png", "out.png"))
    outside = np.ones((32, 32), bool)
    outside[8:24, 8:24] = False
    assert np.array_equal(src[outside], out[outside]) and not np.array_equal(src[~outside], out[~outside])
    assert (tmp_path / "out_panel.png").is_file()
    for extra, message in [(["--box", "8,8,99,24"], "outside the image"), ([], "exactly one of --box or --mask")]:
        proc = run_cli("edit", "inpaint", "--ckpt", trained, "--image", tmp_path / "in.png", "--out",
                       tmp_path / "x.png", *extra)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    Image.new("L", (20, 20), 255).save(tmp_path / "small_mask.png")
    proc = run_cli("edit", "inpaint", "--ckpt", trained, "--image", tmp_path / "in.png", "--mask",
                   tmp_path / "small_mask.png", "--out", tmp_path / "x.png")
    assert proc.returncode == 2 and "same size" in proc.stderr


def test_features(trained, tmp_path):
    out = tmp_path / "f.safetensors"
    run_cli("features", "--ckpt", trained, "--data", "cifar10", "--split", "test", "--limit", 20, "--out", out,
            check=True)
    f = load_file(str(out))
    assert f["features"].shape == (20, 64) and f["labels"].shape == (20,)
    assert torch.allclose(f["features"].mean(1), torch.zeros(20), atol=1e-4)  # LayerNorm-ed mean pooling


MAGE_C = ["mage.contrastive_weight=0.1", "data.views=2", "mage.contrastive_hidden_dim=32",
          "mage.contrastive_dim=16", "vis.num_images=0"]


def test_mage_c_trains_resumes_and_releases_plain_mage(tokenizer, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*BASE, f"mage.tokenizer={tokenizer}", *MAGE_C, "data.color_jitter=0.5", "data.grayscale=0.2"]
    run_cli("train", "mage", *common, "train.max_steps=3", "--run-dir", a, check=True)
    run_cli("train", "mage", *common, "train.max_steps=2", "--run-dir", b, check=True)
    run_cli("train", "mage", *common, "train.max_steps=3", "--run-dir", b, "--resume", "auto", check=True)
    rows = [json.loads(r) for r in (a / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "contrastive_loss" in r)
    # at init the pooled features of all 2 x 16 views are nearly alike: InfoNCE ~ ln(2B - 1)
    assert math.isclose(first["contrastive_loss"], math.log(31), abs_tol=0.3)
    assert math.isclose(first["loss"], first["mlm_loss"] + 0.1 * first["contrastive_loss"], rel_tol=1e-4)
    ckpt = a / "checkpoints" / "step_00000003"
    assert not any(k.startswith("head") for k in load_file(str(ckpt / "model.safetensors")))
    assert isinstance(maskgen.from_pretrained(a), MAGE)
    wa, wb = (load_file(str(r / "checkpoints" / "step_00000003" / "model.safetensors")) for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the head is restored from the training state
    assert losses(a) == losses(b)


def test_mage_c_from_token_cache_and_view_errors(tokenizer, tmp_path):
    cache = tmp_path / "cache.safetensors"
    run_cli("cache-tokens", "--tokenizer", tokenizer, "--data", make_folder(tmp_path / "imgs", 32), "--out", cache,
            "--views", 2, "--image-size", 32, check=True)
    run_cli("train", "mage", *BASE, f"mage.tokenizer={tokenizer}", f"mage.token_cache={cache}", *MAGE_C,
            "train.max_steps=1", "--run-dir", tmp_path / "run", check=True)
    no_views = run_cli("train", "mage", *BASE, f"mage.tokenizer={tokenizer}", "mage.contrastive_weight=0.1",
                       "--run-dir", tmp_path / "bad")
    assert no_views.returncode == 2 and "data.views=2" in no_views.stderr and "Traceback" not in no_views.stderr
    no_weight = run_cli("train", "mage", *BASE, f"mage.tokenizer={tokenizer}", "data.views=2",
                        "--run-dir", tmp_path / "bad2")
    assert no_weight.returncode == 2 and "contrastive_weight" in no_weight.stderr
