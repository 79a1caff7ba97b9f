"""Encode / decode throughput (img/s) of the VQGAN tokenizer at 32 px (tokenizer-cifar10) and 256 px (official
MAGE tokenizer), fp32 and bf16 autocast. Random weights: speed does not depend on their values.

    python benchmarks/tokenizer_throughput.py [--min-time 3]
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from common import report, timeit
from maskgen.config import build_config
from maskgen.models.vqgan import VQGAN, VQGANConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds of timing per cell")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setups = [("tokenizer-cifar10", build_config("tokenizer", "tokenizer-cifar10").model, 32, 64),
              ("official MAGE (256 px)", VQGANConfig(), 256, 4)]
    rows = []
    for name, cfg, size, batch in setups:
        model = VQGAN(cfg).to(device).eval()
        x = torch.rand(batch, 3, size, size, device=device)
        codes = model.encode(x)
        for precision in ("fp32", "bf16"):
            ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                   else contextlib.nullcontext())

            def enc():
                with ctx, torch.no_grad():
                    model.encode(x)

            def dec():
                with ctx, torch.no_grad():
                    model.decode(codes)

            rows.append({"model": name, "px": size, "tokens": f"{codes.shape[1]}x{codes.shape[2]}", "batch": batch,
                         "precision": precision, "encode img/s": batch / timeit(enc, args.min_time),
                         "decode img/s": batch / timeit(dec, args.min_time)})
            print(rows[-1], file=sys.stderr)
    report("tokenizer_throughput", rows, "python benchmarks/tokenizer_throughput.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
