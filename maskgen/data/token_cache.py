"""Token cache: the tokenizer codes of K augmented views (and their mirror images) of every image, in one file.

MAGE re-runs the VQGAN on every training step. `write_token_cache` runs it once per view instead, and
`CachedTokens` serves a random (view, flip) per (epoch, index), so training skips the tokenizer.

View 0 is the plain evaluation view (shorter side resized to `image_size`, centre crop); views 1..K-1 are
RandomResizedCrops drawn from a generator keyed by (seed, source index, view), so a cache is reproducible.
Every view is also stored horizontally flipped.

The file is one safetensors file, memory-mapped when read:

    tokens        uint16 [N, K, 2, h, w]  codes of image n, view k, flip f (0 = as is, 1 = mirrored)
    labels        int64  [N]             class labels (-1 = unlabeled)
    source_index  int64  [N]             index of each image in its source (unreadable images are left out)

and string metadata: format, format_version, tokenizer_hash, tokenizer (config JSON), transform (JSON),
transform_hash, image_size, codebook_size, grid_h, grid_w, views, skipped, source.
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
from torch import nn

from ..errors import UserError
from ..models.pretrained import from_pretrained, model_config_dict
from ..outputs import atomic_write, check_free_space, prepare_file
from ..progress import progress_bar
from ..seeding import mix_seed
from .decode import BadImage, decode_image
from .sources import open_source
from .transforms import INTERPOLATIONS, EvalTransform, PretrainTransform

log = logging.getLogger("maskgen")

FORMAT = "maskgen-token-cache"
FORMAT_VERSION = 1
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range, as in PretrainTransform


def tokenizer_hash(model: nn.Module) -> str:
    """sha256 (hex) of a registered model's config JSON and its state_dict (sorted names, dtypes, shapes, raw
    bytes): the same across processes, devices and save_pretrained / from_pretrained round trips."""
    h = hashlib.sha256(json.dumps(model_config_dict(model), sort_keys=True).encode())
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def transform_description(image_size: int, crop_scale, interpolation: str, views: int, seed: int) -> dict:
    """The JSON-able recipe of the cached views (what `transform_hash` hashes)."""
    return {"image_size": image_size, "view0": "resize shorter side + centre crop",
            "crop_scale": [float(s) for s in crop_scale], "ratio": list(RATIO), "interpolation": interpolation,
            "views": views, "flips": True, "seed": seed}


def _validate(tokenizer: nn.Module, views: int, image_size: int, crop_scale, interpolation: str,
              batch_size: int) -> None:
    cfg = getattr(tokenizer, "config", None)
    if not hasattr(tokenizer, "encode") or not hasattr(cfg, "codebook_size"):
        raise UserError(f"{type(tokenizer).__name__} is not a tokenizer (it has no encode() / codebook_size)")
    if cfg.codebook_size > 65536:
        raise UserError(f"token caches store uint16 codes: codebook_size {cfg.codebook_size} exceeds 65536")
    if views < 1:
        raise UserError(f"views must be >= 1, got {views}")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    f = cfg.downsample_factor
    if image_size < f or image_size % f:
        raise UserError(f"image size {image_size} is not a positive multiple of the tokenizer's downsample factor {f}")
    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        raise UserError(f"crop scale: expected 0 < min <= max <= 1, got {list(crop_scale)}")
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")


def augmented_views(img, index: int, views: int, centre: EvalTransform, crop: PretrainTransform, seed: int) -> torch.Tensor:
    """One image -> its views [K, 2, 3, S, S] in [0, 1]: view 0 the centre view, then random crops; [:, 1] mirrored."""
    out = [centre(img)]
    for v in range(1, views):
        out.append(crop(img, torch.Generator().manual_seed(mix_seed(seed, index, v))))
    x = torch.stack(out)
    return torch.stack([x, x.flip(-1)], dim=1)


class ViewChunks:
    """Iterate over the readable images of `source` in chunks of `per_chunk` images: (views [m, K, 2, 3, S, S] in
    [0, 1] (`augmented_views`), labels int64 [m], source indices int64 [m]). Unreadable images are skipped with a
    warning and counted in `.skipped`; a source without any readable image is a UserError at the end."""

    def __init__(self, source, views: int, image_size: int, crop_scale, interpolation: str, seed: int,
                 per_chunk: int, desc: str, progress: bool = True):
        self.source, self.views, self.seed, self.per_chunk = source, views, seed, per_chunk
        self.desc, self.progress, self.skipped = desc, progress, 0
        self.centre = EvalTransform(image_size, interpolation=interpolation)
        self.crop = PretrainTransform(image_size, crop_scale, RATIO, interpolation, hflip=False)

    def __iter__(self):
        n, rows = len(self.source), 0
        with progress_bar(total=n, unit="img", desc=self.desc, enabled=self.progress) as bar:
            for start in range(0, n, self.per_chunk):
                chunk, labels, index = [], [], []
                for i in range(start, min(start + self.per_chunk, n)):
                    sample = self.source[i]
                    try:
                        img = decode_image(sample.data) if isinstance(sample.data, bytes) else sample.data
                    except BadImage as e:
                        self.skipped += 1
                        log.warning("skipped unreadable image %s (%s) [%d skipped so far]", sample.name, e,
                                    self.skipped)
                        continue
                    chunk.append(augmented_views(img, i, self.views, self.centre, self.crop, self.seed))
                    labels.append(sample.label)
                    index.append(i)
                bar.update(min(self.per_chunk, n - start))
                if chunk:
                    rows += len(chunk)
                    yield torch.stack(chunk), torch.tensor(labels, dtype=torch.int64), torch.tensor(index)
        if rows == 0:
            raise UserError(f"no readable images in {getattr(self.source, 'description', 'the data')} "
                            f"({self.skipped} skipped)")
        if self.skipped:
            log.warning("%d unreadable images were skipped; the cache holds %d", self.skipped, rows)


def write_token_cache(tokenizer: nn.Module, source, out: str | os.PathLike, views: int, image_size: int,
                      crop_scale=(0.2, 1.0), interpolation: str = "bicubic", batch_size: int = 64, seed: int = 0,
                      device: str | torch.device = "cpu", progress: bool = True,
                      memory_format: str = "contiguous") -> Path:
    """Encode `views` views (+ their flips) of every readable image of `source` and write the cache to `out`
    atomically. `batch_size` counts tokenizer inputs (views), not images. Unreadable images are skipped with a
    warning and counted in the metadata. `memory_format="channels_last"` encodes in NHWC (the tokenizer module is
    converted in place): the same codes; on a Xeon with AMX in fp32 the encode is 1.4x and a cache build
    1.04-1.5x faster (BENCHMARKS.md, "MAGE speed"); other CPUs unmeasured. Returns `out`."""
    _validate(tokenizer, views, image_size, crop_scale, interpolation, batch_size)
    if memory_format not in ("contiguous", "channels_last"):
        raise UserError(f"memory_format must be 'contiguous' or 'channels_last', got {memory_format!r}")
    layout = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    cfg = tokenizer.config
    grid = image_size // cfg.downsample_factor
    tokenizer = tokenizer.to(device, memory_format=layout).eval()

    n = len(source)
    tokens = torch.empty(n, views, 2, grid, grid, dtype=torch.uint16)
    labels = torch.empty(n, dtype=torch.int64)
    source_index = torch.empty(n, dtype=torch.int64)
    out = prepare_file(out, "token cache")
    check_free_space(out.parent, tokens.numel() * tokens.element_size() + 16 * n + 65536, "the token cache")
    rows = 0
    chunks = ViewChunks(source, views, image_size, crop_scale, interpolation, seed, max(1, batch_size // (2 * views)),
                        "cache-tokens", progress)
    with torch.no_grad():
        for x, chunk_labels, chunk_index in chunks:
            m = len(x)
            codes = torch.cat([tokenizer.encode(b.to(device).contiguous(memory_format=layout)).cpu()
                               for b in x.flatten(0, 2).split(batch_size)])
            tokens[rows:rows + m] = codes.view(m, views, 2, grid, grid).to(torch.uint16)
            labels[rows:rows + m] = chunk_labels
            source_index[rows:rows + m] = chunk_index
            rows += m
    skipped = chunks.skipped

    transform = json.dumps(transform_description(image_size, crop_scale, interpolation, views, seed), sort_keys=True)
    metadata = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "tokenizer": json.dumps(model_config_dict(tokenizer), sort_keys=True),
        "transform": transform, "transform_hash": hashlib.sha256(transform.encode()).hexdigest(),
        "image_size": str(image_size), "codebook_size": str(cfg.codebook_size),
        "grid_h": str(grid), "grid_w": str(grid), "views": str(views), "skipped": str(skipped),
        "source": getattr(source, "description", type(source).__name__),
    }
    with atomic_write(out) as tmp:
        save_file({"tokens": tokens[:rows], "labels": labels[:rows], "source_index": source_index[:rows]},
                  str(tmp), metadata=metadata)
    return out


def _short(h: str) -> str:
    return h[:12] + "..."


class TokenCache:
    """A token cache file, memory-mapped: `tokens(index, view, flip)` reads one [h, w] slice from disk.

    Attributes: `metadata` (str -> str), `views` (K), `grid` ((h, w)), `image_size`, `codebook_size`,
    `tokenizer_hash`, `transform` (dict), `skipped`, `labels` (int64 [N]), `source_index` (int64 [N]).
    Picklable: a copy sent to a DataLoader worker reopens the file there.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"no such token cache: {self.path}")
        try:
            handle = safe_open(str(self.path), "pt")
            meta = handle.metadata() or {}
            keys = set(handle.keys())
        except Exception as e:  # safetensors raises SafetensorError / OSError for anything else
            raise UserError(f"{self.path} is not a token cache (not a safetensors file: {e})") from None
        if meta.get("format") != FORMAT or not {"tokens", "labels", "source_index"} <= keys:
            raise UserError(f"{self.path} is not a token cache (a safetensors file without maskgen token-cache "
                            f"metadata): build one with `maskgen cache-tokens`")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise UserError(f"token cache {self.path} has format version {meta['format_version']}, newer than this "
                            f"maskgen reads ({FORMAT_VERSION}): upgrade maskgen or rebuild the cache")
        self.metadata = meta
        self.views = int(meta["views"])
        self.grid = (int(meta["grid_h"]), int(meta["grid_w"]))
        self.image_size = int(meta["image_size"])
        self.codebook_size = int(meta["codebook_size"])
        self.tokenizer_hash = meta["tokenizer_hash"]
        self.transform = json.loads(meta["transform"])
        self.skipped = int(meta["skipped"])
        self.labels = handle.get_tensor("labels")
        self.source_index = handle.get_tensor("source_index")
        self._handle, self._tokens, self._pid = handle, handle.get_slice("tokens"), os.getpid()

    def __len__(self) -> int:
        return len(self.labels)

    def tokens(self, index: int, view: int = 0, flip: bool = False) -> torch.Tensor:
        """Codes of image `index`, view `view` (0 = centre), mirrored when `flip`: LongTensor [h, w]."""
        if self._pid != os.getpid():  # a forked worker opens its own mapping
            self._handle = safe_open(str(self.path), "pt")
            self._tokens, self._pid = self._handle.get_slice("tokens"), os.getpid()
        return self._tokens[index, view, int(flip)].long()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_handle", "_tokens")} | {"_pid": None}

    def check(self, tokenizer: nn.Module | None = None, image_size: int | None = None,
              crop_scale=None, interpolation: str | None = None) -> None:
        """Raise UserError unless the cache was made with `tokenizer` (by hash), at `image_size`, with
        `crop_scale` and `interpolation`; arguments left None are not checked."""
        rebuild = "rebuild it with `maskgen cache-tokens`"
        if tokenizer is not None:
            want = tokenizer_hash(tokenizer)
            if want != self.tokenizer_hash:
                raise UserError(f"token cache {self.path} was made with tokenizer {_short(self.tokenizer_hash)}, "
                                f"but the configured tokenizer is {_short(want)}: {rebuild} and this tokenizer")
        if image_size is not None and image_size != self.image_size:
            h, w = self.grid
            raise UserError(f"token cache {self.path} holds {self.image_size} px images ({h}x{w} tokens), but the "
                            f"configured image size is {image_size}: {rebuild} --image-size {image_size}")
        if crop_scale is not None and [float(s) for s in crop_scale] != self.transform["crop_scale"]:
            raise UserError(f"token cache {self.path} holds crops of scale {self.transform['crop_scale']}, but the "
                            f"configured crop scale is {list(crop_scale)}: {rebuild}")
        if interpolation is not None and interpolation != self.transform["interpolation"]:
            raise UserError(f"token cache {self.path} was resized with {self.transform['interpolation']}, but the "
                            f"configured interpolation is {interpolation}: {rebuild}")


class CachedTokens:
    """A dataset in the loader's key protocol over a TokenCache:
    `dataset[(epoch, index)]` -> {"tokens": LongTensor [h, w], "label": int, "index": int}, where the
    (view, flip) pair is drawn uniformly from the 2K stored ones by a generator keyed by (seed, epoch, index).
    With views=2, "tokens2" holds a second, different (view, flip) pair of the same image. hflip=False draws
    from the K unflipped views only (data whose mirror image is not a valid sample, such as digits)."""

    def __init__(self, cache: TokenCache, seed: int, views: int = 1, hflip: bool = True):
        self.cache, self.seed, self.views, self.hflip = cache, seed, views, hflip
        if views > (2 if hflip else 1) * cache.views:
            raise UserError(f"data.views={views} needs at least {views} distinct cached views per image; the "
                            f"token cache holds {cache.views}{' (+ flips)' if hflip else ''}")

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
        choices = torch.randperm(2 * self.cache.views, generator=g)[: self.views].tolist() if self.hflip else \
            [2 * v for v in torch.randperm(self.cache.views, generator=g)[: self.views].tolist()]
        item = {"tokens": self.cache.tokens(index, choices[0] // 2, bool(choices[0] % 2)),
                "label": int(self.cache.labels[index]), "index": index}
        if self.views == 2:
            item["tokens2"] = self.cache.tokens(index, choices[1] // 2, bool(choices[1] % 2))
        return item


def cache_tokens(tokenizer_dir: str | os.PathLike, data: str, out: str | os.PathLike, *, image_size: int,
                 views: int = 10, split: str = "train", crop_scale=(0.2, 1.0), interpolation: str = "bicubic",
                 batch_size: int = 64, seed: int = 0, device: str = "cpu", progress: bool = True,
                 memory_format: str = "contiguous") -> Path:
    """`maskgen cache-tokens`: load the tokenizer saved in `tokenizer_dir` (weights, checkpoint or run directory),
    open `data` (folder, shards, 'cifar10', ...) at `split`, and write the token cache to `out`."""
    prepare_file(out, "token cache")
    tokenizer = from_pretrained(tokenizer_dir, device=device)
    source = open_source(str(data), split)
    return write_token_cache(tokenizer, source, out, views, image_size, crop_scale, interpolation, batch_size,
                             seed, device, progress, memory_format)
