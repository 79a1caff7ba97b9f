"""The command line's error boundary, and outputs checked before the work: full and read-only file systems."""
from __future__ import annotations

import contextlib
import errno
import io
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maskgen import cli
from maskgen.errors import RunError, UserError
from maskgen.outputs import atomic_write, check_free_space, prepare_dir, prepare_file

from conftest import run_cli


def invoke(argv, monkeypatch=None) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def fail_with(exc):
    def run(args):
        raise exc
    return run


@pytest.mark.parametrize("exc, code, words", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out.png"), 1, "no space left on device"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), 1, "read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 1, "permission denied"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 490"), 1, "no space left"),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), 1, "no space left"),
    (RunError("training diverged"), 1, "training diverged"),
    (UserError("bad --box"), 2, "bad --box"),
])
def test_expected_failures_are_one_line_with_their_exit_code(monkeypatch, exc, code, words):
    monkeypatch.setattr(cli, "run", fail_with(exc))
    got, err = invoke(["config", "list"])
    assert got == code and err.startswith("maskgen: error:") and err.count("\n") == 1 and words in err, err
    if getattr(exc, "filename", None):
        assert exc.filename in err


def test_debug_shows_the_traceback_and_bugs_are_not_hidden(monkeypatch):
    monkeypatch.setattr(cli, "run", fail_with(OSError(errno.ENOSPC, "No space left on device", "/x")))
    with pytest.raises(OSError):
        invoke(["--debug", "config", "list"])
    with pytest.raises(OSError):
        invoke(["config", "list", "--debug"])
    monkeypatch.setenv("MASKGEN_DEBUG", "1")
    with pytest.raises(OSError):
        invoke(["config", "list"])
    monkeypatch.delenv("MASKGEN_DEBUG")
    monkeypatch.setattr(cli, "run", fail_with(ZeroDivisionError("a bug")))  # a bug keeps its traceback
    with pytest.raises(ZeroDivisionError):
        invoke(["config", "list"])


def test_outputs_are_checked_before_the_work(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        prepare_dir(tmp_path / "f" / "sub")
    with pytest.raises(UserError, match="is a folder"):
        prepare_file(tmp_path)
    assert prepare_file(tmp_path / "a" / "b" / "r.json").parent.is_dir()
    with pytest.raises(RunError, match="not enough disk space"):
        check_free_space(tmp_path, 2**62, "a checkpoint")


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    out = tmp_path / "result.bin"
    with pytest.raises(OSError):
        with atomic_write(out) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with atomic_write(out) as tmp:
        tmp.write_bytes(b"done")
    assert out.read_bytes() == b"done" and list(tmp_path.iterdir()) == [out]



def test_weights_interrupted_while_rewritten_leave_no_weights_folder(tmp_path, monkeypatch):
    from maskgen import weights
    from maskgen.weights import CONFIG_FILE, EMA_FILE, WEIGHTS_FILE, read_model_config, write_weights
    old = {"w": torch.zeros(3)}
    write_weights(tmp_path, old, {"model": "a", "config": {}}, ema_state=old)
    real_save = weights.save_file

    def save_then_fail(tensors, path):
        real_save(tensors, path)
        Path(path).write_bytes(Path(path).read_bytes()[:20])  # truncated, as by a kill or a full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights, "save_file", save_then_fail)
    with pytest.raises(OSError):
        write_weights(tmp_path, {"w": torch.ones(300)}, {"model": "b", "config": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_FILE]  # the old, whole file; no temporaries
    assert torch.equal(load_file(tmp_path / WEIGHTS_FILE)["w"], old["w"])
    with pytest.raises(UserError, match=f"holds no {CONFIG_FILE}"):
        read_model_config(tmp_path)  # the folder no longer claims to hold a model
    monkeypatch.setattr(weights, "save_file", real_save)
    write_weights(tmp_path, {"w": torch.ones(300)}, {"model": "b", "config": {}})
    assert read_model_config(tmp_path)["model"] == "b" and not (tmp_path / EMA_FILE).exists()

# ------------------------------------------------------------------------------ real small file systems
@contextlib.contextmanager
def small_filesystem(tmp_path: Path, size: str, read_only: bool = False):
    """A tmpfs of `size` mounted under tmp_path (needs root and mount rights: skipped otherwise)."""
    mnt = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_training_on_a_full_disk_stops_cleanly_and_resumes_exactly(tmp_path):
    """Checkpoints that no longer fit: one line naming the cause, no step_N.tmp left, the earlier checkpoints
    intact, and after space is freed the resumed run equals an uninterrupted one."""
    tiny = ["train", "tokenizer", "--config", "tokenizer-tiny", "data.path=mnist5k", "data.limit=64",
            "log.tensorboard=false", "train.keep_last=10", "train.save_every=2", "train.max_steps=8"]
    straight = run_cli(*tiny, "--run-dir", tmp_path / "straight", check=True)
    assert straight.returncode == 0
    # a checkpoint of tokenizer-tiny is ~8.5 MB: room for the run's small files and two of them
    with small_filesystem(tmp_path, "20m") as mnt:
        full = run_cli(*tiny, "--run-dir", mnt / "run")
        assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-2000:]
        assert "no space left on device" in full.stderr, full.stderr[-500:]
        assert "--resume auto" in full.stderr
        ckpts = sorted(p.name for p in (mnt / "run" / "checkpoints").iterdir())
        assert ckpts and not any(name.endswith(".tmp") for name in ckpts), ckpts
        for name in ckpts[:-1]:  # free space: keep the newest complete checkpoint
            subprocess.run(["rm", "-r", str(mnt / "run" / "checkpoints" / name)], check=True)
        resumed = run_cli(*tiny, "train.keep_last=1", "--run-dir", mnt / "run", "--resume", "auto", check=True)
        assert resumed.returncode == 0
        w1 = load_file(str(tmp_path / "straight" / "checkpoints" / "step_00000008" / "model.safetensors"))
        w2 = load_file(str(mnt / "run" / "checkpoints" / "step_00000008" / "model.safetensors"))
        assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_outputs_on_full_and_read_only_file_systems(tmp_path, tiny_models):
    with small_filesystem(tmp_path, "64k") as mnt:
        with pytest.raises(OSError), open(mnt / "filler", "wb") as f:  # fill the disk
            f.write(b"\0" * 70_000)
        code, err = invoke(["features", "--ckpt", str(tiny_models["tok"]), "--data", "mnist5k", "--split", "test",
                            "--limit", "8", "--image-size", "32", "--out", str(mnt / "f.safetensors")])
        assert code == 1 and "no space left on device" in err and "Traceback" not in err, err
        assert sorted(p.name for p in mnt.iterdir()) == ["filler"]  # no partial file
    with small_filesystem(tmp_path, "1m", read_only=True) as ro:
        for argv in (["generate", "--ckpt", str(tiny_models["mage"]), "--out", str(ro / "g"), "--num-images", "1"],
                     ["features", "--ckpt", str(tiny_models["tok"]), "--data", "mnist5k", "--out", str(ro / "f")],
                     ["eval", "knn", "--ckpt", str(tiny_models["tok"]), "--data", "mnist5k", "--json",
                      str(ro / "knn.json")],
                     ["train", "tokenizer", "--config", "tokenizer-tiny", "--run-dir", str(ro / "run")]):
            code, err = invoke(argv)
            assert code == 1 and "read-only file system" in err and "Traceback" not in err, (argv, err)
