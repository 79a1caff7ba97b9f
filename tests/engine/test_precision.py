"""train.precision=auto: bf16 only where it is faster; explicit choices kept (with a warning when slow)."""
import logging

import torch

from maskgen import precision


def test_auto_follows_the_measured_speedup(monkeypatch, caplog):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.01)  # an AVX2-only CPU
    assert precision.resolve_precision("auto", cpu) == "fp32"
    with caplog.at_level(logging.WARNING, logger="maskgen"):
        assert precision.resolve_precision("bf16", cpu) == "bf16"
    assert "very slow" in caplog.text
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 3.0)  # a CPU with native bf16 matmuls
    assert precision.resolve_precision("auto", cpu) == "bf16"
    assert precision.resolve_precision("fp32", cpu) == "fp32"


def test_speedup_probe_is_a_positive_ratio():
    assert precision.cpu_bf16_speedup() > 0
