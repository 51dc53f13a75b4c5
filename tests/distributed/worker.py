"""One process of a distributed test run, started by torchrun from tests/distributed (not a test module).

    python -m torch.distributed.run --nproc-per-node N worker.py CONFIG.yaml [--wrong-reduction]
        [--die-at-step K --rank R] [--hang-at-step K --rank R] [--signal-at-step K --rank R]
        [--poison-from-step K --rank R]

Trains the `qlora.Trainer` of CONFIG.yaml. The flags break a run on purpose, for the negative controls:
--wrong-reduction leaves the mean over ranks uncompensated (gradients divided by the world size),
--die-at-step kills rank R with exit code 3 after step K (torchrun's first attempt only),
--hang-at-step makes rank R sleep there, --signal-at-step sends rank R a SIGTERM after step K (first attempt),
--poison-from-step makes rank R's embeddings NaN from step K on.
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from qlora.distributed.tensors import local_part
from qlora.lora import lora_layers
from qlora.train.trainer import Trainer


def report_shards(trainer: Trainer, directory: Path) -> None:
    """rank-R.json: bytes of 4-bit base storage (codes and scales) and of adapter weights this rank holds."""
    import json

    base = adapter = 0
    for name, p in trainer.model.named_parameters():
        local = local_part(p.data)
        nbytes = local.numel() * local.element_size()
        if ".base_" in name:
            base += nbytes
        elif ".lora_" in name:
            adapter += nbytes
    if trainer.parallel.mode != "fsdp":  # the base is not a parameter there: count the QuantizedTensors
        base = sum(sum(t.numel() * t.element_size() for t in layer.base.storage().values())
                   for layer in lora_layers(trainer.model).values())  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rank-{trainer.runtime.rank}.json").write_text(json.dumps({"base": base, "adapter": adapter}))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--wrong-reduction", action="store_true")
    parser.add_argument("--die-at-step", type=int)
    parser.add_argument("--hang-at-step", type=int)
    parser.add_argument("--signal-at-step", type=int)
    parser.add_argument("--poison-from-step", type=int)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--report-shards", help="write this rank's bytes of base storage to this directory")
    args = parser.parse_args()
    trainer = Trainer(args.config, progress=False)
    trainer.config.train.cuda_graphs = not args.no_cuda_graphs
    trainer.setup()
    if args.report_shards:
        report_shards(trainer, Path(args.report_shards))
    if args.wrong_reduction:
        trainer.parallel.gradient_multiplier = 1.0
    if args.poison_from_step and trainer.runtime.rank == args.rank:
        def poison(module, inputs, output):
            return output * float("nan") if trainer.step_count + 1 >= args.poison_from_step else output

        trainer.model.model.embed_tokens.register_forward_hook(poison)
    if args.die_at_step or args.hang_at_step or args.signal_at_step:
        step = trainer.step

        def breaking_step():
            stats = step()
            first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"  # a restart runs on
            mine = trainer.runtime.rank == args.rank
            if first_attempt and mine and trainer.step_count == args.die_at_step:
                sys.stderr.flush()
                os._exit(3)
            if mine and trainer.step_count == args.hang_at_step:
                time.sleep(3600)
            if first_attempt and mine and trainer.step_count == args.signal_at_step:
                os.kill(os.getpid(), signal.SIGTERM)
            return stats

        trainer.step = breaking_step
    trainer.fit()
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
