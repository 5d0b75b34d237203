"""Data parallelism over ``torch.distributed``: shard work items, all-reduce running sums.

Launch with ``torchrun --nproc-per-node N script.py``; gloo on CPU, NCCL on GPUs. Without an
initialized process group every function is the single-process identity, so the same code runs
either way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1

    def indices(self, n: int) -> torch.Tensor:
        """This rank's contiguous block of ``range(n)`` (blocks differ in size by at most one)."""
        per, extra = divmod(n, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return torch.arange(start, start + per + (self.rank < extra))


def current_shard() -> Shard:
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def init_from_env(backend: str | None = None) -> Shard:
    """Initialize the process group from torchrun's environment, if launched by torchrun."""
    if "RANK" in os.environ and not dist.is_initialized():
        # both where there are GPUs: NCCL for CUDA tensors, gloo for a model (or sums) kept on the CPU
        backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
        if "nccl" in backend:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return current_shard()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place where distributed); identity in a single process."""
    if current_shard().world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_rows(tensor: torch.Tensor, n_total: int) -> torch.Tensor:
    """Concatenate each rank's block of rows (from ``Shard.indices``) into the full ``n_total`` rows."""
    shard = current_shard()
    if shard.world_size == 1:
        return tensor
    out = tensor.new_zeros((n_total, *tensor.shape[1:]))
    out[Shard(shard.rank, shard.world_size).indices(n_total).to(tensor.device)] = tensor
    return all_reduce_sum(out)
