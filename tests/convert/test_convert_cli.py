"""`maskgen convert` through the command line: the official tokenizer layout converts; pickles are refused."""
import json
import os

import torch

import maskgen
from maskgen.models.vqgan import VQGAN

from conftest import REPO, run_cli

SPEC = REPO.parent / "shared" / "reference" / "checkpoints" / "official_mage_tokenizer_state_dict.json"


def test_convert_vqgan_cli(tmp_path):
    spec = json.loads(SPEC.read_text())
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) * 0.02 for k, (shape, _) in spec.items()}
    torch.save({"state_dict": sd}, tmp_path / "official.ckpt")
    proc = run_cli("convert", "vqgan", "--src", tmp_path / "official.ckpt", "--out", tmp_path / "tok", check=True)
    assert "wrote" in proc.stdout
    model = maskgen.from_pretrained(tmp_path / "tok")
    assert isinstance(model, VQGAN) and model.config.codebook_size == 1024
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_convert_refuses_pickled_code(tmp_path):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.ckpt")
    proc = run_cli("convert", "vqgan", "--src", tmp_path / "evil.ckpt", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "refusing to load" in proc.stderr and not marker.exists() and not (tmp_path / "out").exists()
    missing = run_cli("convert", "vqgan", "--src", tmp_path / "nope.ckpt", "--out", tmp_path / "out")
    assert missing.returncode == 2 and "no such file" in missing.stderr
