"""`Runtime`: which process this is among how many, on which device, and the few collectives training needs.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) starts
one process per GPU; `Runtime.from_env` joins them into one process group: NCCL when the device is
CUDA (each process takes the GPU numbered LOCAL_RANK), gloo on CPUs. Without those variables it is a
world of one and no process group is made, so a single-process run pays nothing.

A collective that waits longer than `timeout_s` raises on the waiting ranks (gloo and NCCL both
honour the group timeout; NCCL's watchdog aborts the communicator), so a rank that died or hangs ends
the job with an error instead of a silent hang; torchrun then stops the other workers and reports
which rank failed first.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qlora.precision import resolve_device

log = logging.getLogger("qlora.distributed")

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 600


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    """True when the launch variables are set (torchrun, or a scheduler that sets the same ones)."""
    env = os.environ if environ is None else environ
    return "RANK" in env and "WORLD_SIZE" in env


def _attempt_store(rank: int, world: int, restart: int | None, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store at MASTER_ADDR:MASTER_PORT, its keys prefixed by torchrun's attempt number.

    torchrun's agent keeps one store for all its attempts; without the prefix a restarted worker can read the
    address a worker of the failed attempt published there and fail to connect to it (seen with gloo: half
    the restarts of a 2-process job failed with "connectFullMesh ... Connection refused"). Under torchrun the
    agent hosts the store (TORCHELASTIC_USE_AGENT_STORE); under another launcher rank 0 does."""
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_hosts, timeout=timeout)  # fmt: skip
    return dist.PrefixStore(f"qlora/attempt-{restart or 0}", store)


@dataclass(frozen=True)
class Runtime:
    """This process's place in the job. `rank` 0 of `world_size`; `device` is where it computes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (a world of one, not launched)
    timeout_s: float = DEFAULT_TIMEOUT_S
    restart: int | None = None  # torchrun's attempt number (TORCHELASTIC_RESTART_COUNT: 0 first); None: not torchrun

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_env(cls, device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Runtime:
        """Join the job torchrun started (or be a world of one when not launched by it).

        `device` is the config's ("auto", "cpu", "cuda", "cuda:N"): under torchrun a CUDA device becomes
        cuda:LOCAL_RANK, one GPU per process."""
        if not launched_by_torchrun():
            return cls(device=resolve_device(device), timeout_s=timeout_s)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
        if missing:
            raise RuntimeError(f"RANK and WORLD_SIZE are set but not {', '.join(missing)}: start the job with torchrun "
                               "(or set every one of " + ", ".join(LAUNCH_VARIABLES) + ")")  # fmt: skip
        local_rank = int(os.environ["LOCAL_RANK"])
        target = resolve_device(device)
        if target.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"rank {rank}: LOCAL_RANK {local_rank} but this host has "
                                   f"{torch.cuda.device_count()} CUDA devices; start at most one process per GPU "
                                   "(torchrun --nproc-per-node)")  # fmt: skip
            target = torch.device("cuda", local_rank)
            torch.cuda.set_device(target)
        backend = "nccl" if target.type == "cuda" else "gloo"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")  # set by torchrun only
        restart = int(attempt) if attempt is not None else None
        if not dist.is_initialized():
            kwargs = {"device_id": target} if target.type == "cuda" else {}
            timeout = datetime.timedelta(seconds=timeout_s)
            dist.init_process_group(backend, store=_attempt_store(rank, world, restart, timeout), rank=rank,
                                    world_size=world, timeout=timeout, **kwargs)  # fmt: skip
        restart_note = f", restart {restart}" if restart else ""
        log.info("rank %d of %d on %s (%s, collective timeout %gs)%s", rank, world, target, backend, timeout_s,
                 restart_note)  # fmt: skip
        return cls(rank, world, local_rank, target, backend, timeout_s, restart)

    # --- who does what ------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        """True when a process group joins several processes (or one launched by torchrun)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, metrics and checkpoints."""
        return self.rank == 0

    # --- collectives (no-ops for a world of one) ------------------------------------------------
    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """`values` reduced over ranks elementwise (op "sum", "max" or "min"), as floats (float64 on the wire)."""
        if not self.distributed:
            return [float(v) for v in values]
        wire = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._wire_device())
        return self.all_reduce_tensor_(wire, op).tolist()

    def all_reduce_tensor_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`t` summed (or max/min) over ranks, in place; returns it."""
        if self.distributed:
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            dist.all_reduce(t, op=ops[op])
        return t

    def broadcast_object(self, value, src: int = 0):
        """Rank `src`'s `value` on every rank (picklable objects: a path, a small dict)."""
        if not self.distributed:
            return value
        box = [value if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self._wire_device())
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def shutdown(self) -> None:
        """Leave the process group (call once, at the end of the job)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def _wire_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")
