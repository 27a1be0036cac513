"""Activation memory without allocator statistics: the bytes autograd saves for backward.

On a GPU, ``torch.cuda.max_memory_allocated`` measures a training step. On a CPU there is no such
counter, but what backprop holds over a step, and what a forward-only rule frees unit by unit, is
exactly the set of saved tensors, which these hooks observe.
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch


class SavedActivationMeter:
    """Peak bytes of the tensors autograd keeps for backward, while this context is open.

    On the CPU there are no allocator statistics, and what backprop holds over a step, and a
    forward-only rule frees unit by unit, is exactly its saved tensors. A storage is counted once
    however many ops save it, from the first save until the last graph holding it is freed;
    ``exclude`` (parameters, buffers) is not counted.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._live: dict[int, list[int]] = {}  # storage address -> [saves alive, bytes]
        self.current = 0
        self.peak = 0

    def __enter__(self) -> "SavedActivationMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> object:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._excluded or storage.nbytes() == 0:
            return tensor
        entry = self._live.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        saved = _Saved(tensor)
        weakref.finalize(saved, self._release, key)
        return saved

    @staticmethod
    def _unpack(saved: object) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key: int) -> None:
        entry = self._live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._live[key]


class _Saved:
    """A saved tensor, wrapped so that its release (when its graph is freed) can be observed."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
