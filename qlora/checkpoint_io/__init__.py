"""Floor 5b: reading checkpoints (Hugging Face safetensors directories, GGUF files) tensor by tensor.

These readers build no model and know nothing about quantization: they yield `(HF name, tensor)`
pairs in Hugging Face layout, so the loader above can quantize each weight as it arrives.
"""

from qlora.checkpoint_io.gguf_file import GGUFCheckpoint, GGUFError, read_gguf
from qlora.checkpoint_io.safetensors_dir import (
    CheckpointError,
    CheckpointKeyError,
    ExpectedKeys,
    check_keys,
    expected_keys,
    iter_tensors,
    list_checkpoint_files,
    read_config,
)

__all__ = [
    "CheckpointError",
    "CheckpointKeyError",
    "ExpectedKeys",
    "GGUFCheckpoint",
    "GGUFError",
    "check_keys",
    "expected_keys",
    "iter_tensors",
    "list_checkpoint_files",
    "read_config",
    "read_gguf",
]
