"""`maskgen train umd`: the loss pinned by hand, its special cases, weight-decay groups, denoising after training,
and the two stages end to end (pre-training, class-conditional fine-tuning with EMA, resume, generation)."""
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import maskgen
from maskgen.api import build_config
from maskgen.data.transforms import EvalTransform
from maskgen.eval.image_sets import GeneratedImages
from maskgen.methods.umd import UMDMethod, UMDObjective, masked_mean, umd_loss
from maskgen.models import save_pretrained
from maskgen.models.umd import UMD, UMDConfig
from maskgen.models.vqgan import VQGAN

from conftest import cifar_jpegs, run_cli

TINY = ["data.path=mnist5k", "data.limit=64"]


def tiny(**kw) -> UMD:
    torch.manual_seed(0)
    return UMD(UMDConfig(image_size=16, patch_size=4, embed_dim=32, depth=1, decoder_depth=1, num_heads=2, **kw))


def recorded(model: UMD):
    """Zero the output head (pred = 0) and record every forward's (x, time, y, mask)."""
    torch.nn.init.zeros_(model.head.weight)
    calls = []
    model.register_forward_hook(lambda mod, args, out: calls.append((args[0], args[1], args[2], out[1])))
    return calls


def test_masked_mean_is_the_mean_over_counted_pixels_and_channels():
    se = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    m = torch.zeros(2, 1, 2, 2)
    m[0, 0, 0, 1] = m[1, 0, 1, 0] = 1
    expected = torch.cat([se[0, :, 0, 1], se[1, :, 1, 0]]).mean()
    assert masked_mean(se, m).item() == pytest.approx(expected.item())


def test_the_loss_of_a_two_image_batch_by_hand():
    model = tiny()
    calls = recorded(model)
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(5)
    loss, logs = umd_loss(model, x0, None, UMDObjective())  # defaults: r 0.5, masks 0.375 / 0.75
    (xt, t_noisy, y, m_noisy), (xc, t_clean, yc, m_clean) = calls
    # the first image is noised (t + 1 >= 1 given to the network), the last one clean (time 0, no label)
    assert t_noisy.item() >= 1 and t_clean.item() == 0 and y is None and yc is None
    assert torch.equal(xc, x0[1:]) and m_noisy.sum().item() == 6 and m_clean.sum().item() == 12
    a = model.schedule.alphas_cumprod[t_noisy.item() - 1].item()
    eps = (xt - a ** 0.5 * x0[:1]) / (1 - a) ** 0.5  # the noise that made x_t
    up = lambda m: m.view(4, 4).repeat_interleave(4, 0).repeat_interleave(4, 1).bool()  # noqa: E731
    vis, hid, hid_c = ~up(m_noisy), up(m_noisy), up(m_clean)
    l_eps = (eps[0] ** 2)[:, vis].mean()  # pred = 0: the squared errors are the targets squared
    l_x0 = (x0[0] ** 2)[:, hid].mean()
    l_clean = (x0[1] ** 2)[:, hid_c].mean()
    expected = 0.5 * (0.5 * l_eps + 0.5 * l_x0) + 0.5 * l_clean
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert logs["loss_clean"].item() == pytest.approx(l_clean.item(), rel=1e-5)


@pytest.mark.parametrize("r, ratio, n_calls", [(1.0, 0.375, 1), (0.0, 0.0, 1), (0.0, 0.5, 1), (0.25, 0.0, 2)])
def test_the_special_cases_are_exact(r, ratio, n_calls):
    model = tiny()
    calls = recorded(model)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    torch.manual_seed(1)
    loss, logs = umd_loss(model, x0, None, UMDObjective(no_noise_prob=r, mask_ratio=ratio))
    assert len(calls) == n_calls
    if r == 1.0:  # MAE-like: the clean step alone, on all 4 images
        assert set(logs) == {"loss_clean"} and calls[0][1].tolist() == [0] * 4
        assert loss.item() == pytest.approx(logs["loss_clean"].item())
        return
    xt, time = calls[0][0], calls[0][1]
    a = model.schedule.alphas_cumprod[time - 1].view(-1, 1, 1, 1)
    n = len(xt)
    eps = (xt - a.sqrt() * x0[:n]) / (1 - a).sqrt()
    if ratio == 0:  # DiT / fine-tuning: plain means over all pixels
        noisy = 0.5 * (eps ** 2).mean() + 0.5 * (x0[:n] ** 2).mean()
        assert logs["loss_noisy"].item() == pytest.approx(noisy.item(), rel=1e-4)
    expected = (n / 4) * logs["loss_noisy"] + (1 - n / 4) * logs.get("loss_clean", 0.0)
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    assert n == 4 - int(4 * r)


def test_label_dropout_uses_the_null_class_and_time_is_t_plus_one():
    model = tiny(num_classes=3)
    calls = recorded(model)
    torch.manual_seed(0)
    umd_loss(model, torch.zeros(200, 3, 16, 16), torch.ones(200, dtype=torch.long),
             UMDObjective(no_noise_prob=0.0, mask_ratio=0.0, use_labels=True, label_dropout=0.3))
    _, time, y, _ = calls[0]
    assert set(y.tolist()) == {1, 3} and 0.2 < (y == 3).float().mean().item() < 0.4
    assert time.min().item() >= 1 and time.max().item() <= 1000


def test_weight_decay_groups_are_the_references():
    cfg = build_config("umd", "umd-tiny")
    method = UMDMethod(cfg)
    decay, no_decay = method.optim_groups(0.05)
    names = {id(p): n for n, p in method.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"umd.cls_tokens", "umd.mask_token"} <= nd and all(n.endswith("bias") for n in nd - {"umd.cls_tokens",
                                                                                                "umd.mask_token"})
    assert {"umd.pos_embed", "umd.decoder_pos_embed", "umd.norm.weight"} <= d  # decayed, unlike MAE
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


@pytest.mark.slow
def test_a_trained_tiny_umd_denoises_better_than_its_initialisation():
    """x0 at t = 500 as sampling forms it (from the ε head, clipped), nothing masked, on 32 fixed CIFAR images: after
    300 steps well below the untrained model's error and below predicting 0 (the mean)."""
    transform = EvalTransform(16)
    images = torch.stack([transform(maskgen.data.decode.decode_image(b)) for b, _ in cifar_jpegs(32)]) * 2 - 1
    torch.manual_seed(0)
    model = UMD(UMDConfig(image_size=16, patch_size=4, embed_dim=64, depth=1, decoder_depth=1, num_heads=2))
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((len(images),), 500)

    def x0_error() -> float:
        with torch.no_grad():
            model.eval()
            xt = model.schedule.q_sample(images, t, noise)
            eps = model(xt, t + 1)[0][:, 3:]
            return ((model.schedule.x0_from_eps(xt, t, eps).clamp(-1, 1) - images) ** 2).mean().item()

    before = x0_error()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    torch.manual_seed(0)
    model.train()
    for _ in range(300):
        loss, _ = umd_loss(model, images, None, UMDObjective())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = x0_error()
    assert after < 0.3 * before and after < 0.6 * (images ** 2).mean().item(), (before, after)  # measured 0.09 vs 0.51


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("umd")
    run_cli("train", "umd", "--config", "umd-tiny", *TINY, "train.max_steps=3", "--run-dir", root / "pre", check=True)
    out = run_cli("train", "umd", "--config", "umd-tiny-ft", *TINY, "train.max_steps=2", "--run-dir", root / "ft",
                  "--init-from", root / "pre", check=True)
    return root, out


@pytest.mark.slow
def test_pretraining_has_no_ema_and_the_fine_tuning_stage_starts_from_it_with_labels_and_ema(stages):
    root, out = stages
    pre = root / "pre" / "checkpoints" / "step_00000003"
    ft = root / "ft" / "checkpoints" / "step_00000002"
    assert not (pre / "ema.safetensors").exists() and (ft / "ema.safetensors").is_file()
    cfg = yaml.safe_load((root / "ft" / "config.yaml").read_text())
    assert cfg["model"]["num_classes"] == 10  # from the data
    assert cfg["train"]["ema_decay"] == pytest.approx(1 - 1e-4 * 16 / 256)
    assert cfg["train"]["init_from"] == str(root / "pre")
    assert "new (not in it): label_embed.weight" in out.stderr
    state = torch.load(ft / "training_state.pt", weights_only=True)
    assert all(s["step"] == 2 for s in state["optimizer"]["state"].values())  # the optimizer started afresh


@pytest.mark.slow
def test_fine_tuning_resumes_exactly(stages, tmp_path):
    root, _ = stages
    args = ["train", "umd", "--config", "umd-tiny-ft", *TINY, "--init-from", root / "pre"]
    run_cli(*args, "train.max_steps=4", "--run-dir", tmp_path / "a", check=True)
    run_cli(*args, "train.max_steps=2", "--run-dir", tmp_path / "b", check=True)
    run_cli(*args, "train.max_steps=4", "--run-dir", tmp_path / "b", "--resume", "auto", check=True)
    for name in ("model.safetensors", "ema.safetensors"):
        wa = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000004" / name))
        wb = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000004" / name))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


@pytest.mark.slow
def test_generation_from_both_stages_and_its_errors(stages, tmp_path):
    root, _ = stages
    ok = run_cli("generate", "--ckpt", root / "ft", "--out", tmp_path / "g", "--num-images", 3, "--steps", 4,
                 "--cfg", "3", "--class", "all", check=True)
    assert len(list((tmp_path / "g").glob("*.png"))) == 3, ok.stderr
    # `eval fid --input1 CKPT --num-gen N` scores what `generate` writes: the same classes (i mod 10), EMA weights
    scored = torch.cat(list(GeneratedImages(str(root / "ft"), 3, seed=0, steps=4, cfg=3.0,
                                            class_label="all").batches(2)))
    written = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "g" / f"{i:06d}.png"))) for i in range(3)])
    assert (scored.permute(0, 2, 3, 1).numpy().astype(int) - written.numpy().astype(int)).__abs__().max() <= 1
    run_cli("generate", "--ckpt", root / "pre", "--out", tmp_path / "u", "--num-images", 2, "--steps", 3, check=True)
    raw = run_cli("generate", "--ckpt", root / "ft", "--weights", "raw", "--out", tmp_path / "r", "--num-images", 3,
                  "--steps", 4, "--cfg", "3", "--class", "all", check=True)
    differ = [(tmp_path / "r" / f"{i:06d}.png").read_bytes() != (tmp_path / "g" / f"{i:06d}.png").read_bytes()
              for i in range(3)]
    assert any(differ), raw.stderr  # the trained weights, not the EMA
    bad = run_cli("generate", "--ckpt", root / "pre", "--weights", "ema", "--out", tmp_path / "e", "--num-images", 1)
    assert bad.returncode == 2 and "no EMA weights" in bad.stderr and "Traceback" not in bad.stderr
    for flags, words in ((["--class", "1"], "unconditional"), (["--cfg", "2"], "--cfg")):
        bad = run_cli("generate", "--ckpt", root / "pre", "--out", tmp_path / "bad", "--num-images", 1, "--steps", 2,
                      *flags)
        assert bad.returncode == 2 and words in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("generate", "--ckpt", root / "ft", "--out", tmp_path / "bad2", "--num-images", 1, "--steps", 2000)
    assert bad.returncode == 2 and "--steps" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_init_from_another_architecture_is_a_clear_error(stages, tmp_path):
    root, _ = stages
    bad = run_cli("train", "umd", "--config", "umd-tiny-ft", *TINY, "model.embed_dim=32", "--init-from", root / "pre",
                  "--run-dir", tmp_path / "x")
    assert bad.returncode == 2 and "do not fit" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("train", "umd", "--config", "umd-tiny-ft", *TINY, "--init-from", tmp_path / "nothing",
                  "--run-dir", tmp_path / "y")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_eval_features_at_a_noise_level(stages, tmp_path):
    root, _ = stages
    common = ["--ckpt", root / "pre", "--data", "mnist5k", "--limit", 40, "--test-limit", 20]
    clean = run_cli("eval", "knn", *common, "--json", tmp_path / "c.json", check=True)
    noised = run_cli("eval", "knn", *common, "--t", 50, "--json", tmp_path / "n.json", check=True)
    assert json.loads((tmp_path / "n.json").read_text())["t"] == 50, noised.stdout + clean.stdout
    bad = run_cli("eval", "knn", "--ckpt", "pixels", "--data", "mnist5k", "--t", 50, "--json", tmp_path / "p.json")
    assert bad.returncode == 2 and "--t" in bad.stderr


@pytest.mark.slow
def test_latent_mode_on_our_tokenizer_records_the_scale_and_samples(tmp_path):
    torch.manual_seed(0)
    tok = tmp_path / "tok"
    save_pretrained(VQGAN(build_config("tokenizer", "tokenizer-tiny").model), tok)  # 32 px -> 8x8 x 32 channels
    run = tmp_path / "latent"
    run_cli("train", "umd", "--config", "umd-tiny", *TINY, f"umd.autoencoder={tok}", "model.patch_size=2",
            "model.schedule=linear", "train.max_steps=2", "--run-dir", run, check=True)
    cfg = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert (cfg["latent_channels"], cfg["latent_downsample"]) == (32, 4)
    model = maskgen.from_pretrained(run)
    z = model.tokenizer.encode_latent(torch.rand(4, 3, 32, 32))
    assert cfg["latent_scale"] > 0 and model.config.latent_scale == cfg["latent_scale"]
    assert model.sample_shape == (32, 8, 8) and not model.clip_denoised
    x = model.to_model_space(torch.rand(2, 3, 32, 32))
    assert x.shape == (2, 32, 8, 8) and z.shape == (4, 32, 8, 8)
    run_cli("generate", "--ckpt", run, "--out", tmp_path / "g", "--num-images", 2, "--steps", 3, check=True)
    assert len(list((tmp_path / "g").glob("*.png"))) == 2
    feats = run_cli("features", "--ckpt", run, "--data", "mnist5k", "--limit", 8, "--out", tmp_path / "f.safetensors",
                    check=True)
    assert load_file(str(tmp_path / "f.safetensors"))["features"].shape == (8, 64), feats.stderr


@pytest.mark.slow
def test_latent_mode_on_a_local_diffusers_vae(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                  layers_per_block=1, scaling_factor=0.25)
    vae.save_pretrained(tmp_path / "vae")
    run = tmp_path / "latent"
    run_cli("train", "umd", "--config", "umd-tiny", *TINY, f"umd.autoencoder=diffusers:{tmp_path / 'vae'}",
            "model.patch_size=4", "train.max_steps=1", "--run-dir", run, check=True)
    cfg = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert (cfg["latent_channels"], cfg["latent_downsample"], cfg["latent_scale"]) == (4, 2, 0.25)
    run_cli("generate", "--ckpt", run, "--out", tmp_path / "g", "--num-images", 1, "--steps", 2, check=True)
    assert maskgen.from_pretrained(run).tokenizer.model_name == "diffusers-autoencoder-kl"


@pytest.mark.slow
def test_umd_finetunes_through_eval_finetune(stages, tmp_path):
    root, _ = stages
    run_cli("eval", "finetune", "--ckpt", root / "pre", "--data", "mnist5k", "--config", "finetune-tiny",
            "--run-dir", tmp_path / "ft", "train.max_steps=2", "data.limit=32", "finetune.eval_limit=16", check=True)
    result = json.loads((tmp_path / "ft" / "eval" / "finetune.json").read_text())
    assert result["num_eval"] == 16 and 0 <= result["top1"] <= 100
    clf = maskgen.from_pretrained(tmp_path / "ft")
    assert clf.model_name == "umd-classifier" and not hasattr(clf.encoder, "decoder_blocks")
    pre = maskgen.from_pretrained(root / "pre")
    with torch.no_grad():  # the classifier's features at init are the pre-trained model's (time 0, mean CLS)
        fresh = pre.as_classifier(10, drop_path=0.0).eval()
        x = torch.rand(2, 3, 32, 32)
        torch.testing.assert_close(fresh.forward_features(x), pre.forward_features(x))
