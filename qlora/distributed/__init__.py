"""Training on many processes with torch.distributed: the job (`Runtime`), the model wrapped for DDP or FSDP2
(`parallelize`, `Parallel`), the choice between them (`choose_mode`) and full tensors to and from shards
(`tensors`). Launched by torchrun; a world of one needs none of it."""

from qlora.distributed.parallel import MODES, Parallel, parallelize
from qlora.distributed.runtime import Runtime, launched_by_torchrun

__all__ = ["MODES", "Parallel", "Runtime", "launched_by_torchrun", "parallelize"]
