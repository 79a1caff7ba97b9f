"""Run under torchrun (or alone): gradient of the mean InfoNCE loss of a fixed batch split across ranks."""
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from maskgen.losses.contrastive import info_nce

out = sys.argv[1]
distributed = "RANK" in __import__("os").environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
g = torch.Generator().manual_seed(0)
x1, x2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
w = torch.randn(16, 6, generator=g).requires_grad_()
rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
loss, acc = info_nce(x1[rows] @ w, x2[rows] @ w, temperature=0.3)
loss.backward()
grad, stats = w.grad.clone(), torch.stack([loss.detach(), acc])
if distributed:  # what DDP does: average the per-rank gradients (and here the logged values)
    dist.all_reduce(grad)
    dist.all_reduce(stats)
    grad, stats = grad / world, stats / world
if rank == 0:
    save_file({"grad": grad, "stats": stats}, out)
if distributed:
    dist.destroy_process_group()
