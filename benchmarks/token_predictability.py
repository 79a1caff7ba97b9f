"""How predictable are a tokenizer's codes from their context? The question behind MAGE learning (or not) on
natural images: a masked-token predictor can only learn what the context says about a token.

Reads a token cache (`maskgen cache-tokens`; view 0, unflipped: the plain centre view of every image) and reports,
in bits per token:

- `H(x)`: the entropy of the codes' marginal distribution (`log2 K` when every code is equally used);
- `H(x | left)`: the plug-in entropy of a code given its left neighbour, and the same estimator on shuffled pairs
  (its bias floor: what the estimator gives when the neighbour says nothing);
- `context model`: a small MLP that reads the 8 neighbours of a token (3x3 window, border = a pad code) trained for
  `--epochs` on 80 % of the images; its held-out cross-entropy and top-1 accuracy. `H(x) - CE` is the information
  the neighbourhood carries about a token that a model can use (a lower bound; MAGE sees more context but less of
  it is visible at its masking ratios).

    python benchmarks/token_predictability.py --cache runs/tok/tokens.safetensors --out runs/benchmarks/pred.json
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out_argument, report  # noqa: E402


def entropy_bits(counts: torch.Tensor) -> float:
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def conditional_entropy_bits(x: torch.Tensor, ctx: torch.Tensor, k: int) -> float:
    """Plug-in H(x | ctx) of two code vectors of equal length."""
    joint = torch.bincount(ctx.long() * k + x.long(), minlength=k * k).view(k, k).double()
    return entropy_bits(joint.flatten()) - entropy_bits(joint.sum(1))


def neighbours(grids: torch.Tensor, k: int) -> torch.Tensor:
    """grids [N, h, w] -> the 8 neighbours of every position [N*h*w, 8] (border: code k, the pad)."""
    n, h, w = grids.shape
    padded = F.pad(grids.long(), (1, 1, 1, 1), value=k)
    shifts = [(dy, dx) for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]
    return torch.stack([padded[:, dy:dy + h, dx:dx + w] for dy, dx in shifts], -1).reshape(-1, 8)


class ContextModel(nn.Module):
    def __init__(self, k: int, dim: int = 64, hidden: int = 512):
        super().__init__()
        self.embed = nn.Embedding(k + 1, dim)
        self.mlp = nn.Sequential(nn.Linear(8 * dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, k))

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(ctx).flatten(1))


def context_model(grids: torch.Tensor, k: int, epochs: int, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(grids), generator=g)
    split = int(0.8 * len(grids))
    train, test = grids[order[:split]], grids[order[split:]]
    xtr, ctr = train.reshape(-1).long(), neighbours(train, k)
    xte, cte = test.reshape(-1).long(), neighbours(test, k)
    torch.manual_seed(seed)
    model = ContextModel(k)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    steps = epochs * math.ceil(len(xtr) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(ctr[idx]), xtr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    ce, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(xte), 8192):
            logits = model(cte[i:i + 8192])
            ce += float(F.cross_entropy(logits, xte[i:i + 8192], reduction="sum"))
            correct += int((logits.argmax(1) == xte[i:i + 8192]).sum())
    return {"ce_bits": ce / len(xte) / math.log(2), "top1": 100 * correct / len(xte), "train_tokens": len(xtr),
            "test_tokens": len(xte)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, nargs="+", help="token cache file(s) (maskgen cache-tokens)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the context model (default 3)")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--limit", type=int, default=0, help="use the first N images of each cache (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    add_out_argument(ap, "token_predictability")
    args = ap.parse_args(argv)
    rows = []
    for path in args.cache:
        with safe_open(path, "pt") as f:
            meta = f.metadata()
            grids = f.get_tensor("tokens")[:, 0, 0].long()  # view 0, not mirrored: [N, h, w]
        if args.limit:
            grids = grids[:args.limit]
        k = int(meta["codebook_size"])
        x = grids[:, :, 1:].reshape(-1)
        left = grids[:, :, :-1].reshape(-1)
        shuffled = left[torch.randperm(len(left), generator=torch.Generator().manual_seed(args.seed))]
        counts = torch.bincount(grids.reshape(-1), minlength=k)
        t0 = time.time()
        cm = context_model(grids, k, args.epochs, args.batch, args.seed)
        h = entropy_bits(counts)
        rows.append({"cache": path, "codebook": k, "grid": f"{grids.shape[1]}x{grids.shape[2]}",
                     "images": len(grids), "log2 K": math.log2(k), "H(x)": h,
                     "H(x|left)": conditional_entropy_bits(x, left, k),
                     "H(x|left) shuffled": conditional_entropy_bits(x, shuffled, k),
                     "context CE": cm["ce_bits"], "info bits": h - cm["ce_bits"],
                     "context top1 %": cm["top1"], "best constant %": 100 * float(counts.max() / counts.sum()),
                     "fit s": time.time() - t0})
    report(args.out, rows, "python benchmarks/token_predictability.py " + " ".join(sys.argv[1:] if argv is None
                                                                                  else argv))


if __name__ == "__main__":
    main()
