"""Training runs that lose nothing: one writer per run directory, readers safe while checkpoints are pruned, logs
that resume exactly, and a diverging run that stops instead of saving NaN weights."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import maskgen
from maskgen.engine.checkpoint import save_checkpoint
from maskgen.engine.logger import RunLogger
from maskgen.engine.run_lock import RunDirLock
from maskgen.errors import RunError
from maskgen.models import create_model

from conftest import REPO, run_cli

TINY = ["train", "tokenizer", "--config", "tokenizer-tiny", "data.path=mnist5k", "data.limit=64",
        "log.tensorboard=false"]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_lock_refuses_a_second_holder_and_frees_on_release(tmp_path):
    with RunDirLock(tmp_path / "run"):
        with pytest.raises(RunError, match=r"in use by another training \(pid \d+ on "):
            RunDirLock(tmp_path / "run").acquire()
    with RunDirLock(tmp_path / "run"):  # released: the next writer gets it
        pass


@pytest.mark.slow
def test_two_writers_on_one_run_directory(tmp_path):
    """A second training (fresh or --resume auto) on a run directory in use is refused with one line, and the first
    finishes untouched; once the first has ended (even killed), the directory can be resumed."""
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "maskgen", *TINY, "train.epochs=10000", "train.save_every=1",
                              "--run-dir", str(run)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        t0 = time.time()
        while not any((run / "checkpoints").glob("step_????????")):
            assert first.poll() is None and time.time() - t0 < 120, first.stderr.read()[-2000:]
            time.sleep(0.05)
        for resume in ([], ["--resume", "auto"]):
            second = run_cli(*TINY, "train.max_steps=3", "--run-dir", run, *resume)
            assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
            assert "in use by another training" in second.stderr and f"pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first writer runs on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    steps = [r["step"] for r in rows(run) if "loss" in r]
    assert steps == sorted(set(steps))  # one writer: every step once, in order
    resumed = run_cli(*TINY, f"train.max_steps={max(steps) + 2}", "--run-dir", run, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_readers_never_see_a_checkpoint_being_pruned(tmp_path):
    """from_pretrained(RUN) while a writer saves with keep_last=1 (each save deletes the previous step): every read
    returns a model, none fails."""
    model = create_model("vqgan", ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, codebook_size=16,
                         norm_groups=8)
    root = tmp_path / "run" / "checkpoints"
    state = dict(training_state={"optimizer": {}}, trainer_state={"step": 0, "loader": {}}, config_yaml="",
                 keep_last=1)
    save_checkpoint(root, 0, model, **state)
    stop, errors = threading.Event(), []

    def writer():
        step = 1
        while not stop.is_set():
            save_checkpoint(root, step, model, **state)
            step += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(60):
            try:
                maskgen.from_pretrained(tmp_path / "run")
            except Exception as e:  # noqa: BLE001 (any failure is the bug)
                errors.append(repr(e))
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]


def test_metrics_log_trimmed_to_the_start_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    RunLogger(tmp_path, True, False, resume_step=2).close()
    assert [r["step"] for r in map(json.loads, log.read_text().splitlines())] == [1, 2]
    RunLogger(tmp_path, True, False, resume_step=0).close()  # a fresh start (or a resume with no checkpoint)
    assert log.read_text() == ""


@pytest.mark.slow
def test_killed_before_the_first_checkpoint_then_resumed_logs_every_step_once(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "train.max_steps=12", "train.save_every=1000", "log.every=1", "--run-dir", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "maskgen", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not ((run / "metrics.jsonl").is_file() and len(rows(run)) >= 3):
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").glob("step_????????"))
    run_cli(*args, "--resume", "auto", check=True)
    steps = [r["step"] for r in rows(run) if "loss" in r]
    assert steps == list(range(1, 13)), Counter(steps)


@pytest.mark.slow
def test_a_diverging_run_stops_with_the_step_and_saves_no_nan_weights(tmp_path):
    """optim.lr=1e38: the second update makes the loss non-finite. The run must not report 'done' with a checkpoint
    of broken weights: it stops (exit 1), names the steps, and keeps the last good checkpoint."""
    run = tmp_path / "run"
    proc = run_cli(*TINY, "optim.lr=1e38", "train.max_steps=4", "train.save_every=1", "log.every=1",
                   "--run-dir", run)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "training diverged" in proc.stderr and "step" in proc.stderr
    last_good = max(r["step"] for r in rows(run) if "loss" in r and r["loss"] == r["loss"])  # NaN != NaN
    saved = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_????????"))
    assert saved and max(saved) <= last_good and f"step_{max(saved):08d}" in proc.stderr
    weights = maskgen.from_pretrained(run).state_dict()
    assert all(bool(t.isfinite().all()) for t in weights.values() if t.is_floating_point())
    assert rows(run)[-1]["skipped_steps"] >= 1
