"""`maskgen eval ...` end to end on tiny models: probes on a trained tokenizer, fine-tuning with resume, FID
on CIFAR-10 images, and the one-line errors."""
import io
import json
import tarfile

import pytest
import torch
from PIL import Image, ImageFilter
from safetensors.torch import load_file

import maskgen
from maskgen.api import build_config
from maskgen.models.classifier import MAGEClassifier
from maskgen.eval.features import compute_features, load_encoder
from maskgen.eval.fid import evaluate_fid
from maskgen.models.mage import MAGE
from maskgen.models.vqgan import VQGAN
from maskgen.models import save_pretrained

from conftest import CIFAR, make_folder, run_cli

pytestmark = pytest.mark.slow
PROBE = ["--data", "cifar10", "--limit", 500, "--test-limit", 200]


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    """tokenizer-tiny trained for 20 steps (about 10 s)."""
    run = tmp_path_factory.mktemp("tok") / "run"
    maskgen.api.train("tokenizer", "tokenizer-tiny", ["train.max_steps=20", "log.progress=false"], run_dir=run)
    return run


@pytest.fixture(scope="module")
def mage_dir(tmp_path_factory):
    """A random-init mage-tiny with a random tokenizer-tiny attached."""
    torch.manual_seed(0)
    model = MAGE(build_config("mage", "mage-tiny", ["mage.tokenizer=unused"]).model)
    model.set_tokenizer(VQGAN(build_config("tokenizer", "tokenizer-tiny").model))
    return save_pretrained(model, tmp_path_factory.mktemp("mage") / "mage")


def test_tokenizer_features_and_probes(tokenizer_run, tmp_path):
    model = load_encoder(tokenizer_run)
    x, y = compute_features(model, "cifar10", "test", limit=12, progress=False)
    assert x.shape == (12, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # the mean continuous latent before quantisation
        assert torch.allclose(model.forward_features(images), model.encode_latent(images).mean((2, 3)))
    cache = tmp_path / "cache"
    lp = run_cli("eval", "linear-probe", "--ckpt", tokenizer_run, *PROBE, "--epochs", 60, "--batch-size", 64,
                 "--lr", 8, "--feature-cache", cache, "--json", tmp_path / "lp.json", check=True)
    r = json.loads((tmp_path / "lp.json").read_text())
    assert r["top1"] > 20 and r["num_classes"] == 10 and r["model"] == "vqgan"  # chance: 10 %
    assert "top1 (%)" in lp.stdout and len(list(cache.glob("features-*.safetensors"))) == 2
    run_cli("eval", "knn", "--ckpt", tokenizer_run, *PROBE, "--feature-cache", cache, check=True)
    assert json.loads((tokenizer_run / "eval" / "knn.json").read_text())["top1"] > 18
    fs = run_cli("eval", "fewshot", "--ckpt", tokenizer_run, *PROBE, "--feature-cache", cache, "--shots", 1, 10,
                 check=True)
    r = json.loads((tokenizer_run / "eval" / "fewshot.json").read_text())
    assert set(r["results"]) == {"1", "10"} and r["results"]["10"]["mean"] > 14 and "10-shot" in fs.stdout


def test_augmented_probe_runs(tokenizer_run, tmp_path):
    run_cli("eval", "linear-probe", "--ckpt", tokenizer_run, "--data", "cifar10", "--limit", 64, "--test-limit", 32,
            "--epochs", 2, "--batch-size", 32, "--augment", "--json", tmp_path / "aug.json", check=True)
    r = json.loads((tmp_path / "aug.json").read_text())
    assert r["augment"] and r["num_train"] == 64 and 0 <= r["top1"] <= 100


def test_errors_are_one_line(tokenizer_run, tmp_path, capsys):
    from maskgen.cli import main

    def fails(*args, match):  # in-process: main() turns a UserError into one stderr line and exit code 2
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and match in err, err

    fails("eval", "knn", "--ckpt", tmp_path / "nope", "--data", "cifar10", match="no such checkpoint")
    flat = make_folder(tmp_path / "flat", 8, labeled=False)
    fails("eval", "linear-probe", "--ckpt", tokenizer_run, "--data", flat, "--test-data", flat, match="unlabeled")
    fails("eval", "knn", "--ckpt", tokenizer_run, "--data", flat, match="--test-data is required")
    fails("eval", "knn", "--ckpt", tokenizer_run, "--data", "cifar10", "--image-size", 30, match="multiple of")
    fails("eval", "knn", "--ckpt", tokenizer_run, "--data", "cifar10", "--pool", "cls", match="pools 'mean'")
    fails("eval", "fid", "--input1", flat, "--input2", tmp_path / "missing", match="image set not found")
    fails("eval", "fid", "--input1", flat, "--input2", flat, "--extractor", "inception", "--inception-weights",
          tmp_path / "w.pth", match="no such file")
    fails("eval", "finetune", "--ckpt", tokenizer_run, "--data", "cifar10", match="needs a pre-trained encoder (MAGE, MAE)")


def test_finetune_trains_and_resumes_exactly(mage_dir, tmp_path):
    common = ["eval", "finetune", "--ckpt", mage_dir, "--data", "cifar10", "--config", "finetune-tiny",
              "data.limit=64", "finetune.eval_limit=32", "log.progress=false"]
    a, b = tmp_path / "a", tmp_path / "b"
    out = run_cli(*common, "train.max_steps=4", "--run-dir", a, check=True)
    assert "top1 (%)" in out.stdout and json.loads((a / "eval" / "finetune.json").read_text())["step"] == 4
    run_cli(*common, "train.max_steps=2", "--run-dir", b, check=True)
    run_cli(*common, "train.max_steps=4", "--run-dir", b, "--resume", "auto", check=True)
    wa = load_file(str(a / "checkpoints" / "step_00000004" / "model.safetensors"))
    wb = load_file(str(b / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    w0 = load_file(str(mage_dir / "model.safetensors"))
    assert not torch.equal(wa["blocks.0.attn.qkv.weight"], w0["blocks.0.attn.qkv.weight"])  # it trained
    model = maskgen.from_pretrained(a)
    assert isinstance(model, MAGEClassifier) and model.tokenizer is not None
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_layer_decay_groups(mage_dir):
    from maskgen.methods.finetune import FinetuneMethod

    cfg = build_config("finetune", "finetune-tiny", [f"model.pretrained={mage_dir}", "model.layer_decay=0.5"])
    groups = FinetuneMethod(cfg).optim_groups(0.05)
    scales = {round(g["lr_scale"], 6) for g in groups}
    assert scales == {0.125, 0.25, 0.5, 1.0}  # depth 2: token_emb 0.5^3, blocks 0.5^2 and 0.5, head 1
    assert all(g["weight_decay"] == 0.0 for g in groups if all(p.ndim == 1 for p in g["params"]))


def cifar_pngs(root, n, transform=None, skip=0):
    root.mkdir(parents=True)
    with tarfile.open(CIFAR / "test-000000.tar") as tf:
        jpgs = [m for m in tf.getmembers() if m.name.endswith(".jpg")][skip:skip + n]
        for i, m in enumerate(jpgs):
            img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
            (transform(img) if transform else img).save(root / f"{i}.png")
    return root


def test_fid_orders_same_other_blurred(tmp_path):
    a = cifar_pngs(tmp_path / "a", 24)
    b = cifar_pngs(tmp_path / "b", 24, skip=24)
    blur = cifar_pngs(tmp_path / "blur", 24, lambda im: im.filter(ImageFilter.GaussianBlur(2)))
    kw = dict(metrics=("fd",), extractor="lite0", cache_dir=tmp_path / "cache", progress=False)
    same = evaluate_fid(str(a), str(a), **kw)
    other = evaluate_fid(str(a), str(b), **kw)
    blurred = evaluate_fid(str(a), str(blur), **kw)
    assert abs(same["fd_lite0"]) < 1e-6 < other["fd_lite0"] < blurred["fd_lite0"] and "fid" not in same


def test_fid_cli_json_and_named_reference_cache(tmp_path):
    a = cifar_pngs(tmp_path / "a", 16)
    cache = tmp_path / "cache"
    args = ["eval", "fid", "--input1", a, "--input2", "cifar10-test", "--limit", 16, "--cache-dir", cache,
            "--extractor", "lite0"]
    out = run_cli(*args, "--json", tmp_path / "r.json", check=True)
    r = json.loads((tmp_path / "r.json").read_text())
    assert {"fd_lite0", "is_lite0_mean", "kd_lite0_mean", "precision", "recall"} <= set(r)
    assert not any(k.startswith("fid") for k in r) and "FD-lite0, not FID" in out.stdout
    cached = list(cache.glob("cifar10-test-*lite0.safetensors"))
    assert len(cached) == 1 and load_file(str(cached[0]))["features"].shape == (16, 1280)
    run_cli(*args, "--json", tmp_path / "r2.json", check=True)  # the reference now comes from the cache
    assert json.loads((tmp_path / "r2.json").read_text())["fd_lite0"] == pytest.approx(r["fd_lite0"], rel=1e-6)
