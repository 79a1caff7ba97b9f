"""`maskgen demo`: every stage runs and the report shows its outputs (a smoke run with 2 training steps)."""
import json

import pytest
from PIL import Image

from maskgen.demo import plot_curves

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_demo_smoke_run_writes_the_report_and_resumes(tmp_path):
    run = tmp_path / "demo"
    proc = run_cli("demo", "--run-dir", run, "--max-steps", 2, "--num-images", 4, check=True)
    assert "[6/6]" in proc.stderr and "linear probe top-1" in proc.stderr
    for name in ("generated.png", "inpainting.png", "loss_curves.png", "probe.json", "report.md"):
        assert (run / name).is_file(), name
    report = (run / "report.md").read_text()
    assert all(f"]({name})" in report for name in ("generated.png", "inpainting.png", "loss_curves.png"))
    assert "Smoke run" in report
    probe = json.loads((run / "probe.json").read_text())
    assert 0 <= probe["mage"]["top1"] <= 100 and probe["mage"]["top1"] <= probe["mage"]["top5"]
    assert Image.open(run / "inpainting.png").size[1] > Image.open(run / "inpainting.png").size[0]  # 4 rows
    again = run_cli("demo", "--run-dir", run, "--max-steps", 2, "--num-images", 4, check=True)
    assert again.stderr.count("starting from scratch") == 0  # both trainings resumed from their checkpoints


def test_demo_rejects_bad_arguments():
    proc = run_cli("demo", "--max-steps", "-1")
    assert proc.returncode == 2 and "--max-steps" in proc.stderr and "Traceback" not in proc.stderr


def test_loss_curve_plot_draws_each_series(tmp_path):
    out = plot_curves({"a": [(1, 3.0), (2, 2.0), (3, 1.0)], "b": [(5, 1.0)], "c": []}, tmp_path / "c.png")
    img = Image.open(out).convert("RGB")
    assert img.size == (3 * 420, 260)
    blue = [img.getpixel((x, y)) for x in range(0, 420) for y in range(260)]
    assert (31, 119, 180) in blue  # the line of series "a" is drawn inside its panel
