"""Training-step speed (img/s) of `maskgen train tokenizer` on the CPU: fp32 / bf16 autocast x NCHW / NHWC.

One step = the tokenizer method's forward_loss (VQGAN, VQ, the preset's other terms, code tracking) + backward
+ AdamW, on random images, as the trainer runs it with `train.precision` and `train.memory_format`. The cells are
timed in interleaved rounds (every cell once per round, the median over rounds) so that a machine whose speed
drifts affects all cells alike; the ratio column compares each layout with NCHW at the same precision.

    python benchmarks/tokenizer_train_step.py [--config tokenizer-cifar10] [model.ch=64 ...] [--rounds 5]
"""
from __future__ import annotations

import argparse
import sys

import torch

from common import add_out_argument, report, timeit
from maskgen.api import build_config
from maskgen.precision import autocast
from maskgen.registry import METHODS

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def make_step(cfg, precision: str, memory_format: str):
    torch.manual_seed(0)
    fmt = FORMATS[memory_format]
    method = METHODS.get("tokenizer").from_config(cfg).to(memory_format=fmt).train()
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
    x = torch.rand(cfg.train.batch_size, 3, cfg.data.image_size, cfg.data.image_size).contiguous(memory_format=fmt)
    ctx = autocast(precision, "cpu")

    def step():
        with ctx:
            loss, _ = method.forward_loss({"image": x, "step": 1})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="tokenizer-cifar10")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. model.ch=64")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per cell and round")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    add_out_argument(ap, "tokenizer_train_step")
    args = ap.parse_args()
    cfg = build_config("tokenizer", args.config, args.overrides)
    cells = {(p, f): make_step(cfg, p, f) for p in args.precisions for f in FORMATS}
    times = {key: [] for key in cells}
    for r in range(args.rounds):
        for key, step in cells.items():
            times[key].append(timeit(step, min_time=args.min_time, warmup=2 if r == 0 else 0))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{p}/{f} {cfg.train.batch_size / times[(p, f)][-1]:.0f}" for p, f in cells), file=sys.stderr)
    median = {key: sorted(t)[len(t) // 2] for key, t in times.items()}
    params = sum(p.numel() for p in METHODS.get("tokenizer").from_config(cfg).vqgan.parameters())
    rows = [{"config": " ".join([args.config, *args.overrides]), "VQGAN params M": params / 1e6,
             "batch": cfg.train.batch_size, "px": cfg.data.image_size, "precision": p, "memory format": f,
             "img/s": cfg.train.batch_size / median[(p, f)],
             "vs NCHW": median[(p, "contiguous")] / median[(p, f)]} for p, f in cells]
    report(args.out, rows, "python benchmarks/tokenizer_train_step.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
