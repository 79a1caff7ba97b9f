"""One JSON file per method or baseline, filled stage by stage, so that an interrupted benchmark redoes nothing that
finished: a stage's result is written (atomically) as soon as it exists, and a later run reads it back."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..eval.report import write_json

log = logging.getLogger("maskgen")


class Record:
    """`path` (NAME.json): {"name", **header, "stages": {stage: result}}. A file already there is read back whole;
    `header` fields are set over it on every run."""

    def __init__(self, path: Path, name: str, **header):
        self.path = path
        old = {}
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"{path} is not a readable benchmark result ({e}): delete it to redo that part") from None
        self.data = {"stages": {}, **old, "name": name, **header}

    def get(self, stage: str):
        return self.data["stages"].get(stage)

    def stage(self, stage: str, fn: Callable[[], dict]) -> dict:
        """The stored result of `stage`, else fn()'s (with the seconds it took), stored at once."""
        if stage in self.data["stages"]:
            return self.data["stages"][stage]
        log.info("bench: %s: %s", self.data["name"], stage)
        start = time.perf_counter()
        result = fn()
        result = {**result, "seconds": round(time.perf_counter() - start, 1)}
        self.data["stages"][stage] = result
        self.save()
        return result

    def save(self) -> None:
        write_json(self.path, self.data)
