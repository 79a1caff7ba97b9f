"""MAGE-C's InfoNCE: the NT-Xent formula, its value at chance, and gradients through the cross-rank gather."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from maskgen.losses.contrastive import info_nce

from conftest import run_worker


def nt_xent_reference(z1, z2, t):
    """Straight from the SimCLR definition: anchors a_k over the 2B embeddings, positive = other view."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n, b = len(z), len(z1)
    total = 0.0
    for k in range(n):
        pos = (k + b) % n
        sims = torch.stack([z[k] @ z[j] / t for j in range(n) if j != k])
        total += -(z[k] @ z[pos] / t) + torch.logsumexp(sims, 0)
    return total / n


def test_matches_the_nt_xent_definition():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    loss, _ = info_nce(z1, z2, 0.2)
    assert loss.item() == pytest.approx(nt_xent_reference(z1, z2, 0.2).item(), rel=1e-5)


def test_chance_level_and_perfect_pairs():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 8192, generator=g), torch.randn(8, 8192, generator=g)
    loss, _ = info_nce(z1, z2, 1.0)  # near-orthogonal random embeddings: every key equally likely
    assert loss.item() == pytest.approx(math.log(15), abs=0.02)
    loss, acc = info_nce(z1, z1 + 0.01 * z2, 0.1)  # views of one sample agree
    assert acc.item() == 1.0 and loss.item() < 0.01


@pytest.mark.dist
def test_two_ranks_give_the_single_process_gradient(tmp_path):
    worker = Path(__file__).with_name("contrastive_worker.py")
    run_worker(worker, tmp_path / "two.safetensors", nproc=2, timeout=180)
    run_worker(worker, tmp_path / "one.safetensors", timeout=180)
    a, b = load_file(str(tmp_path / "two.safetensors")), load_file(str(tmp_path / "one.safetensors"))
    assert torch.allclose(a["stats"], b["stats"], atol=1e-6)
    assert b["grad"].abs().max() > 1e-3
    torch.testing.assert_close(a["grad"], b["grad"], atol=1e-6, rtol=1e-5)
