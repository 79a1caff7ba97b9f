"""What machine a measurement ran on: CPU model, bf16 units, threads, accelerator and torch version."""
from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), with its bf16 matrix units (AMX, AVX512_BF16) when it has them."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == (platform.processor() or platform.machine()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    units = [u for u, flag in (("AMX", "amx_bf16"), ("AVX512_BF16", "avx512_bf16")) if flag in flags]
    return f"{name} ({', '.join(units)})" if units else name


def describe() -> str:
    """One line: CPU (and bf16 units); GPU or 'CPU only, N cores'; torch version; torch threads."""
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU only, {os.cpu_count()} cores"
    return f"{cpu_model()}; {dev}; torch {torch.__version__}; {torch.get_num_threads()} threads"
