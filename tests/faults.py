"""Fault injection for tests that run the real CLI in a subprocess."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtBatch(Callback):
    """SIGKILL this process when the ``batch``-th training micro-batch of the run (0-based) starts.

    Nothing gets a chance to clean up: no ``finally``, no ``atexit``, no Lightning teardown,
    exactly as when a machine is preempted or the OOM killer strikes.
    """

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
        self.seen += 1


class DumpMetrics(Callback):
    """Write each rank's final ``callback_metrics`` to ``<directory>/rank<r>.json``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_fit_end(self, trainer, pl_module) -> None:
        import json
        from pathlib import Path

        path = Path(self.directory) / f"rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: float(v) for k, v in trainer.callback_metrics.items()}))
