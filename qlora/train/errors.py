"""Why a training run stopped when it could not go on: one message that says what happened and what to do.

`TrainingError` is what the `qlora` command prints as one message (exit status 1) instead of a traceback;
its subclasses name the cause: a checkpoint that cannot be written or read (`CheckpointError`, in
`qlora.train.checkpoint`), non-finite losses or gradients (`NonFiniteError`), the GPU's memory
(`OutOfMemory`, `qlora.train.memory_advice`).
"""

from __future__ import annotations


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


class NonFiniteError(TrainingError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class OutOfMemory(TrainingError):
    """The device ran out of memory; the message says how much was asked for and which settings would fit."""
