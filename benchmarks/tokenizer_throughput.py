"""Encode / decode throughput (img/s) of the VQGAN tokenizer at 32 px (tokenizer-cifar10) and 256 px (official
MAGE tokenizer), fp32 and bf16 autocast. Random weights: speed does not depend on their values.

    python benchmarks/tokenizer_throughput.py [--min-time 3]
"""
from __future__ import annotations

import argparse
import sys

import torch

from common import add_out_argument, report, timeit
from maskgen.api import build_config
from maskgen.precision import autocast, cpu_bf16_speedup
from maskgen.models.vqgan import VQGAN, VQGANConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds of timing per cell")
    add_out_argument(ap, "tokenizer_throughput")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setups = [("tokenizer-cifar10", build_config("tokenizer", "tokenizer-cifar10").model, 32, 64),
              ("official MAGE (256 px)", VQGANConfig(), 256, 4)]
    emulated_bf16 = device.type == "cpu" and cpu_bf16_speedup() < 0.5
    rows = []
    for name, cfg, size, batch in setups:
        model = VQGAN(cfg).to(device).eval()
        x_full = torch.rand(batch, 3, size, size, device=device)
        with torch.no_grad():
            codes_full = model.encode(x_full)
        for precision in ("fp32", "bf16"):
            ctx = autocast(precision, device)
            # emulated bf16 (CPUs without bf16 units) is 30-40x slower: time batch/8 images, one call, no warm-up
            # (a warm-up call is negligible next to a minute-long call, and one 256 px call takes minutes)
            slow = precision == "bf16" and emulated_bf16
            n = max(1, batch // 8) if slow else batch
            x, codes = x_full[:n], codes_full[:n]
            timing = dict(min_time=0.0, warmup=0, min_calls=1) if slow else dict(min_time=args.min_time)

            def enc():
                with ctx, torch.no_grad():
                    model.encode(x)

            def dec():
                with ctx, torch.no_grad():
                    model.decode(codes)

            rows.append({"model": name, "px": size, "tokens": f"{codes.shape[1]}x{codes.shape[2]}", "batch": n,
                         "precision": precision, "encode img/s": n / timeit(enc, **timing),
                         "decode img/s": n / timeit(dec, **timing),
                         "note": "emulated bf16: one call" if slow else ""})
            print(rows[-1], file=sys.stderr)
    report(args.out, rows, "python benchmarks/tokenizer_throughput.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
