"""The DDP primitives of maskgen: set-up from torchrun's environment and the collectives methods and the engine
use. A single process needs no process group: every function is then the identity / a constant."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from .errors import UserError


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun/SLURM variables; (0, 0, 1) when not launched distributed."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    return rank, local, world


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is available (use train.device=cpu)")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_device(name: str, flag: str = "--device") -> str:
    """`name` when this machine has that device (cpu, cuda, cuda:N, mps), else a UserError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{flag} {name!r} is not a device (use cpu or cuda)") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise UserError(f"{flag} {name}: no such CUDA device here (use --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag} {name}: MPS is not available here (use --device cpu)")
    return name


def init(device: torch.device, backend: str = "auto", timeout_s: int = 600) -> None:
    """Join the process group when launched with WORLD_SIZE > 1 (env:// rendezvous from torchrun)."""
    _, local, world = env_world()
    if world == 1 or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cpu":  # share the cores between the local processes
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def mean_over_ranks(t: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """The average of `t` over the ranks (identity in a single process). `differentiable`: through
    torch.distributed.nn's all_reduce, whose backward sums the gradients of every rank's copy, so that DDP's
    gradient averaging then gives exactly the single-process gradient of a whole-batch statistic."""
    if world_size() == 1:
        return t
    if differentiable:
        return dist_nn.all_reduce(t) / world_size()
    return all_reduce_mean(t.detach())


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `t` in place with rank `src`'s values (no-op in a single process)."""
    if dist.is_initialized():
        dist.broadcast(t, src=src)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on any rank (every rank gets the same answer)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
