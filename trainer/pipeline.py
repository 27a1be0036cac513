"""Moved to ``trainer.parallel`` (split, ownership, transport, layout); this module re-exports its
names for one release. ``LocalPipeline`` is now ``trainer.parallel.transport.LocalStage`` (which is
also its transport, the former ``StageTransport``)."""

from trainer.parallel.layout import REBALANCE_AFTER, Pipeline
from trainer.parallel.ownership import broadcast_stage_state, move_optimizer_state, owned_state, stage_state
from trainer.parallel.split import (
    REBALANCE_ABOVE_MEAN, Backward, above_mean, balanced_stages, forward_only_backward, measure_step_seconds,
    measure_unit_seconds, named_stages, ones_backward, pipeline_units, rebalanced_stages, split_note, split_stages,
    unit_label,
)
from trainer.parallel.transport import (
    ACTIVATION, ERROR, ERROR_UNITS, MAX_PENDING_SENDS, Courier, LocalStage, rebuild_state, state_tensors,
)

LocalPipeline = LocalStage

__all__ = [
    "ACTIVATION", "ERROR", "ERROR_UNITS", "MAX_PENDING_SENDS", "REBALANCE_ABOVE_MEAN", "REBALANCE_AFTER", "Backward",
    "Courier", "LocalPipeline", "Pipeline", "above_mean", "balanced_stages", "broadcast_stage_state",
    "forward_only_backward", "measure_step_seconds", "measure_unit_seconds", "move_optimizer_state", "named_stages",
    "ones_backward", "owned_state", "pipeline_units", "rebalanced_stages", "rebuild_state", "split_note",
    "split_stages", "stage_state", "state_tensors", "unit_label",
]
