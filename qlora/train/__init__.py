"""Training: the loop and what it stands on (LR schedules, metrics logging, atomic checkpoints)."""
