"""Fast generation: a batched engine over a static KV cache (`Engine`), its sampling (`SamplingParams`) and
stop handling; what `qlora chat`, `qlora serve` and the evaluations decode with."""

from qlora.generation.engine import Completion, Engine, Request
from qlora.generation.sampling import SamplingParams

__all__ = ["Completion", "Engine", "Request", "SamplingParams"]
