"""Skipped steps and divergence: when the server's steps stop happening, the run says so and ends.

The server skips a round's step when the summed update is not usable (not finite, or every client's
update refused). One such round is a fault a run survives (a client's bad batch, a corrupt payload);
many in a row mean the model diverged (too high a learning rate, typically), and every further round
would only print one more line. After train.max_skipped of them the run stops with a message that says
when it began and what to try, instead of ending "done" with a NaN test loss.
"""

from __future__ import annotations

import math


class SkippedSteps:
    """Counts the server's consecutive skipped steps and remembers the last finite training loss."""

    def __init__(self, limit: int):
        self.limit = limit            # train.max_skipped; 0: never stop
        self.streak = 0               # consecutive rounds whose step was skipped, up to the latest
        self.first = 0                # 1-based round that began the streak
        self.loss_at: tuple[int, float] | None = None  # (round, loss) of the last finite training loss

    def observe(self, done: int, stepped: bool, train_loss: float) -> None:
        """Round `done` (1-based) took its step, or skipped it; its batch-weighted training loss."""
        if stepped:
            self.streak = 0
        else:
            self.streak += 1
            if self.streak == 1:
                self.first = done
        if math.isfinite(train_loss):
            self.loss_at = (done, train_loss)

    @property
    def diverged(self) -> bool:
        return bool(self.limit) and self.streak >= self.limit

    def explain(self, lr: float) -> str:
        """The divergence error: since when, what the loss did, what to try."""
        last = self.first + self.streak - 1
        loss = ("no finite training loss was logged" if self.loss_at is None
                else f"the last finite training loss was {self.loss_at[1]:.4g} at round {self.loss_at[0]}")
        return (f"the run diverged: the server skipped its step in {self.streak} rounds in a row, rounds "
                f"{self.first}-{last} (run.h5 rows {self.first - 1}-{last - 1}, /server/skipped; the clients' "
                f"summed update was not finite, or every update was refused); "
                f"{loss}. Try a lower optim.lr (now {lr:g}), a warm-up (optim.warmup_rounds), or a smaller "
                f"step for large batches (scaling); train.max_skipped = {self.limit} sets how many skipped "
                f"rounds end a run (0: never)")
