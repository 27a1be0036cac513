"""How a run can end other than by finishing: the CLI maps each to its exit code.

Kept free of torch so that ``trainer --help`` and ``trainer list`` start at once.
"""

from __future__ import annotations

import math

EXPLODED_LOSS_FACTOR = 100.0  # a cross-entropy above 100·ln C: logits wrong by a margin of ~100·ln C


class TrainingDiverged(RuntimeError):
    """The loss became NaN, infinite or exploded (``divergence``); the last good checkpoint is kept
    (exit code 3)."""


def divergence(loss: float, num_classes: int) -> str | None:
    """Why a cross-entropy ``loss`` means training has diverged, or None if it has not.

    Not finite, or above ``EXPLODED_LOSS_FACTOR · ln C``: chance is ln C, and a loss 100 times
    that comes only from logits that have blown up (a learning rate far too large for the rule),
    from which no run recovers.
    """
    if not math.isfinite(loss):
        return f"loss became {loss}"
    limit = EXPLODED_LOSS_FACTOR * math.log(max(num_classes, 2))
    if loss > limit:
        return f"loss exploded to {loss:.4g} (over {EXPLODED_LOSS_FACTOR:g}·ln C = {limit:.4g}; chance is {limit / EXPLODED_LOSS_FACTOR:.3g})"
    return None


class StageFailed(RuntimeError):
    """A pipeline stage waited longer than ``train.stage_timeout`` for another stage, or lost it;
    the run folder keeps its last complete checkpoint (exit code 4)."""


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT (Ctrl-C, exit code 130) or SIGTERM (``kill``, schedulers: 143).

    ``message`` says what was kept and how to continue."""

    def __init__(self, signal_name: str, message: str = ""):
        super().__init__(message or f"stopped by {signal_name}")
        self.signal_name, self.message = signal_name, message or f"stopped by {signal_name}"

    @property
    def exit_code(self) -> int:
        return 143 if self.signal_name == "SIGTERM" else 130
