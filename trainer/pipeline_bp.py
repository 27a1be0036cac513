"""Moved to ``trainer.parallel.backprop``, where ``BackpropPipeline`` is ``BackpropStage``; this
module re-exports its names for one release."""

from trainer.parallel.backprop import SCHEDULES, BackpropStage, Schedule

BackpropPipeline = BackpropStage

__all__ = ["SCHEDULES", "BackpropPipeline", "Schedule"]
