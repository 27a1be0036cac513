"""How a run can end other than by finishing: the CLI maps each to its exit code.

Kept free of torch so that ``trainer --help`` and ``trainer list`` start at once.
"""

from __future__ import annotations

import math

EXPLODED_LOSS_FACTOR = 100.0  # a cross-entropy above 100·ln C: logits wrong by a margin of ~100·ln C
HUGE_INPUT = 100.0  # |x| beyond this names the data as a divergence's cause (normalized data stays within a few units)


class RuleError(ValueError):
    """A rule cannot train this model with these options (a unit it cannot use, a bad option
    combination). The session adds the recipe's file and section to the message."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN, infinite or exploded (``divergence``); the last good checkpoint is kept
    (exit code 3). ``cause``: what the step's own inputs show went wrong (``input_cause``, or
    weights that were already non-finite), None when nothing does: then the learning rate is the
    likely cause, and the trainer's message says where it came from."""

    def __init__(self, message: str, cause: str | None = None):
        super().__init__(message)
        self.cause = cause


def divergence(loss: float, num_classes: int) -> str | None:
    """Why a cross-entropy ``loss`` means training has diverged, or None if it has not.

    Not finite, or above ``EXPLODED_LOSS_FACTOR · ln C``: chance is ln C, and a loss 100 times
    that comes only from logits that have blown up (a learning rate far too large for the rule),
    from which no run recovers.
    """
    if not math.isfinite(loss):
        return f"loss became {loss}"
    limit = _loss_limit(num_classes)
    if loss > limit:
        return f"loss exploded to {loss:.4g} (over {EXPLODED_LOSS_FACTOR:g}·ln C = {limit:.4g}; chance is {limit / EXPLODED_LOSS_FACTOR:.3g})"
    return None


def logit_divergence(spread: float, num_classes: int) -> str | None:
    """Why logits seen without their labels mean training has diverged, or None: ``spread`` is the
    largest max − min over the batch's samples; not finite, or above the loss limit of
    ``divergence``, which the cross-entropy of the sample's lowest-scored class then exceeds."""
    if not math.isfinite(spread):
        return f"logits became {spread} (non-finite)"
    limit = _loss_limit(num_classes)
    if spread > limit:
        return (f"logits exploded to a spread of {spread:.4g} (a loss over {EXPLODED_LOSS_FACTOR:g}·ln C = "
                f"{limit:.4g} for some label)")
    return None


def _loss_limit(num_classes: int) -> float:
    return EXPLODED_LOSS_FACTOR * math.log(max(num_classes, 2))


def input_cause(largest: float, samples: int) -> str | None:
    """The cause of a divergence that the batch itself shows, or None (then the learning rate is
    the likely one): no samples (a mean over none is NaN), non-finite inputs, or inputs beyond
    ``HUGE_INPUT``. ``largest`` is the batch's largest |x| (NaN or inf when it holds one)."""
    if samples == 0:
        return "the batch was empty (0 samples: the mean loss over none is NaN); skip empty batches"
    if not math.isfinite(largest):
        return f"the batch x holds {'NaN' if math.isnan(largest) else 'infinite'} values: check the data (x)"
    if largest > HUGE_INPUT:
        return (f"the batch x reaches |x| = {largest:.3g} (normalized data stays within a few units): inputs this "
                "large blow the logits up at any learning rate; check and normalize the data (x)")
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
