"""Smoke tests of the benchmark scripts on tiny models (they must run and give sane numbers, not fast ones)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_mage_throughput_tiny(tmp_path):
    out = tmp_path / "mage_throughput.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "mage_throughput.py"), "--config", "mage-tiny",
           "--tokenizer", "tokenizer-tiny", "--min-time", "0.1", "--skip-bf16", "--batch", "8", "--gen-batch", "4",
           "--threads", "1", "--matmul-size", "512", "--mae", "mae-tiny:8", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MFU %" in proc.stdout
    data = json.loads(out.read_text())
    assert data["command"].startswith("python benchmarks/mage_throughput.py --config mage-tiny")
    assert "threads" in data["machine"]
    rows = data["rows"]
    assert all(r["precision"] == "fp32" for r in rows)  # --skip-bf16
    peaks = [r for r in rows if r["what"] == "matmul peak"]
    assert len(peaks) == 2 and all(r["achieved GFLOP/s"] > 0 for r in peaks)
    cells = [r for r in rows if r["what"] != "matmul peak"]
    assert {(r["what"].split(" (")[0], r["source"]) for r in cells} == {
        ("train step", "tokens"), ("train step", "images"), ("generate", "scratch"), ("MAE train step", "images")}
    for r in cells:
        assert r["img/s"] > 0 and r["GFLOP/step"] > 0 and r["achieved GFLOP/s"] > 0, r
        assert 0 < r["MFU %"] <= 100, r
    by_source = {r["source"]: r for r in cells if not r["what"].startswith("MAE")}
    # the images row counts the tokenizer's encode on top of the same MAGE step
    assert by_source["images"]["GFLOP/step"] > by_source["tokens"]["GFLOP/step"]
    assert by_source["images"]["batch"] == by_source["tokens"]["batch"] == 8
    assert by_source["scratch"]["batch"] == 4


def test_tokenizer_train_step_tiny(tmp_path):
    out = tmp_path / "train_step"
    cmd = [sys.executable, str(REPO / "benchmarks" / "tokenizer_train_step.py"), "--config", "tokenizer-tiny",
           "train.batch_size=4", "--precisions", "fp32", "--rounds", "2", "--min-time", "0.05", "--out", str(out) + ".json"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["precision"], r["memory format"]) for r in rows] == [("fp32", "contiguous"), ("fp32", "channels_last")]
    assert all(r["img/s"] > 0 and r["batch"] == 4 and r["px"] == 32 for r in rows)
    assert rows[0]["vs NCHW"] == 1.0 and rows[1]["vs NCHW"] > 0
    assert "memory format" in proc.stdout and "vs NCHW" in proc.stdout


def test_token_predictability_tells_structure_from_noise(tmp_path):
    """On a synthetic cache whose codes follow their left neighbour (code = left + 1 mod K) the context carries
    every bit; on uniform noise it carries none."""
    import math

    import torch
    from safetensors.torch import save_file

    k, n = 16, 400
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, k, (n, 8, 1), generator=g)
    ordered = (start + torch.arange(8)) % k                               # [n, 8, 8]
    noise = torch.randint(0, k, (n, 8, 8), generator=g)
    paths = []
    for name, grids in (("ordered", ordered), ("noise", noise)):
        tokens = grids[:, None, None].expand(n, 1, 2, 8, 8).to(torch.int32)
        paths.append(tmp_path / f"{name}.safetensors")
        save_file({"tokens": tokens.contiguous()}, str(paths[-1]), metadata={"codebook_size": str(k)})
    out = tmp_path / "pred.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "token_predictability.py"), "--cache", *map(str, paths),
           "--epochs", "4", "--batch", "256", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ordered_row, noise_row = json.loads(out.read_text())["rows"]
    assert abs(ordered_row["H(x)"] - math.log2(k)) < 0.05 and ordered_row["H(x|left)"] < 1e-6
    assert ordered_row["H(x|left) shuffled"] > 3.9 and ordered_row["context top1 %"] > 95
    assert ordered_row["info bits"] > 3.5
    assert noise_row["H(x|left)"] > 3.5 and noise_row["context top1 %"] < 15 and noise_row["info bits"] < 0.3


def test_umd_throughput_tiny(tmp_path):
    out = tmp_path / "umd_throughput.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "umd_throughput.py"), "--config", "umd-tiny", "--batch", "8",
           "--gen-batch", "2", "--steps", "2", "4", "--precision", "fp32", "--min-time", "0.1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    samples = {(r["steps"], r["cfg"]): r for r in rows if r["what"].startswith("sample")}
    assert set(samples) == {(2, 1.0), (2, 1.5), (4, 1.0), (4, 1.5)} and rows[0]["what"] == "train step"
    assert all(r["img/s"] > 0 for r in rows)
    # guidance doubles the network's batch, more steps mean more calls: both cost time
    assert samples[(4, 1.5)]["s/call"] > samples[(2, 1.0)]["s/call"]


def test_recipe_levers_tiny_trains_each_lever_once_and_scores_both_poolings(tmp_path):
    out, result = tmp_path / "levers", tmp_path / "levers.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "recipe_levers.py"), "--method", "mae", "--preset", "mae-tiny",
           "--images", "64", "--common", "log.every=2", "--lever", "base=", "--lever", "mask0.5=mae.mask_ratio=0.5",
           "--pools", "cls", "mean", "--eval-train", "100", "--eval-test", "50", "--out", str(out), "--json",
           str(result)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(result.read_text())
    assert [(r["lever"], r["pool"]) for r in data["rows"]] == [("base", "cls"), ("base", "mean"),
                                                                ("mask0.5", "cls"), ("mask0.5", "mean")]
    runs = data["runs"]
    assert runs["mask0.5"]["overrides"] == ["mae.mask_ratio=0.5"] and "mae.mask_ratio=0.5" in runs["mask0.5"]["command"]
    assert runs["base"]["images"] == 64 and runs["base"]["scores"]["cls"]["num_train"] == 100
    assert (out / "mask0.5" / "config.yaml").read_text().count("mask_ratio: 0.5") == 1
    # a second call trains nothing again: the recorded levers are read back
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "method mae:" not in proc.stderr
    assert json.loads(result.read_text())["runs"] == runs
