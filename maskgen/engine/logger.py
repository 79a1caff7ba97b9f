"""Run logging on rank 0: `metrics.jsonl` (one JSON object per logged step), TensorBoard events."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("maskgen")


def setup_logging(rank: int = 0) -> None:
    """Warnings and info from the `maskgen` logger go to stderr, prefixed by the rank under torchrun."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank {rank}] " if rank else ""
    handler.setFormatter(logging.Formatter(f"{prefix}maskgen: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


class RunLogger:
    """Writes metrics of a run; on ranks other than 0 every call is a no-op."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int = 0):
        """`resume_step`: the step the run starts from (0: a fresh start). Rows logged after it, by a run that was
        killed before its next checkpoint (or by an earlier run that never saved one), are dropped, so that every
        step is logged once."""
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.is_file():
            self._truncate_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
            except ImportError:
                log.warning("tensorboard is not installed: writing metrics.jsonl only")

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` by a run that was killed before its next checkpoint."""
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by a crash
                pass
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def image(self, tag: str, image_chw, step: int) -> None:
        """An image tensor [3,H,W] in [0,1] into TensorBoard (PNG files are written by the hooks themselves)."""
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, image_chw, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
