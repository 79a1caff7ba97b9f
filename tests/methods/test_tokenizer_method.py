"""The tokenizer method's losses: G/D gradient isolation, disc_start, adaptive weight, entropy guard, what is
saved; short training runs with the GAN + perceptual terms (exact resume, two-process DDP)."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import maskgen
from maskgen.api import build_config
from maskgen.errors import ConfigError
from maskgen.losses import g_loss
from maskgen.methods.tokenizer import TokenizerObjective, TokenizerMethod, codebook_entropy_loss
from maskgen.models.vqgan import VQGANConfig
from maskgen.weights import safe_torch_load

from conftest import REPO, ddp_vs_single_weights, run_worker

MODEL = dict(ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, codebook_size=16, norm_groups=8)
GAN = dict(disc="patch", disc_layers=2, disc_channels=8)


def method(image_size: int = 16, **loss) -> TokenizerMethod:
    torch.manual_seed(0)
    return TokenizerMethod(VQGANConfig(**MODEL), TokenizerObjective(**loss), image_size)


def images(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def grads(loss: torch.Tensor, params: list) -> list:
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


# ------------------------------------------------------------------------------------------- config
def test_config_checks():
    with pytest.raises(ConfigError, match="entropy_temperature"):
        build_config("tokenizer", "tokenizer-tiny", ["tokenizer.entropy_temperature=0"])
    with pytest.raises(ConfigError, match="r1_weight"):
        build_config("tokenizer", "tokenizer-tiny", ["tokenizer.r1_weight=10"])
    with pytest.raises(ConfigError, match="not one of"):
        build_config("tokenizer", "tokenizer-tiny", ["tokenizer.disc=vanilla"])
    with pytest.raises(ConfigError, match="power-of-two"):
        method(image_size=24, disc="stylegan")
    with pytest.raises(ConfigError, match="too deep"):
        method(image_size=16, disc="patch", disc_layers=3)
    tiny = build_config("tokenizer", "tokenizer-tiny")
    assert tiny.objective.perceptual == "none" and tiny.objective.disc == "none"  # the fast preset stays fast
    assert tiny.model.commitment_beta == 0.25


# ---------------------------------------------------------------------------------- what is saved
def test_state_holds_tokenizer_and_discriminator_not_perceptual():
    m = method(perceptual="lite0", perceptual_size=32, **GAN)
    keys = list(m.state_dict())
    assert keys and all(k.startswith(("vqgan.", "disc.")) for k in keys)
    assert any(k.startswith("disc.") for k in keys)
    assert m.release_model() is m.vqgan and not any(k.startswith("disc") for k in m.vqgan.state_dict())
    trainable = {id(p) for p in m.parameters()}
    assert not trainable & {id(p) for p in m.perceptual.frozen.parameters()}


# ------------------------------------------------------------------------------ gradient isolation
@pytest.mark.parametrize("loss_cfg", [dict(GAN, disc_loss="hinge"),
                                      dict(disc="stylegan", disc_channels=8, disc_loss="non-saturating",
                                           r1_weight=10.0)])
def test_generator_and_discriminator_gradients_are_disjoint(loss_cfg):
    m = method(disc_start=0, **loss_cfg)
    x = images()
    recon = m.vqgan(x)["recon"]
    g_term, d_term, logs = m.adversarial_terms(x, recon, F.l1_loss(recon, x), step=0)
    gen, disc = list(m.vqgan.parameters()), list(m.disc.parameters())
    g_gen, g_disc = grads(g_term, gen), grads(g_term, disc)
    d_gen, d_disc = grads(d_term, gen), grads(d_term, disc)
    assert all(g is None for g in g_disc)  # the generator's term never trains D
    assert all(g is None for g in d_gen)  # the discriminator's term never trains the tokenizer
    named = dict(zip((n for n, _ in m.vqgan.named_parameters()), g_gen))
    assert named["decoder.conv_out.weight"].abs().sum() > 0 and named["encoder.conv_in.weight"].abs().sum() > 0
    assert all(g is not None for g in d_disc) and sum(g.abs().sum() for g in d_disc) > 0
    if "r1_weight" in loss_cfg:
        assert logs["r1"] > 0
    # the full loss gives D exactly the discriminator term's gradient
    m.zero_grad()
    loss, _ = m.forward_loss({"image": x, "step": 0})
    loss.backward()
    for p, g in zip(disc, d_disc):
        torch.testing.assert_close(p.grad, g)


def test_adaptive_weight_is_the_hand_computed_ratio():
    m = method(disc_start=0, disc_weight=0.5, **GAN)
    x = images()
    _, logs = m.forward_loss({"image": x, "step": 0})
    recon = m.vqgan(x)["recon"]
    last = m.vqgan.decoder.conv_out.weight
    nll_grad, = torch.autograd.grad(F.l1_loss(recon, x), last, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss(m.disc(recon), "hinge"), last)
    expected = 0.5 * nll_grad.norm() / (g_grad.norm() + 1e-4)
    torch.testing.assert_close(logs["disc_weight"], expected)
    _, logs = method(disc_start=0, disc_weight=0.5, disc_adaptive=False, **GAN).forward_loss({"image": x, "step": 0})
    assert float(logs["disc_weight"]) == 0.5


def test_discriminator_is_off_before_disc_start_and_on_after():
    x = images()
    plain, late = method(), method(disc_start=3, **GAN)
    assert all(torch.equal(a, b) for a, b in zip(plain.vqgan.state_dict().values(), late.vqgan.state_dict().values()))

    def run(m, step):
        m.zero_grad()
        loss, logs = m.forward_loss({"image": x, "step": step})
        loss.backward()
        return loss, logs, [p.grad.clone() for p in m.vqgan.parameters()]

    ref_loss, _, ref_grads = run(plain, 0)
    loss, logs, gen_grads = run(late, 2)
    assert logs["d_loss"] == 0 and logs["g_adv"] == 0 and logs["disc_weight"] == 0
    assert torch.equal(loss, ref_loss)  # no effect on the tokenizer ...
    assert all(torch.equal(a, b) for a, b in zip(gen_grads, ref_grads))
    assert all(p.grad is not None and not p.grad.any() for p in late.disc.parameters())  # ... D in the graph, 0 grad
    loss, logs, gen_grads = run(late, 3)
    assert logs["d_loss"] > 0 and logs["disc_weight"] > 0
    assert any(p.grad.any() for p in late.disc.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(gen_grads, ref_grads))


# ------------------------------------------------------------------------------- other loss terms
def test_entropy_loss_prefers_uniform_code_usage():
    codebook = 3 * torch.eye(8)  # 8 well-separated codes in 8-d
    uniform = codebook.t().reshape(1, 8, 2, 4)  # 8 positions, each on a different code
    collapsed = codebook[0].view(1, 8, 1, 1).expand(1, 8, 2, 4).contiguous()
    lu, su, mu = codebook_entropy_loss(uniform, codebook, 0.01)
    lc, sc, mc = codebook_entropy_loss(collapsed, codebook, 0.01)
    assert lu < lc
    assert su.item() == pytest.approx(0, abs=1e-4) and mu.item() == pytest.approx(torch.log(torch.tensor(8.0)).item(),
                                                                                  abs=1e-3)
    assert lc.item() == pytest.approx(0, abs=1e-3)
    z = (collapsed + 0.5 * torch.randn(collapsed.shape)).requires_grad_(True)
    cb = codebook.clone().requires_grad_(True)
    codebook_entropy_loss(z, cb, 1.0)[0].backward()
    assert z.grad.abs().sum() > 0 and cb.grad.abs().sum() > 0


def test_code_restarts_initialise_from_data_then_replace_only_dead_codes():
    m = method(restart_every=3).train()
    x = images(2)
    z = m.vqgan.encode_latent(x).detach().permute(0, 2, 3, 1).reshape(-1, MODEL["z_channels"])
    m.forward_loss({"image": x, "step": 0})
    book = m.vqgan.quantize.embedding.weight.detach().clone()
    assert all((z == row).all(1).any() for row in book)  # step 0: every code starts on a latent of the batch
    used = m.code_usage > 0
    assert 0 < used.sum() < len(used) and m.code_usage.sum() == z.shape[0]
    m.forward_loss({"image": x, "step": 1})  # not a restart step: the codebook stays
    assert torch.equal(m.vqgan.quantize.embedding.weight, book)
    with torch.no_grad():
        m.vqgan.quantize.embedding.weight[~used] += 100.0  # make the unused codes clearly different
    moved = m.vqgan.quantize.embedding.weight.detach().clone()
    m.forward_loss({"image": x, "step": 3})
    after = m.vqgan.quantize.embedding.weight.detach()
    assert torch.equal(after[used], moved[used])  # used codes keep their place
    assert (after[~used] - moved[~used]).abs().min() > 50  # dead ones came back onto the data
    m.forward_loss({"image": x, "step": 3})  # a second micro-step of the same step: no second restart
    assert torch.equal(m.vqgan.quantize.embedding.weight, after)
    assert "code_usage" in m.state_dict()  # saved with the training state (exact resume)
    m.eval()
    usage = m.code_usage.clone()
    m.forward_loss({"image": x, "step": 6})  # evaluation never restarts or counts
    assert torch.equal(m.vqgan.quantize.embedding.weight, after) and torch.equal(m.code_usage, usage)


def test_perceptual_and_entropy_terms_add_up():
    m = method(perceptual="lite0", perceptual_size=32, perceptual_weight=0.3, entropy_weight=0.1)
    loss, logs = m.forward_loss({"image": images(), "step": 0})
    assert logs["perceptual"] > 0 and "entropy" in logs
    expected = logs["recon"] + 0.3 * logs["perceptual"] + logs["vq"] + 0.1 * logs["entropy"]
    torch.testing.assert_close(loss.detach(), expected)


# ------------------------------------------------------------------------------------ training runs
GAN_RUN = ["data.limit=32", "train.batch_size=4", "tokenizer.disc=patch", "tokenizer.disc_start=2", "tokenizer.disc_layers=2",
           "tokenizer.disc_channels=8", "tokenizer.perceptual=lite0", "tokenizer.perceptual_size=32", "tokenizer.entropy_weight=0.1",
           "tokenizer.restart_every=2", "log.progress=false"]


def losses(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["d_loss"]) for r in rows if "loss" in r}


def final_state(run: Path) -> dict:
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    return {**load_file(str(ckpt / "model.safetensors")), **safe_torch_load(ckpt / "training_state.pt")["method_extra"]}


@pytest.mark.slow
def test_gan_training_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    maskgen.api.train("tokenizer", "tokenizer-tiny", GAN_RUN + ["train.max_steps=4"], run_dir=straight)
    maskgen.api.train("tokenizer", "tokenizer-tiny", GAN_RUN + ["train.max_steps=2"], run_dir=resumed)
    maskgen.api.train("tokenizer", "tokenizer-tiny", GAN_RUN + ["train.max_steps=4"], run_dir=resumed, resume="auto")
    a, b = final_state(straight), final_state(resumed)
    assert any(k.startswith("disc.") for k in a) and not any("perceptual" in k for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = losses(straight)
    assert la == losses(resumed) and sorted(la) == [1, 2, 3, 4]
    assert la[2][1] == 0 and la[3][1] > 0  # the discriminator switched on at disc_start


@pytest.mark.slow
@pytest.mark.dist
def test_two_process_ddp_with_gan_r1_and_perceptual_matches_one_process(tmp_path):
    """Adaptive weight and entropy loss use whole-batch statistics: they are averaged over ranks, so two
    processes x 2 images train exactly like one process x 4 images (up to float rounding)."""
    worker = REPO / "tests" / "engine" / "ddp_worker.py"
    common = ["data.limit=32", "train.max_steps=2", "optim.clip_grad=0", "tokenizer.disc=stylegan",
              "tokenizer.disc_channels=8", "tokenizer.disc_start=0", "tokenizer.r1_weight=10", "tokenizer.perceptual=lite0",
              "tokenizer.perceptual_size=32", "tokenizer.entropy_weight=0.1", "log.progress=false"]
    run_worker(worker, tmp_path / "ddp", "train.batch_size=2", *common, nproc=2)
    run_worker(worker, tmp_path / "single", "train.batch_size=4", *common)
    worst = ddp_vs_single_weights(tmp_path / "ddp", tmp_path / "single")
    assert worst < 1e-4, worst
    a, b = final_state(tmp_path / "ddp" / "run"), final_state(tmp_path / "single" / "run")
    assert any(k.startswith("disc.") for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    rows = {s: [json.loads(line) for line in (tmp_path / s / "run" / "metrics.jsonl").read_text().splitlines()]
            for s in ("ddp", "single")}
    for r, q in zip(rows["ddp"], rows["single"]):
        if "loss" in r:
            assert "r1" in r and r["disc_weight"] > 0 and r["d_loss"] > 0
            assert abs(r["disc_weight"] - q["disc_weight"]) < 1e-3 * q["disc_weight"], (r, q)
            assert abs(r["loss"] - q["loss"]) < 1e-4 * abs(q["loss"]), (r, q)


@pytest.mark.slow
@pytest.mark.dist
def test_two_process_code_restarts_stay_in_lock_step(tmp_path):
    worker = REPO / "tests" / "engine" / "ddp_worker.py"
    run_worker(worker, tmp_path, "data.limit=32", "train.batch_size=2", "train.max_steps=2", "tokenizer.restart_every=1",
               "log.progress=false", nproc=2)
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert "code_usage" in final_state(tmp_path / "run")
