"""Teacher-feature cache: K augmented views (and their mirror images) of every image with a frozen teacher's features
of each, in one file, so that MR-MAE on a CPU does not run its teacher every step.

The views are the token cache's (`token_cache.augmented_views`: view 0 the centre view, views 1..K-1
RandomResizedCrops keyed by (seed, source index, view), each also mirrored), so the cache is a finite set of
crops: MR-MAE trains on those crops (a random (view, flip) per image and epoch) instead of fresh ones.

    images        uint8   [N, K, 2, 3, S, S]  the view pixels the student reads
    features      float16 [N, K, 2, C, h, w]  the teacher's feature map of each view
    labels        int64   [N]
    source_index  int64   [N]
and string metadata: format, format_version, teacher (spec), teacher_id (`Teacher.identity()`), transform (JSON),
transform_hash, image_size, views, skipped, source.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError
from ..models.teachers import Teacher, load_teacher
from ..outputs import atomic_write, check_free_space, prepare_file
from ..seeding import mix_seed
from .sources import open_source
from .token_cache import ViewChunks, transform_description

log = logging.getLogger("maskgen")

FORMAT = "maskgen-teacher-cache"
FORMAT_VERSION = 1


def write_teacher_cache(teacher: Teacher, source, out: str | os.PathLike, views: int, image_size: int,
                        crop_scale=(0.2, 1.0), interpolation: str = "bicubic", batch_size: int = 64, seed: int = 0,
                        device: str | torch.device = "cpu", progress: bool = True) -> Path:
    """Run `teacher` on `views` views (+ flips) of every readable image of `source`; write the cache to `out`
    atomically. `batch_size` counts teacher inputs (views). Returns `out`."""
    if views < 1 or batch_size < 1:
        raise UserError(f"views and batch size must be >= 1, got {views} and {batch_size}")
    teacher = teacher.to(device)
    with torch.no_grad():
        c, h, w = teacher(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1:]
    n = len(source)
    images = torch.empty(n, views, 2, 3, image_size, image_size, dtype=torch.uint8)
    features = torch.empty(n, views, 2, c, h, w, dtype=torch.float16)
    labels = torch.empty(n, dtype=torch.int64)
    source_index = torch.empty(n, dtype=torch.int64)
    out = prepare_file(out, "teacher cache")
    check_free_space(out.parent, images.numel() + 2 * features.numel() + 16 * n + 65536, "the teacher cache")
    rows = 0
    chunks = ViewChunks(source, views, image_size, crop_scale, interpolation, seed, max(1, batch_size // (2 * views)),
                        "cache-teacher", progress)
    with torch.no_grad():
        for x, chunk_labels, chunk_index in chunks:
            m = len(x)
            x = (x.flatten(0, 2) * 255).round().to(torch.uint8)  # [m*K*2, 3, S, S]: what the student will read
            f = torch.cat([teacher(b.to(device).float() / 255).float().cpu() for b in x.split(batch_size)])
            images[rows:rows + m] = x.view(m, views, 2, 3, image_size, image_size)
            features[rows:rows + m] = f.view(m, views, 2, c, h, w).to(torch.float16)
            labels[rows:rows + m] = chunk_labels
            source_index[rows:rows + m] = chunk_index
            rows += m
    skipped = chunks.skipped
    transform = json.dumps(transform_description(image_size, crop_scale, interpolation, views, seed), sort_keys=True)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "teacher": teacher.spec,
                "teacher_id": teacher.identity(), "transform": transform,
                "transform_hash": hashlib.sha256(transform.encode()).hexdigest(), "image_size": str(image_size),
                "views": str(views), "skipped": str(skipped),
                "source": getattr(source, "description", type(source).__name__)}
    with atomic_write(out) as tmp:
        save_file({"images": images[:rows], "features": features[:rows], "labels": labels[:rows],
                   "source_index": source_index[:rows]}, str(tmp), metadata=metadata)
    return out


class TeacherCache:
    """A teacher cache file, memory-mapped: `view(index, view, flip)` -> (image [3, S, S] in [0, 1], features
    [C, h, w] float32). Attributes: metadata, views, image_size, teacher, teacher_id, transform, labels,
    source_index. Picklable: a copy sent to a DataLoader worker reopens the file there."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"no such teacher cache: {self.path}")
        try:
            handle = safe_open(str(self.path), "pt")
            meta = handle.metadata() or {}
        except Exception as e:
            raise UserError(f"{self.path} is not a teacher cache (not a safetensors file: {e})") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"{self.path} is not a teacher cache: build one with `maskgen cache-teacher`")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise UserError(f"teacher cache {self.path} has format version {meta['format_version']}, newer than this "
                            f"maskgen reads ({FORMAT_VERSION}): upgrade maskgen or rebuild the cache")
        self.metadata = meta
        self.views, self.image_size = int(meta["views"]), int(meta["image_size"])
        self.teacher, self.teacher_id = meta["teacher"], meta["teacher_id"]
        self.transform = json.loads(meta["transform"])
        self.labels = handle.get_tensor("labels")
        self.source_index = handle.get_tensor("source_index")
        self._open()

    def _open(self):
        self._handle = safe_open(str(self.path), "pt")
        self._images, self._features = self._handle.get_slice("images"), self._handle.get_slice("features")
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_handle", "_images", "_features")} | {"_pid": None}

    def view(self, index: int, view: int = 0, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pid != os.getpid():  # a forked worker opens its own mapping
            self._open()
        return (self._images[index, view, int(flip)].float() / 255, self._features[index, view, int(flip)].float())

    def check(self, teacher: Teacher, image_size: int, crop_scale, interpolation: str) -> None:
        """Raise UserError unless the cache was made with `teacher` (spec, input size and weights) and this crop
        policy."""
        rebuild = "rebuild it with `maskgen cache-teacher`"
        if teacher.identity() != self.teacher_id:
            raise UserError(f"teacher cache {self.path} was made with teacher '{self.teacher}' ({self.teacher_id}), "
                            f"not the configured '{teacher.spec}' at {teacher.input_size} px ({teacher.identity()}): "
                            f"{rebuild}")
        want = {"image_size": image_size, "crop_scale": [float(s) for s in crop_scale], "interpolation": interpolation}
        have = {k: self.transform[k] for k in want}
        if have != want:
            raise UserError(f"teacher cache {self.path} holds views made with {have}, but the run uses {want}: "
                            f"{rebuild}")


class CachedTeacherViews:
    """A dataset in the loader's key protocol over one cache per teacher (made from the same data and views):
    `dataset[(epoch, index)]` -> {"image": [3, S, S], "teacher_features_t": [C_t, h_t, w_t] per teacher t, "label",
    "index"}, the (view, flip) drawn uniformly from the stored 2K (K without flips when hflip=False) by a generator
    keyed by (seed, epoch, index)."""

    def __init__(self, caches: list[TeacherCache], seed: int, hflip: bool = True):
        first = caches[0]
        for other in caches[1:]:
            if other.transform != first.transform or not torch.equal(other.source_index, first.source_index):
                raise UserError(f"teacher caches {first.path} and {other.path} hold different images or views: build "
                                f"them from the same data with the same --views, --seed and crop settings")
        self.caches, self.seed, self.hflip = caches, seed, hflip

    def __len__(self) -> int:
        return len(self.caches[0])

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
        k = self.caches[0].views
        choice = int(torch.randint(2 * k if self.hflip else k, (), generator=g))
        view, flip = (choice // 2, bool(choice % 2)) if self.hflip else (choice, False)
        item = {"label": int(self.caches[0].labels[index]), "index": index}
        for t, cache in enumerate(self.caches):
            image, feats = cache.view(index, view, flip)
            item["image"] = image
            item[f"teacher_features_{t}"] = feats
        return item


def cache_teacher(teacher_spec: str, data: str, out: str | os.PathLike, *, image_size: int, views: int = 1,
                  teacher_image_size: int = 0, split: str = "train", crop_scale=(0.2, 1.0),
                  interpolation: str = "bicubic", batch_size: int = 64, seed: int = 0, device: str = "cpu",
                  progress: bool = True) -> Path:
    """`maskgen cache-teacher`: load the teacher `teacher_spec` (see `models.teachers`), open `data` at `split`, and
    write the teacher cache of its views to `out`."""
    prepare_file(out, "teacher cache")
    teacher = load_teacher(teacher_spec, teacher_image_size)
    return write_teacher_cache(teacher, open_source(str(data), split), out, views, image_size, crop_scale,
                               interpolation, batch_size, seed, device, progress)
