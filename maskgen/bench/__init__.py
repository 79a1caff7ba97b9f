"""`maskgen bench cifar10`: every method at equal budget on CIFAR-10, with baselines, one JSON per method, a
markdown table and plots.

- `plan`: the methods (presets, views), the full and quick protocols, the budget rule.
- `measure`: feature scores, FD-lite0 of samples and of the tokenizer's reconstructions, MAE's panel.
- `record`: the per-method JSON filled stage by stage (what makes the benchmark resumable).
- `cifar10`: the run itself (`run_bench`); `report`: the table and plots from the JSON alone.
"""
from .cifar10 import run_bench
from .report import publish, render

__all__ = ["run_bench", "render", "publish"]
