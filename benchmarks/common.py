"""Shared benchmark helpers: timing, machine description, table printing, JSON output."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from maskgen.machine import describe

RESULTS = Path(__file__).resolve().parent / "results"  # what BENCHMARKS.md cites: written only when --out names it


def add_out_argument(ap, name: str) -> None:
    """`--out PATH.json`, by default runs/benchmarks/NAME.json under the working directory (never the checkout's
    tracked results: pass --out benchmarks/results/NAME.json to record a run for BENCHMARKS.md)."""
    ap.add_argument("--out", type=Path, default=Path("runs") / "benchmarks" / f"{name}.json",
                    help=f"result JSON (default runs/benchmarks/{name}.json)")


def machine() -> str:
    return describe()


def timeit(fn, min_time: float = 3.0, warmup: int = 2, min_calls: int = 3) -> float:
    """Seconds per call of fn(), the median of at least `min_calls` timed runs lasting `min_time` in total."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < min_calls:
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def print_table(rows: list[dict], title: str = "") -> None:
    """Print rows (dicts with the same keys) as a text table, under `title` if given."""
    if title:
        print(f"\n{title}")
    cols = list(rows[0])
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(_fmt(r[c]).ljust(w) for c, w in zip(cols, widths)))


def report(out: str | os.PathLike, rows: list[dict], command: str, extra: dict | None = None) -> None:
    """Print rows as a table and write them with the machine, the command and `extra` (more JSON fields) to the
    JSON file `out`."""
    print_table(rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
                               "rows": rows, **(extra or {})}, indent=2) + "\n")
    print(f"\nmachine: {machine()}\nwrote {out}")


def _fmt(v) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)
