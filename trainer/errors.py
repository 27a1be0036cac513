"""How a run can end other than by finishing: the CLI maps each to its exit code.

Kept free of torch so that ``trainer --help`` and ``trainer list`` start at once.
"""

from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept (exit code 3)."""


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
