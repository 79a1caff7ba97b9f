"""Reconstruction quality of a trained tokenizer on a test split: PSNR, codebook usage and perplexity.

    python benchmarks/tokenizer_quality.py --ckpt runs/tok [--data cifar10 --split test --image-size 32]
        [--save-recon DIR]   # also write every reconstruction as DIR/NNNNNN.png (for `maskgen eval fid`)
"""
from __future__ import annotations

import argparse
import sys

from pathlib import Path

import torch
from torchvision.utils import save_image

from common import add_out_argument, report
from maskgen.data.decode import decode_image
from maskgen.data.sources import open_source
from maskgen.data.transforms import EvalTransform
from maskgen.progress import progress_bar
from maskgen.models import from_pretrained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", default="cifar10", help="any data source: folder, shards, 'cifar10' (default)")
    ap.add_argument("--split", default="test", help="split of --data (default test; 'train' for data without splits)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=250)
    add_out_argument(ap, "tokenizer_quality")
    ap.add_argument("--save-recon", help="write the reconstructions as PNG files into this folder")
    args = ap.parse_args()
    model = from_pretrained(args.ckpt).eval()
    source = open_source(args.data, args.split)
    transform = EvalTransform(args.image_size)
    k = model.config.codebook_size
    counts = torch.zeros(k)
    psnrs = []
    for start in progress_bar(range(0, len(source), args.batch_size), unit="batch", desc="reconstruct"):
        batch = []
        for i in range(start, min(start + args.batch_size, len(source))):
            d = source[i].data
            batch.append(transform(d if not isinstance(d, bytes) else decode_image(d)))
        x = torch.stack(batch)
        with torch.no_grad():
            codes = model.encode(x)
            y = model.decode(codes)
        mse = (y - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        psnrs.append(-10 * torch.log10(mse))
        if args.save_recon:
            out = Path(args.save_recon)
            out.mkdir(parents=True, exist_ok=True)
            for j, img in enumerate(y.clamp(0, 1)):
                save_image(img, out / f"{start + j:06d}.png")
        counts += torch.bincount(codes.flatten(), minlength=k).float()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    rows = [{"ckpt": args.ckpt, "data": f"{args.data}:{args.split}", "images": len(source),
             "tokens": "x".join(map(str, codes.shape[1:])), "codebook": k,
             "PSNR dB": float(torch.cat(psnrs).mean()), "codes used %": float((counts > 0).float().mean() * 100),
             "perplexity": perplexity}]
    report(args.out, rows, "python benchmarks/tokenizer_quality.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
