"""Multi-process training: the process group ``torchrun`` describes, DDP or FSDP2 wrapping,
and gathering the full model back on rank 0. A single process is world size 1 and every
function here is then a no-op or the identity."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from earlyexit.config import ModelConfig
from earlyexit.models.decoder import Decoder


@dataclass
class Dist:
    """This process's place in the run: its rank, the world size, its local rank."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group ``torchrun`` describes (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local)


def all_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of ``x`` over the ranks (``x`` itself on one process)."""
    if d.world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world
    return x


def wrap(model: torch.nn.Module, fsdp: bool, d: Dist, device: torch.device):
    """The module the loop calls: ``model`` itself on one process, else sharded in place
    with FSDP2 (every block, then the whole) or replicated with DDP."""
    if d.world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def full_model(model, mc: ModelConfig) -> Decoder | None:
    """A plain Decoder with the full weights on rank 0 (None elsewhere); gathers FSDP shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    if not sd:  # with cpu_offload only rank 0 receives the full state
        return None
    with torch.device("meta"):
        plain = Decoder(mc)
    plain.load_state_dict({k: v.detach().cpu() for k, v in sd.items()}, assign=True)
    plain.rebuild_buffers("cpu")
    return plain.eval()
