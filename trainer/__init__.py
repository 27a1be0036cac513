"""A compiled trainer for backprop-free and low-memory learning rules."""

__version__ = "0.2.0"
