"""Fixed random projections C x D: DFA's feedback matrices B_l and DRTP's target matrices P_l.

Entries have unit variance whatever the init (gaussian N(0, 1), uniform U(-√3, √3), binary ±1)
and the projection is multiplied by ``scale / sqrt(C)``. A projected signal ``g_d = Σ_c e_c B_cd``
then has variance ``scale² · ‖e‖² / C``: independent of D_l (the unit size), and of C for an
error of fixed norm. ``scale = "auto"`` multiplies by ``1 / sqrt(3·D)`` instead: each entry has
variance ``‖e‖² / (3·D)``, that of backprop's gradient through a linear layer of fan-in D in
PyTorch's default initialisation (weights U(-1/√D, 1/√D)) and of TinyDFA's U[-1, 1)/√D feedback, so
the signal of a sample has norm ≈ ‖e‖/√3 whatever D (DFA's default: docs/rules.md §5).

Binary matrices can be stored dense (float32), packed (1 bit an entry) or seeded (regenerated
inside the kernel from a hash; no memory). The packed form is the seeded signs packed, so packed
and seeded give bit-identical signals for the same seed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from kernels import PackedSigns, SeededSigns, binary_feedback_project, pack_signs, project_labels, stream_key

Init = Literal["gaussian", "uniform", "binary"]
Storage = Literal["dense", "packed", "seeded"]
Scale = float | Literal["auto"]  # s in s/√C, or "auto": 1/√(3·D)


def check_projection_options(init: str, storage: str, prefix: str = "feedback") -> None:
    """Raise ValueError for a storage that cannot hold the init (packed/seeded are ±1 only).
    ``prefix`` is how the rule's options name them: feedback_* (DFA), target_* (DRTP, tpSGD)."""
    if storage != "dense" and init != "binary":
        raise ValueError(f"{prefix}_storage = {storage!r} holds ±1 matrices only; use {prefix}_init = 'binary' "
                         f"or {prefix}_storage = 'dense' (got {prefix}_init = {init!r})")


class FixedProjection(nn.Module):
    """One fixed random C x D matrix and its two uses: ``project(e)`` and ``project_labels(y)``."""

    def __init__(self, num_classes: int, dim: int, *, init: Init = "gaussian", storage: Storage = "dense",
                 seed: int = 0, stream: int = 0, scale: Scale = 1.0, device: torch.device | None = None,
                 matrix: torch.Tensor | None = None):
        """``matrix``: a C x D matrix of one's own instead of a drawn one (dense; ``init`` is then
        "custom"), e.g. a DFA variant's feedback (``DFA.feedback_matrix``)."""
        super().__init__()
        self.scale = 1 / math.sqrt(3 * dim) if scale == "auto" else scale / math.sqrt(num_classes)  # the factor applied
        self.num_classes, self.dim = num_classes, dim
        if matrix is not None:
            if tuple(matrix.shape) != (num_classes, dim):
                raise ValueError(f"matrix: expected a {num_classes} x {dim} (C x D) matrix, got {tuple(matrix.shape)}")
            self.init, self.storage, self._seeded = "custom", "dense", None
            self.register_buffer("matrix", matrix.float().to(device))
            return
        check_projection_options(init, storage)
        self.init, self.storage = init, storage
        signs = SeededSigns(seed % 2**32, num_classes, dim, stream)
        self._seeded = signs if storage == "seeded" else None
        if storage == "packed":
            self.register_buffer("words", pack_signs(signs.materialize(device)).words)
        elif storage == "dense":
            if init == "binary":
                matrix = signs.materialize(device).float()
            else:
                gen = torch.Generator().manual_seed(stream_key(seed, stream))
                matrix = torch.randn(num_classes, dim, generator=gen) if init == "gaussian" else \
                    (torch.rand(num_classes, dim, generator=gen) * 2 - 1) * math.sqrt(3)
            self.register_buffer("matrix", matrix.to(device))

    @property
    def signs(self) -> PackedSigns | SeededSigns:
        """The ±1 matrix in its kernel form (packed or seeded storage only)."""
        if self._seeded is not None:
            return self._seeded
        return PackedSigns(self.words, self.num_classes, self.dim)

    @property
    def nbytes(self) -> int:
        """Bytes this matrix occupies: 4·C·D dense, C·⌈D/32⌉·4 packed, 0 seeded."""
        if self.storage == "dense":
            return self.matrix.numel() * self.matrix.element_size()
        return self.signs.nbytes

    def dense(self) -> torch.Tensor:
        """The unscaled C x D matrix in float32 (for references and diagnostics)."""
        if self.storage == "dense":
            return self.matrix
        return self.signs.materialize().float()  # packed: on the words' device; seeded: on the CPU

    def project(self, error: torch.Tensor, grad_mask: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``self.scale · (error @ B) [⊙ grad_mask]`` (scale/√C, or 1/√(3·D) for "auto"): N x C errors
        to N x D signals."""
        if self.storage == "dense":
            out = (error.float() * self.scale) @ self.matrix  # scale the N x C side: one pass over N x D
            if grad_mask is not None:
                out = out * grad_mask
            return out.to(out_dtype or error.dtype)
        return binary_feedback_project(error.contiguous(), self.signs, self.scale,
                                       None if grad_mask is None else grad_mask.contiguous(), out_dtype)

    def project_labels(self, labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``self.scale · onehot(labels) @ B``: a scaled row gather, the fast path for one-hot targets."""
        if self.storage == "dense":
            return (self.matrix[labels] * self.scale).to(dtype)
        return project_labels(labels.contiguous(), self.signs, self.scale, dtype)

    def extra_repr(self) -> str:
        return f"C={self.num_classes}, D={self.dim}, init={self.init}, storage={self.storage}, bytes={self.nbytes}"
