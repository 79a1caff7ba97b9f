"""Choosing the training precision: `train.precision=auto` picks bf16 autocast only where it is faster.

On CPUs without native bf16 matmul units (e.g. AVX2-only x86), bf16 autocast is not 2x faster but one to three
orders of magnitude slower (measured on such a CPU: fp32 matmul ~40 GFLOP/s per core, bf16 ~0.16). `auto` times
a small matmul in both and keeps fp32 unless bf16 wins; an explicit `bf16` that would be slower gets a warning.
"""
from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("maskgen")


def _matmul_seconds(dtype: torch.dtype, n: int = 128, reps: int = 3) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a 128x128 matmul on this CPU (> 1: bf16 is faster). Takes milliseconds
    where bf16 is fast and up to ~0.1 s where it is emulated."""
    return _matmul_seconds(torch.float32) / _matmul_seconds(torch.bfloat16)


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on CUDA with bf16 support or on a CPU where bf16 matmuls are faster, else 'fp32'.
    Explicit values are kept (with a warning for bf16 on a CPU where it is slower)."""
    if device.type == "cuda":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp32") if requested == "auto" else requested
    if requested not in ("auto", "bf16"):
        return requested
    speedup = cpu_bf16_speedup()
    if requested == "auto":
        chosen = "bf16" if speedup > 1.2 else "fp32"
        log.info("train.precision=auto: %s (bf16 matmul is %.2gx the speed of fp32 on this CPU)", chosen, speedup)
        return chosen
    if speedup < 1.0:
        log.warning("train.precision=bf16 on a CPU where bf16 matmuls run at %.2gx the speed of fp32: expect a very "
                    "slow run; use train.precision=auto or fp32", speedup)
    return requested
