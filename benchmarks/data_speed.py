"""Can the data path keep up with MAGE's training step? img/s of the data alone, per source, on CIFAR-10 (JPEG).

    python benchmarks/data_speed.py [--images 2048] [--cache-images 512] [--views 1 10] [--out PATH.json]

Rows:
- loader, images: `ResumableLoader` over the `mage-cifar10-cpu` preset's data (JPEG decode, random resized crop,
  flip) at its batch size, with 0 and 2 workers: what a run without a token cache reads per second.
- cache-tokens: `write_token_cache` (what `maskgen cache-tokens` runs: decode, the centre view + V-1 crops, their
  flips, the tokenizer's encode) with a `tokenizer-cifar10` model of random weights (speed does not depend on the
  weights) for each --views, in images of the source per second (2V encodes each), with the tokenizer in NCHW
  and in channels_last (`cache-tokens --memory-format`).
- loader, token cache: `ResumableLoader` over `CachedTokens` of that cache: what a run with a token cache reads.
Compare with the training step's img/s in `mage_speed.py` (BENCHMARKS.md, "MAGE speed").
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out_argument, report  # noqa: E402

from maskgen.api import build_config  # noqa: E402
from maskgen.data.loader import AugmentedImages, ResumableLoader  # noqa: E402
from maskgen.data.sources import open_source  # noqa: E402
from maskgen.data.token_cache import CachedTokens, TokenCache, write_token_cache  # noqa: E402
from maskgen.data.transforms import build_transform  # noqa: E402
from maskgen.models.vqgan import VQGAN  # noqa: E402


def loader_rate(dataset, batch: int, workers: int, limit: int, batches: int) -> float:
    """img/s of `batches` batches from a fresh ResumableLoader (its start-up included)."""
    loader = ResumableLoader(dataset, batch, seed=0, num_workers=workers, limit=limit)
    t0 = time.perf_counter()
    n = 0
    for i, b in enumerate(loader):
        n += len(b["index"])
        if i + 1 == batches:
            break
    return n / (time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2048, help="images read by each loader row (default 2048)")
    ap.add_argument("--cache-images", type=int, default=512, help="images encoded by each cache row (default 512)")
    ap.add_argument("--views", type=int, nargs="+", default=[1, 10], help="views per image of the cache rows")
    ap.add_argument("--data", default="cifar10", help="data source (default cifar10, the JPEG copy)")
    add_out_argument(ap, "data_speed")
    args = ap.parse_args(argv)
    cfg = build_config("mage", "mage-cifar10-cpu", [f"data.path={args.data}"])
    batch = cfg.train.batch_size
    if min(args.images, args.cache_images) < batch:
        ap.error(f"--images and --cache-images must be at least the preset's batch size ({batch})")
    source = open_source(cfg.data.path, "train")
    images = AugmentedImages(source, build_transform(cfg.data), 0)
    rows = []

    def add(what, detail, rate):
        rows.append({"what": what, "detail": detail, "img/s": rate})
        print(rows[-1], file=sys.stderr, flush=True)

    for workers in (0, 2):
        add("loader, images", f"batch {batch}, {workers} workers, {args.images} images",
            loader_rate(images, batch, workers, args.images, args.images // batch))
    tokenizer = VQGAN(build_config("tokenizer", "tokenizer-cifar10").model).eval()
    subset = _Subset(source, args.cache_images)
    with torch.no_grad():  # warm-up of both layouts' convolution kernels, outside the timed rows
        for layout in (torch.channels_last, torch.contiguous_format):
            tokenizer.to(memory_format=layout).encode(torch.rand(64, 3, 32, 32).contiguous(memory_format=layout))
    with tempfile.TemporaryDirectory() as tmp:
        for views in args.views:
            for layout in ("contiguous", "channels_last"):
                out = Path(tmp) / f"cache{views}.safetensors"
                t0 = time.perf_counter()
                write_token_cache(tokenizer, subset, out, views, cfg.data.image_size, progress=False,
                                  memory_format=layout)
                add(f"cache-tokens (fp32 encode, {layout})", f"{views} views + flips, {args.cache_images} images",
                    args.cache_images / (time.perf_counter() - t0))
        cached = CachedTokens(TokenCache(out), 0)
        n = min(args.images, args.cache_images)
        add("loader, token cache", f"batch {batch}, 0 workers, {n} images",
            loader_rate(cached, batch, 0, 0, n // batch))
    report(args.out, rows, "python benchmarks/data_speed.py " + " ".join(sys.argv[1:] if argv is None else argv))


class _Subset:
    """The first n samples of a source (same interface: len, [i], description)."""

    def __init__(self, source, n: int):
        self.source, self.n = source, min(n, len(source))
        self.description = f"{getattr(source, 'description', 'source')} (first {self.n})"

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.source[i]


if __name__ == "__main__":
    main()
