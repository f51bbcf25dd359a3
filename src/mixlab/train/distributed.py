"""torch.distributed through torchrun: DDP when WORLD_SIZE > 1, a no-op otherwise.

`torchrun --nproc_per_node=N -m mixlab train ...` sets RANK / WORLD_SIZE / LOCAL_RANK;
NCCL is used on CUDA, gloo on the CPU. Rank 0 writes every file; each rank trains and
evaluates its own shard and the metrics are summed with all_reduce.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        d = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not tdist.is_initialized():
            use_cuda = torch.cuda.is_available() and os.environ.get("MIXLAB_DEVICE", "") != "cpu"
            if use_cuda:
                torch.cuda.set_device(d.local_rank)
            tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
        return d

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.enabled:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tdist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def shutdown(self) -> None:
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()
