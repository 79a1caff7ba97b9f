"""Shared fixtures: the CIFAR-10 (JPEG) shards in ../shared/data/cifar10, small image folders, a CLI runner, tiny saved
models and files to poke at (`tiny_models`)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"


def cifar_jpegs(n: int, split: str = "test") -> list[tuple[bytes, int]]:
    """The first `n` (jpeg bytes, label) pairs of a CIFAR-10 shard."""
    out = []
    with tarfile.open(CIFAR / f"{split}-000000.tar") as tf:
        for m in tf.getmembers():
            if m.name.endswith(".jpg"):
                label = int(tf.extractfile(m.name[:-4] + ".cls").read())
                out.append((tf.extractfile(m).read(), label))
                if len(out) == n:
                    break
    return out


def make_folder(root: Path, n: int, labeled: bool = True) -> Path:
    """A folder of `n` CIFAR test JPEGs, in class sub-folders when `labeled`."""
    for i, (data, label) in enumerate(cifar_jpegs(n)):
        d = root / str(label) if labeled else root
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:04d}.jpg").write_bytes(data)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "images", 64)


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m maskgen ARGS` in a subprocess (cwd = repo), capturing text output."""
    proc = subprocess.run([sys.executable, "-m", "maskgen", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"maskgen {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_worker(worker: Path, *args, nproc: int = 1, timeout: float = 300) -> None:
    """Run a test worker script alone (nproc 1) or under `torchrun --standalone` (a free port) with `nproc`
    processes on gloo; fail with the end of its stderr."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
              if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launch, str(worker), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def ddp_vs_single_weights(ddp: Path, single: Path) -> float:
    """For the `rank{r}.safetensors` files that tests/engine/ddp_worker.py writes: assert that the two DDP ranks
    hold identical weights (lock-step) and return the largest |difference| between rank 0 and the one-process run."""
    from safetensors.torch import load_file

    r0, r1 = (load_file(str(ddp / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    one = load_file(str(single / "rank0.safetensors"))
    return max((r0[k] - one[k]).abs().max().item() for k in r0)


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Weights folders built from the tokenizer-tiny / mage-tiny presets (random weights, saved in a second), an
    image, a file that is not an image, and a plain file."""
    from PIL import Image

    from maskgen.config import build_config
    from maskgen.models import create_model, save_pretrained
    from maskgen.registry import METHODS

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    tok_cfg = build_config(METHODS.get("tokenizer"), "tokenizer-tiny").model
    tok = create_model("vqgan", **vars(tok_cfg))
    save_pretrained(tok, root / "tok")
    mage = create_model("mage", **vars(build_config(METHODS.get("mage"), "mage-tiny").model))
    mage.set_tokenizer(tok)
    save_pretrained(mage, root / "mage")
    Image.new("RGB", (32, 32), (90, 40, 20)).save(root / "in.png")
    (root / "text.png").write_text("not an image")
    (root / "afile").write_text("a file, not a folder")
    return {"tok": root / "tok", "mage": root / "mage", "image": root / "in.png", "text": root / "text.png",
            "file": root / "afile", "root": root}
