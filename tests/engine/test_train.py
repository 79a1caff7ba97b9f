"""End-to-end training through the CLI: outputs, exact resume after SIGKILL, SIGTERM, DDP equivalence."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import maskgen
from maskgen.models.vqgan import VQGAN

from conftest import REPO, ddp_vs_single_weights, run_cli, run_worker

pytestmark = pytest.mark.slow
TINY = ["--config", "tokenizer-tiny", "data.path=cifar10", "data.limit=128"]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def evaluations(run: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if any(k.startswith("eval/") for k in r)]


def final_weights(run: Path) -> dict:
    return load_file(str(sorted((run / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))


def popen_train(run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "maskgen", "train", "tokenizer", *TINY, "--run-dir", str(run),
                             *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, f"timed out waiting for {path}"
        time.sleep(0.002)


def test_train_writes_run_directory(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", "tokenizer", *TINY, "train.max_steps=3", "train.ema_decay=0.9", "log.tensorboard=true",
                   "--run-dir", run, check=True)
    assert "Traceback" not in proc.stderr
    assert (run / "config.yaml").is_file() and "max_steps: 3" in (run / "config.yaml").read_text()
    assert sorted(losses(run)) == [1, 2, 3]
    ckpt = run / "checkpoints" / "step_00000003"
    for f in ("model.safetensors", "ema.safetensors", "config.json", "training_state.pt", "trainer.json",
              "train_config.yaml"):
        assert (ckpt / f).is_file(), f
    assert list((run / "tensorboard").iterdir())
    assert list((run / "samples").glob("recon_step_00000003.png"))
    model = maskgen.from_pretrained(run)
    assert isinstance(model, VQGAN) and model.config.codebook_size == 64
    ema = maskgen.from_pretrained(run, ema=True)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), ema.state_dict().values()))
    # the same run dir without --resume is refused rather than overwritten
    again = run_cli("train", "tokenizer", *TINY, "train.max_steps=3", "--run-dir", run)
    assert again.returncode == 2 and "--resume auto" in again.stderr and "Traceback" not in again.stderr


def test_resume_after_sigkill_is_exact(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli("train", "tokenizer", *TINY, "train.max_steps=8", "--run-dir", straight, check=True)
    proc = popen_train(killed, "train.save_every=4")  # would run all 32 steps
    wait_for(killed / "checkpoints" / "step_00000004", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in (killed / "checkpoints").glob("step_????????")] == ["step_00000004"]
    run_cli("train", "tokenizer", *TINY, "train.max_steps=8", "train.save_every=4", "--run-dir", killed,
            "--resume", "auto", check=True)
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight) == losses(killed) and sorted(losses(killed)) == list(range(1, 9))
    # the end-of-run evaluation reads a fixed set of images: the same row whether or not the run was interrupted
    assert evaluations(straight) == evaluations(killed) and evaluations(killed)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    proc = popen_train(run)
    wait_for(run / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "stopped by SIGTERM" in err
    step = max(losses(run))
    assert (run / "checkpoints" / f"step_{step:08d}").is_dir()
    run_cli("train", "tokenizer", *TINY, f"train.max_steps={step + 2}", "--run-dir", run, "--resume", "auto",
            check=True)
    assert max(losses(run)) == step + 2


@pytest.mark.dist
def test_two_process_ddp_matches_single_process(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    common = ["data.path=cifar10", "data.limit=128", "train.max_steps=4", "optim.clip_grad=0"]
    run_worker(worker, tmp_path / "ddp", "train.batch_size=4", *common, nproc=2)
    run_worker(worker, tmp_path / "single", "train.batch_size=8", *common)
    worst = ddp_vs_single_weights(tmp_path / "ddp", tmp_path / "single")
    assert worst < 1e-4, worst
    ddp_losses, single_losses = losses(tmp_path / "ddp" / "run"), losses(tmp_path / "single" / "run")
    assert ddp_losses.keys() == single_losses.keys()
    assert all(abs(ddp_losses[s] - single_losses[s]) < 1e-5 for s in ddp_losses)


def test_channels_last_trains_like_contiguous_and_resumes(tmp_path):
    """train.memory_format=channels_last changes the layout, not the maths: the same losses as NCHW up to conv
    rounding, contiguous weights on disk, and a resume that continues the same run. The default is NCHW. (Not
    bit-exact across processes: oneDNN's NHWC convolutions differed by 1e-6 at step 1 between two identical runs on
    a 2-core Xeon with AMX; the NCHW resume tests stay bit-exact.)"""
    nchw, nhwc, resumed = tmp_path / "nchw", tmp_path / "nhwc", tmp_path / "resumed"
    run_cli("train", "tokenizer", *TINY, "train.max_steps=6", "--run-dir", nchw, check=True)
    assert "memory_format: contiguous" in (nchw / "config.yaml").read_text()
    last = ["train.memory_format=channels_last"]
    run_cli("train", "tokenizer", *TINY, "train.max_steps=6", *last, "--run-dir", nhwc, check=True)
    assert "memory_format: channels_last" in (nhwc / "config.yaml").read_text()
    a, b = losses(nchw), losses(nhwc)
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-3 for s in a), (a, b)
    run_cli("train", "tokenizer", *TINY, "train.max_steps=3", "train.save_every=3", *last, "--run-dir", resumed,
            check=True)
    run_cli("train", "tokenizer", *TINY, "train.max_steps=6", *last, "--run-dir", resumed, "--resume", "auto",
            check=True)
    c = losses(resumed)
    assert c.keys() == b.keys() and all(abs(c[s] - b[s]) < 1e-4 for s in b), (b, c)
    w, v = final_weights(nhwc), final_weights(resumed)
    assert all(t.is_contiguous() and torch.allclose(t, v[k], atol=1e-4) for k, t in w.items())
    assert maskgen.from_pretrained(nhwc).encode(torch.rand(2, 3, 32, 32)).shape == (2, 8, 8)


def test_channels_last_puts_conv_weights_and_images_in_nhwc(tmp_path):
    from maskgen.api import build_config
    from maskgen.engine.trainer import Trainer

    cfg = build_config("tokenizer", "tokenizer-tiny", ["data.limit=16", "train.memory_format=channels_last"])
    trainer = Trainer(cfg, torch.device("cpu"), tmp_path / "run", None)
    weight = trainer.method.vqgan.encoder.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    images = trainer._to_device(torch.rand(2, 3, 32, 32))
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    assert trainer._to_device(torch.arange(3)).is_contiguous()  # labels and the like are left alone
