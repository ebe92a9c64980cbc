"""Training budgets: results are decided by steps, never by the clock.

Every training loop whose outcome is a result (MALMEN's meta-training, MeG's generator) runs a fixed number
of steps (``max_steps`` / ``n_epochs``). ``max_minutes`` is only a wall-clock limit of one call: when it is
reached, the loop saves its checkpoint and raises :class:`TrainingStopped`. A stopped run is not a result (no
metrics are written); running the same command again continues from the checkpoint, and the finished run is
bit-identical to one that was never stopped, on a quiet or a loaded machine alike.
"""

from __future__ import annotations

import time

from meg_harness.errors import HarnessError


class TrainingStopped(HarnessError):
    """Training stopped by its wall-clock limit before its step budget; the checkpoint is saved."""


class WallClock:
    """A call's wall-clock limit (``max_minutes``; ``None``: none), with the mean step time so far."""

    def __init__(self, max_minutes: float | None) -> None:
        self.limit_s = None if max_minutes is None else 60.0 * float(max_minutes)
        self.started = time.monotonic()
        self.steps = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def step_done(self) -> None:
        self.steps += 1

    def next_step_overruns(self) -> bool:
        """Whether one more step (at this call's mean step time) would end past the limit."""
        if self.limit_s is None:
            return False
        elapsed = self.elapsed()
        mean = elapsed / self.steps if self.steps else 0.0
        return elapsed + mean > self.limit_s


def stopped(
    what: str, max_minutes: float | None, step: int, total: int, where: object, field: str
) -> TrainingStopped:
    """The error of a run stopped by ``max_minutes`` after ``step`` of ``total`` steps."""
    return TrainingStopped(
        f"{what} stopped by max_minutes={max_minutes} after step {step} of {total} (checkpoint saved in "
        f"{where}); a stopped run is not a result: run the same command again to continue from step {step}",
        field=field,
    )
