"""A new method is new files only: tests/plugins/toy_method.py registers a model, a method and a sampler from
outside the package, and the normal command line trains, saves, loads and samples it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, make_folder, run_cli

PLUGINS = Path(__file__).resolve().parent / "plugins"
ENV = {"MASKGEN_PLUGINS": "toy_method", "PYTHONPATH": os.pathsep.join([str(PLUGINS), str(REPO)])}


@pytest.mark.slow
def test_a_method_from_a_plugin_trains_saves_loads_and_generates(tmp_path):
    data = make_folder(tmp_path / "images", 32)
    run = tmp_path / "run"
    helped = run_cli("train", "--help", env=ENV, check=True)
    assert "toy" in helped.stdout
    run_cli("train", "toy", f"data.path={data}", "data.image_size=16", "train.batch_size=8", "train.max_steps=3",
            "toy.noise=0.2", "vis.num_images=4", "vis.sampler={steps: 1}", "log.tensorboard=false",
            "train.precision=fp32", "--run-dir", run, env=ENV, check=True)
    assert (run / "checkpoints" / "step_00000003" / "model.safetensors").is_file()
    assert (run / "samples" / "step_00000003.png").is_file()  # the method's hook, through its sampler
    assert "toy:\n  noise: 0.2" in (run / "config.yaml").read_text()  # the method's own section

    out = tmp_path / "gen"
    proc = run_cli("generate", "--ckpt", run, "--out", out, "--num-images", "3", "--steps", "2", env=ENV, check=True)
    assert "wrote 3 images" in proc.stdout
    images = sorted(out.glob("0*.png"))
    assert len(images) == 3 and Image.open(images[0]).size == (16, 16)
    again = tmp_path / "gen2"
    run_cli("generate", "--ckpt", run, "--out", again, "--num-images", "3", "--steps", "2", env=ENV, check=True)
    assert (out / "000001.png").read_bytes() == (again / "000001.png").read_bytes()  # seeded per image

    bad = run_cli("generate", "--ckpt", run, "--out", out, "--steps", "0", env=ENV)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "steps" in bad.stderr

    # the Python API loads it like any model once the plugin is imported
    code = ("import sys, torch; sys.path.insert(0, sys.argv[2]); import toy_method, maskgen; "
            "m = maskgen.from_pretrained(sys.argv[1]); print(type(m).__name__, m(torch.rand(2, 3, 16, 16)).shape)")
    proc = subprocess.run([sys.executable, "-c", code, str(run), str(PLUGINS)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ToyAutoencoder torch.Size([2, 3, 16, 16])"


def test_an_unknown_plugin_is_one_line(tmp_path):
    proc = run_cli("config", "list", env={"MASKGEN_PLUGINS": "no_such_plugin_module"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no_such_plugin_module" in proc.stderr
