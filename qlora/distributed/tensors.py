"""Moving between a full tensor and a rank's shard of it: what checkpoints need when FSDP2 has sharded
the parameters (each a DTensor split along dim 0 into `torch.chunk` pieces, one per rank).

    full_tensor(t)            the whole tensor on every rank (a collective for a DTensor; `t` otherwise)
    shard_rows(full, r, n)    rank r's rows of `full` split in n, as FSDP2 splits it (torch.chunk, dim 0)
    copy_full_into_(t, full)  write a whole tensor into `t`, or into this rank's shard of a DTensor `t`

So a checkpoint is written whole (the single-process layout) and read on any number of ranks.
"""

from __future__ import annotations

import sys

import torch


def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor. Asked without importing torch.distributed.tensor (a tenth of a second of every
    command's start): if nothing has imported it, no tensor can be one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: gathered from every rank for a DTensor (all ranks must call this), `t` itself otherwise."""
    return t.full_tensor() if is_sharded(t) else t


def shard_rows(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s piece of `full` split along dim 0 into `world_size` pieces the way FSDP2 (DTensor's
    Shard(0)) splits it: `torch.chunk`, whose last pieces may be shorter or empty."""
    pieces = torch.chunk(full, world_size, dim=0) if full.shape[0] else ()
    if rank < len(pieces):
        return pieces[rank]
    return full[full.shape[0] :]  # a rank past the last piece holds no rows


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's storage of `t`: the local shard of a DTensor (a view: writes reach the parameter), `t` otherwise."""
    if is_sharded(t):
        with torch.no_grad():
            return t.to_local()
    return t


@torch.no_grad()
def copy_full_into_(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the whole tensor `full` into `target`: all of it, or this rank's rows for a DTensor."""
    if tuple(full.shape) != tuple(target.shape):
        raise ValueError(f"cannot copy a tensor of shape {tuple(full.shape)} into one of shape {tuple(target.shape)}")
    if is_sharded(target):
        mesh = target.device_mesh
        local = target.to_local()
        local.copy_(shard_rows(full, mesh.get_local_rank(), mesh.size()))
    else:
        target.copy_(full)
