"""Stop signals (SIGTERM from SLURM or Kubernetes, SIGINT from Ctrl-C) as a request, not a crash.

`StopSignals` is entered around the training loop. The first signal only records itself (and logs that the
run will finish the current optimizer step, save a checkpoint and exit 0); the loop asks `requested` after
each step. A second signal exits the process at once (status 128 + signal), leaving the last complete
checkpoint: checkpoints are committed atomically, so no moment is unsafe. Leaving the context restores the
handlers that were there before. Handlers can only be installed from the main thread; elsewhere (a notebook's
worker thread) the context does nothing and says so.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

log = logging.getLogger("qlora.train")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Turns SIGTERM/SIGINT into `received` (the first signal's name) while entered; see the module docstring."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.signals = signals
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            log.info("stop signals: not the main thread, so SIGTERM/SIGINT keep their usual effect")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            log.warning("%s again: exiting now; the last complete checkpoint is kept", name)
            logging.shutdown()
            os._exit(128 + signum)
        self.received = name
        log.warning("%s: finishing this optimizer step, then saving a checkpoint and exiting (send it again to "
                    "exit at once)", name)  # fmt: skip
