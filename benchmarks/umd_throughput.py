"""UMD throughput on this machine: training steps (images/s) and DDIM sampling (images/s per step count, with and
without classifier-free guidance) of a preset's model (default `umd-cifar10-cpu`: 6 x 192 encoder, 4 x 192 decoder,
patch 4 on 32 px). Random weights: speed does not depend on them (sampling of a class-conditional copy).

    python benchmarks/umd_throughput.py [--config umd-cifar10-cpu] [--batch 128] [--gen-batch 80]
        [--steps 25 50 125] [--min-time 3] [--precision fp32 bf16]

- train: one optimizer step (the UMD loss of the preset: half the batch clean at 75 % masking, half noised at
  37.5 %; backward; AdamW) on random images, fp32 or bf16 autocast.
- sample: `DDIMScheduler.generate` of --gen-batch images at S steps (S + 1 network calls), cfg 1 (one pass per call)
  and cfg 1.5 (two: the batch with its labels and with the null class), fp32 (what `maskgen generate` runs).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out_argument, report, timeit  # noqa: E402

from maskgen.api import build_config  # noqa: E402
from maskgen.precision import autocast as autocast_for  # noqa: E402
from maskgen.methods.umd import umd_loss  # noqa: E402
from maskgen.models.umd import UMD  # noqa: E402
from maskgen.sampling import DDIMScheduler  # noqa: E402


def run(args) -> list[dict]:
    torch.manual_seed(0)
    cfg = build_config("umd", args.config)
    rows = []
    model = UMD(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(args.batch, 3, cfg.model.image_size, cfg.model.image_size)
    for precision in args.precision:
        ac = autocast_for(precision, torch.device("cpu"))

        def step():
            model.train()
            with ac:
                loss, _ = umd_loss(model, model.to_model_space(images), None, cfg.objective)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        s = timeit(step, args.min_time, warmup=1)
        rows.append({"what": "train step", "precision": precision, "batch": args.batch, "steps": "",
                     "cfg": "", "s/call": round(s, 4), "img/s": round(args.batch / s, 1)})
    cond = UMD(dataclasses.replace(cfg.model, num_classes=10)).eval()
    for steps in args.steps:
        for cfg_scale in (1.0, 1.5):
            sampler = DDIMScheduler(steps=steps, cfg=cfg_scale)
            s = timeit(lambda: sampler.generate(cond, args.gen_batch, torch.Generator().manual_seed(0)),
                       args.min_time, warmup=0, min_calls=1)
            rows.append({"what": "sample (DDIM, eta 1)", "precision": "fp32", "batch": args.gen_batch,
                         "steps": steps, "cfg": cfg_scale, "s/call": round(s, 3),
                         "img/s": round(args.gen_batch / s, 2)})
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="umd-cifar10-cpu", help="a UMD preset (default umd-cifar10-cpu)")
    ap.add_argument("--batch", type=int, default=128, help="training batch (default 128)")
    ap.add_argument("--gen-batch", type=int, default=80, help="images per sampling call (default 80)")
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 50, 125], help="DDIM step counts (default 25 50 125)")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds of timed calls per cell (default 3)")
    add_out_argument(ap, "umd_throughput")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = run(args)
    command = "python benchmarks/umd_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report(args.out, rows, command.strip())


if __name__ == "__main__":
    main()
