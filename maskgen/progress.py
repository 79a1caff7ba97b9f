"""Progress bars for long work (training, token caching, feature extraction, generation, probes).

On a terminal: a live tqdm bar on stderr. When stderr is not a terminal (a log file, a batch job, `nohup`):
the same bar as one plain line every `LOG_EVERY_S` seconds, so a log shows how far a job got and how fast it
goes, instead of silence or one huge line of carriage returns. Work shorter than `LOG_EVERY_S` prints nothing
there (a failing command's log then ends with its one-line error, not with a 0 % bar).
"""
from __future__ import annotations

import sys

from tqdm import tqdm

LOG_EVERY_S = 30.0


class _Lines:
    """A file wrapper that turns tqdm's carriage-return redraws into separate lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        for line in text.replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, *, total: int | None = None, enabled: bool = True, **kwargs) -> tqdm:
    """tqdm(iterable, total=..., **kwargs) on stderr, live on a terminal and one line per `LOG_EVERY_S` s
    otherwise; `enabled=False` shows nothing (e.g. on the non-zero ranks of a distributed run)."""
    stream = sys.stderr
    if stream.isatty():
        kwargs.setdefault("mininterval", 0.5)
        return tqdm(iterable, total=total, disable=not enabled, file=stream, dynamic_ncols=True, **kwargs)
    kwargs.update(mininterval=LOG_EVERY_S, delay=LOG_EVERY_S)
    return tqdm(iterable, total=total, disable=not enabled, file=_Lines(stream), ncols=100, ascii=True, **kwargs)
