"""`maskgen train mae` and `maskgen train mrmae` end to end on tiny models; MR-MAE's mimic branch pinned."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import maskgen
from maskgen.api import build_config
from maskgen.errors import UserError
from maskgen.methods.mrmae import MRMAEMethod
from maskgen.models import save_pretrained
from maskgen.models.mae import MAE
from maskgen.models.teachers import as_feature_map, load_teacher, to_grid
from maskgen.weights import safe_torch_load

from conftest import run_cli

pytestmark = pytest.mark.slow
TINY = ["data.limit=64", "data.path=mnist5k"]


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("mae") / "run"
    run_cli("train", "mae", "--config", "mae-tiny", *TINY, "train.max_steps=3", "--run-dir", run, check=True)
    return run


def test_mae_trains_with_loss_near_one_and_saves_a_reconstructing_model(mae_run, tmp_path):
    first = losses(mae_run)[1]
    assert 0.8 < first < 1.6, first  # norm-pix targets have unit variance; predictions start small
    model = maskgen.from_pretrained(mae_run)
    assert isinstance(model, MAE) and model.has_decoder
    assert (mae_run / "samples" / "reconstructions_step_00000003.png").is_file()
    out = run_cli("features", "--ckpt", mae_run, "--data", "mnist5k", "--split", "test", "--limit", "16", "--out",
                  tmp_path / "f.safetensors", check=True)
    assert out.returncode == 0
    feats = load_file(str(tmp_path / "f.safetensors"))["features"]
    assert feats.shape == (16, 64)
    # the default pool of MAE is its official probe's: the [CLS] token after the final norm
    from maskgen.api import compute_features
    cls, _ = compute_features(model, "mnist5k", "test", pool="cls", limit=16, progress=False)
    torch.testing.assert_close(feats, cls)


def test_mae_finetunes_through_eval_finetune(mae_run, tmp_path):
    out = run_cli("eval", "finetune", "--ckpt", mae_run, "--data", "mnist5k", "--config", "finetune-tiny",
                  "--run-dir", tmp_path / "ft", "train.max_steps=2", "data.limit=32", "finetune.eval_limit=16",
                  check=True)
    result = json.loads((tmp_path / "ft" / "eval" / "finetune.json").read_text())
    assert result["num_eval"] == 16 and 0 <= result["top1"] <= 100, out.stdout
    assert maskgen.from_pretrained(tmp_path / "ft").model_name == "mae-classifier"


def test_mae_config_errors(tmp_path):
    for override, message in (("data.image_size=64", "data.image_size 64 differs"),
                              ("model.decoder_depth=0", "decoder_depth must be >= 1"),
                              ("mae.mask_ratio=1.0", "mae.mask_ratio"),
                              ("model.patch_size=5", "not a multiple of patch_size")):
        bad = run_cli("train", "mae", "--config", "mae-tiny", *TINY, override, "train.max_steps=1", "--run-dir",
                      tmp_path / "bad")
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny MAE checkpoint used as a teacher (a ViT encoder on a 4x4 grid of 64-d tokens)."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("teacher") / "t"
    save_pretrained(MAE(build_config("mae", "mae-tiny").model), path)
    return path


def method_with_teacher(teacher_dir, **objective):
    overrides = [f"mrmae.teachers=[{teacher_dir}]", *[f"mrmae.{k}={v}" for k, v in objective.items()]]
    torch.manual_seed(0)
    return MRMAEMethod(build_config("mrmae", "mrmae-tiny", overrides))


def test_mimic_loss_reads_visible_patches_only(teacher_dir):
    method = method_with_teacher(teacher_dir, mimic_weights=[2.0])
    images = torch.rand(4, 3, 32, 32)
    targets = method.teacher_targets(images)
    assert targets[0].shape == (4, 16, 64)
    torch.manual_seed(7)
    _, _, _, ids_keep = method.mae.forward_encoder(images, 0.75)  # the masking forward_loss draws after this seed
    visible = torch.zeros(4, 16, dtype=torch.bool).scatter_(1, ids_keep, True)

    def loss_with(t):
        method.teacher_targets = lambda _images, _batch=None: [t]
        torch.manual_seed(7)
        loss, logs = method.forward_loss({"image": images})
        return loss, logs

    base, logs = loss_with(targets[0])
    assert torch.isclose(base, logs["pixel_loss"] + 2.0 * logs["mimic_loss_0"])
    changed = targets[0].clone()
    changed[~visible] += 10.0
    assert torch.equal(loss_with(changed)[0], base)
    changed = targets[0].clone()
    changed[visible] += 10.0
    assert loss_with(changed)[0] > base + 1


def test_teacher_is_frozen_outside_optimizer_and_weights(teacher_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--config", "mrmae-tiny", *TINY, f"mrmae.teachers=[{teacher_dir}, efficientnet-lite0]",
              "mrmae.mimic_weights=[1.0, 0.5]"]
    run_cli("train", "mrmae", *common, "train.max_steps=3", "--run-dir", a, check=True)
    run_cli("train", "mrmae", *common, "train.max_steps=2", "--run-dir", b, check=True)
    run_cli("train", "mrmae", *common, "train.max_steps=3", "--run-dir", b, "--resume", "auto", check=True)
    ckpt = a / "checkpoints" / "step_00000003"
    released = load_file(str(ckpt / "model.safetensors"))
    assert set(released) == set(MAE(build_config("mrmae", "mrmae-tiny").model).state_dict())  # the plain MAE
    state = safe_torch_load(ckpt / "training_state.pt")
    method = method_with_teacher(teacher_dir)
    trainable = sum(1 for p in method.parameters() if p.requires_grad)
    assert len(state["optimizer"]["state"]) == trainable + 2  # + the second teacher's head; no teacher parameter
    assert all(not p.requires_grad for t in method.teachers for p in t.parameters())
    assert not any(p is q for t in method.teachers for p in t.parameters() for q in method.parameters())
    method.train()
    assert all(not t.training for t in method.teachers)
    cfg = yaml.safe_load((a / "config.yaml").read_text())
    assert cfg["mrmae"]["teachers"] == [str(teacher_dir), "efficientnet-lite0"]
    row = next(r for r in map(json.loads, (a / "metrics.jsonl").read_text().splitlines()) if "mimic_loss_1" in r)
    assert row["loss"] == pytest.approx(row["pixel_loss"] + row["mimic_loss_0"] + 0.5 * row["mimic_loss_1"], rel=1e-4)
    wa, wb = (load_file(str(r / "checkpoints" / "step_00000003" / "model.safetensors")) for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # resume is exact (the heads come from the training state)
    assert losses(a) == losses(b)
    # the trained MR-MAE is an MAE for every evaluation
    knn = run_cli("eval", "knn", "--ckpt", a, "--data", "mnist5k", "--limit", "64", "--test-limit", "32", "--json",
                  tmp_path / "knn.json", check=True)
    assert json.loads((tmp_path / "knn.json").read_text())["pool"] == "cls", knn.stdout


def test_teacher_grids_and_errors(teacher_dir, tmp_path):
    f = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(to_grid(f, 4), f.flatten(2).transpose(1, 2))  # same grid: untouched, row-major
    torch.testing.assert_close(to_grid(torch.full((2, 3, 2, 2), 5.0), 8), torch.full((2, 64, 3), 5.0))
    up = to_grid(f, 8).view(8, 8)
    assert torch.all(up[:, 1:] >= up[:, :-1]) and torch.all(up[1:] >= up[:-1])  # bilinear keeps the ramp monotone
    assert as_feature_map(torch.zeros(2, 9, 5), "t").shape == (2, 5, 3, 3)
    with pytest.raises(UserError, match="no spatial grid"):
        as_feature_map(torch.zeros(2, 5), "t")
    with pytest.raises(UserError, match="not a square grid"):
        as_feature_map(torch.zeros(2, 10, 5), "t")
    with pytest.raises(UserError, match="never downloads"):
        load_teacher("timm:resnet18")
    with pytest.raises(UserError, match="unknown teacher"):
        load_teacher("clip-vit-b16")
    lite = load_teacher("efficientnet-lite0", 64)
    assert lite(torch.rand(1, 3, 32, 32)).shape == (1, 1280, 2, 2)
    bad = run_cli("train", "mrmae", "--config", "mrmae-tiny", *TINY, "mrmae.teachers=[timm:vit_small_patch16_224]",
                  "train.max_steps=1", "--run-dir", tmp_path / "bad")
    assert bad.returncode == 2 and "never downloads" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("train", "mrmae", "--config", "mrmae-tiny", *TINY, "mrmae.mimic_weights=[1, 2]",
                  "train.max_steps=1", "--run-dir", tmp_path / "bad2")
    assert bad.returncode == 2 and "mimic_weights has 2 values for 1 teachers" in bad.stderr


def test_teacher_cache_trains_mrmae_and_refuses_another_teacher(teacher_dir, tmp_path):
    cache = tmp_path / "lite0.safetensors"
    run_cli("cache-teacher", "--teacher", "efficientnet-lite0", "--teacher-image-size", "64", "--data", "mnist5k",
            "--split", "test", "--views", "2", "--image-size", "32", "--out", cache, check=True)
    from maskgen.data.teacher_cache import TeacherCache
    c = TeacherCache(cache)
    image, feats = c.view(3, 1, True)
    assert image.shape == (3, 32, 32) and feats.shape == (1280, 2, 2) and c.views == 2
    # the stored features are the teacher's on the stored (quantised) view
    teacher = load_teacher("efficientnet-lite0", 64)
    torch.testing.assert_close(teacher(image[None])[0], feats, atol=2e-2, rtol=1e-2)
    common = ["--config", "mrmae-tiny", "data.limit=0", "data.path=mnist5k", "data.split=test"]
    ok = run_cli("train", "mrmae", *common, f"mrmae.teacher_caches=[{cache}]", "train.max_steps=2", "--run-dir",
                 tmp_path / "run", check=True)
    assert "teacher caches" in ok.stderr
    for override, message in (("mrmae.teacher_image_size=96", "not the configured"),
                              ("data.crop_scale=[0.5,1.0]", "but the run uses"),
                              (f"mrmae.teachers=[{teacher_dir}]", "not the configured")):
        bad = run_cli("train", "mrmae", *common, f"mrmae.teacher_caches=[{cache}]", override, "train.max_steps=1",
                      "--run-dir", tmp_path / "bad")
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
