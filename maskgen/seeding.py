"""Seeds: every random stream of maskgen is a `torch.Generator` seeded from integers, so runs are reproducible
and a resumed run continues exactly."""
from __future__ import annotations

import torch


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across processes and Python versions."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x >> 1


def per_image_generators(seed: int, first: int, count: int, device="cpu") -> list[torch.Generator]:
    """One generator per image, seeded by (seed, image index): image i is the same whatever the batch size."""
    return [torch.Generator(device).manual_seed(mix_seed(seed, first + i)) for i in range(count)]
