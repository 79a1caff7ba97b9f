import math

import pytest
import torch
from torch import nn

from maskgen.config import OptimConfig
from maskgen.engine.ema import EMA
from maskgen.engine.optim import build_optimizer, effective_lr, lr_at, param_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.pos = nn.Parameter(torch.zeros(1, 3, 4))
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)

    def no_weight_decay(self):
        return {"emb"}


def test_param_groups_mae_style():
    m = Toy()
    decay, no_decay = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"pos", "lin.weight"}  # 3-D pos is decayed, as in MAE
    assert {names[id(p)] for p in no_decay["params"]} == {"emb.weight", "lin.bias", "norm.weight", "norm.bias"}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(m, OptimConfig(), 1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == 6  # frozen params left out


def test_lr_rule_and_schedule():
    assert effective_lr(OptimConfig(blr=1.5e-4), 4096) == pytest.approx(2.4e-3)  # MAGE ViT-B: 1.5e-4 x 4096/256
    assert effective_lr(OptimConfig(blr=1.5e-4, lr=0.01), 4096) == 0.01
    base, total, warm = 1.0, 100, 10
    assert lr_at(0, base, total, warm) == 0.0
    assert lr_at(5, base, total, warm) == pytest.approx(0.5)
    assert lr_at(10, base, total, warm) == pytest.approx(1.0)
    assert lr_at(55, base, total, warm) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_at(100, base, total, warm, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(77, base, total, warm, name="constant") == 1.0
    vals = [lr_at(s, base, total, warm) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone after warm-up
    assert lr_at(32, base, total, warm) == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))


def test_ema_update_rule():
    m = nn.Linear(2, 1)
    ema = EMA(m, decay=0.9)
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.shadow["weight"], before + 0.1)
