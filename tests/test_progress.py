"""Progress output: a live bar on a terminal, plain periodic lines in a log file, nothing when disabled."""
import io
import sys
import time

from maskgen import progress
from maskgen.progress import progress_bar


def test_log_file_gets_plain_lines_not_carriage_returns(monkeypatch):
    log = io.StringIO()  # not a terminal, like `maskgen ... 2> log` or nohup
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.05)
    for _ in progress_bar(range(12), desc="cache-tokens", unit="img"):
        time.sleep(0.02)
    out = log.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    assert 2 <= len(lines) < 12  # shown after LOG_EVERY_S, at most one redraw per LOG_EVERY_S, not one per item
    assert all(line.startswith("cache-tokens:") for line in lines)
    assert "12/12" in lines[-1] and "img" in lines[-1]


def test_short_work_stays_silent_in_a_log(monkeypatch):
    log = io.StringIO()  # work done within LOG_EVERY_S: a failing command's log ends with its error, not a bar
    monkeypatch.setattr(sys, "stderr", log)
    assert sum(progress_bar(range(5), desc="cache-tokens")) == 10
    assert log.getvalue() == ""


def test_disabled_bar_writes_nothing(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress_bar(total=3, enabled=False) as bar:
        bar.update(3)
    assert log.getvalue() == ""
