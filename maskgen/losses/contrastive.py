"""SimCLR-style InfoNCE over two views, with negatives gathered from every rank (MAGE-C).

With W ranks each holding B pairs, every one of the 2·B·W embeddings is an anchor whose positive is its other
view and whose negatives are the 2·B·W − 2 others. `gather_with_grad` lets gradients flow back to the rank
that produced each embedding, so W processes compute the same gradient as one process with the global batch
(after DDP averages the per-rank gradients of their local mean losses).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward sums the gradient of every rank's copy and returns this rank's slice.

    Implemented with all_reduce (gloo has no reduce_scatter), so it works on CPU and GPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """x [B, D] on every rank -> [W·B, D] (rank order), differentiable; the identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent of the local pairs (z1[i], z2[i]), z1/z2 [B, D] (any scale: L2-normalised here).

    Returns (loss, accuracy): the mean over the 2B local anchors of −log softmax(sim/T)[positive] with every
    other gathered embedding as a negative (self-similarity excluded), and the fraction of anchors whose
    positive has the highest similarity. Both in fp32."""
    b = z1.shape[0]
    local = F.normalize(torch.cat([z1, z2]).float(), dim=-1)  # [2B, D]: view-1 rows, then view-2 rows
    g1 = F.normalize(gather_with_grad(z1.float().contiguous()), dim=-1)
    g2 = F.normalize(gather_with_grad(z2.float().contiguous()), dim=-1)
    keys = torch.cat([g1, g2])  # [2WB, D]
    n = g1.shape[0]  # W·B
    offset = (dist.get_rank() * b) if (dist.is_available() and dist.is_initialized()) else 0
    rows = torch.arange(b, device=z1.device) + offset
    self_idx = torch.cat([rows, rows + n])  # where each local anchor sits among the keys
    pos_idx = torch.cat([rows + n, rows])
    logits = local @ keys.t() / temperature
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * n).bool(), float("-inf"))
    loss = F.cross_entropy(logits, pos_idx)
    with torch.no_grad():
        acc = (logits.argmax(-1) == pos_idx).float().mean()
    return loss, acc
