"""Choosing the precision of training (`train.precision`) and of sampling (the samplers' `precision`): `auto`
picks bf16 autocast only where it is faster.

On CPUs without native bf16 matmul units (e.g. AVX2-only x86), bf16 autocast is not 2x faster but about 10x
slower (measured on such a CPU, one core: fp32 `F.linear` ~80-90 GFLOP/s, bf16 ~10; a MAGE training step 13x
slower). `auto` times a small `F.linear` (the kernel of nn.Linear) in both and keeps fp32 unless bf16 wins; an
explicit `bf16` that would be slower gets a warning.
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch
import torch.nn.functional as F

log = logging.getLogger("maskgen")


def _matmul_seconds(dtype: torch.dtype, n: int = 256, reps: int = 3) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    F.linear(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        F.linear(a, b)
        best = min(best, time.perf_counter() - t)
    return best


def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a 256x256 F.linear on this CPU (> 1: bf16 is faster); a few milliseconds."""
    return _matmul_seconds(torch.float32) / _matmul_seconds(torch.bfloat16)


def resolve_precision(requested: str, device: torch.device, what: str = "train.precision") -> str:
    """'auto' -> 'bf16' on CUDA with bf16 support or on a CPU where bf16 matmuls are faster, else 'fp32'.
    Explicit values are kept (with a warning for bf16 on a CPU where it is slower); `what` names the option
    in the log."""
    if device.type == "cuda":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp32") if requested == "auto" else requested
    if requested not in ("auto", "bf16"):
        return requested
    speedup = cpu_bf16_speedup()
    if requested == "auto":
        chosen = "bf16" if speedup > 1.2 else "fp32"
        log.info("%s=auto: %s (bf16 matmul is %.2gx the speed of fp32 on this CPU)", what, chosen, speedup)
        return chosen
    if speedup < 1.0:
        log.warning("%s=bf16 on a CPU where bf16 matmuls run at %.2gx the speed of fp32: expect a very "
                    "slow run; use %s=auto or fp32", what, speedup, what)
    return requested


def autocast(precision: str, device: torch.device | str):
    """The autocast context of a resolved precision ('fp32', 'bf16' or 'fp16') on `device`."""
    device_type = torch.device(device).type
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type, dtype=torch.float16)
    return contextlib.nullcontext()
