"""Printing an evaluation as a table and writing it as JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..outputs import atomic_write, prepare_file


def format_table(title: str, rows: list[tuple[str, object]]) -> str:
    """A two-column text table: `title`, then `name  value` lines (floats with 4 significant decimals)."""
    cells = [(name, f"{v:.4f}" if isinstance(v, float) else str(v)) for name, v in rows]
    width = max([len(n) for n, _ in cells] + [len(title)])
    lines = [title, "-" * (width + 2 + max([len(v) for _, v in cells] + [0]))]
    lines += [f"{n:<{width}}  {v}" for n, v in cells]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, result: dict) -> Path:
    """Write `result` (plain types) to `path` atomically, creating its folder."""
    path = prepare_file(path, "result file")
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return path
