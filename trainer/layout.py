"""Moved to ``trainer.parallel.layout``; this module re-exports its names for one release."""

from trainer.parallel.layout import Layout, Stepper

__all__ = ["Layout", "Stepper"]
