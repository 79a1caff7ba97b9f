"""Shared fixtures: the CIFAR-10 (JPEG) shards in ../shared/data/cifar10, small image folders, a CLI runner."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

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


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
