"""Where a 2-d convolution's kernel taps read: its input size, kernel, stride, padding, dilation, groups."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

_PAIRS = ("input_hw", "kernel_size", "stride", "padding", "dilation")
_LOWEST = {"input_hw": 1, "kernel_size": 1, "stride": 1, "padding": 0, "dilation": 1}


@dataclass(frozen=True)
class ConvGeometry:
    """The geometry of a zero-padded ``nn.Conv2d`` applied to an ``input_hw`` image.

    Each field but ``groups`` is a (height, width) pair; lists (as the ``torch.library`` ops take
    them) become tuples. ``padding`` is the symmetric zero padding in pixels per side.
    """

    input_hw: Sequence[int]
    kernel_size: Sequence[int]
    stride: Sequence[int] = (1, 1)
    padding: Sequence[int] = (0, 0)
    dilation: Sequence[int] = (1, 1)
    groups: int = 1

    def __post_init__(self) -> None:
        for name in _PAIRS:
            value = getattr(self, name)
            pair = tuple(value) if isinstance(value, Sequence) else ()
            if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
                raise ValueError(f"ConvGeometry: {name} must be 2 ints, got {value!r}")
            low = _LOWEST[name]
            if min(pair) < low:
                raise ValueError(f"ConvGeometry: {name} must be >= {low} on both axes, got {pair}")
            object.__setattr__(self, name, pair)
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"ConvGeometry: groups must be an int >= 1, got {self.groups!r}")

    @property
    def taps(self) -> int:
        """Kernel taps per (output, input) channel pair: kh * kw."""
        return self.kernel_size[0] * self.kernel_size[1]

    def output_hw(self) -> tuple[int, int]:
        """The output size, per axis ``(size + 2 padding - dilation (kernel - 1) - 1) // stride + 1``."""
        h, w = (
            (self.input_hw[i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1)
            // self.stride[i] + 1
            for i in range(2)
        )  # fmt: skip
        return h, w
