"""A callback for tests that need a run to last: each training epoch starts ``seconds`` later.

Named in configs as ``slow_epochs:SlowEpochs`` (tests/ on the path). Sleeping draws no random
number and holds no state, so a run with it ends bit-identical to one without it.
"""

from __future__ import annotations

import time

from dltemplate.callbacks import Callback


class SlowEpochs(Callback):
    """Sleeps ``seconds`` at the start of every training epoch."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_epoch_start(self, trainer: object) -> None:
        """Wait: the run lasts at least ``epochs * seconds``, whatever the machine's speed."""
        time.sleep(self.seconds)
