"""biotorch 0.0.16's benchmark model, its CIFAR ResNet-20, as a ``python:`` model factory: the trainer
trains it beside its own ResNet-20 on the same split, augmentation, optimizer and schedule
(``python -m benchmarks.compare_rules --suite biotorch-side-by-side``), so the two differ only in
the model and its layers.

biotorch's layers do their rule inside autograd (custom Functions whose backward uses B), so the
trainer runs them under its plain ``bp`` rule. biotorch is not a dependency of this project: install
it on its own, without its dependencies (it pins none that this torch lacks, but pulls in Jupyter,
TensorBoard and more), and put it on ``PYTHONPATH``::

    pip install --no-deps --target /tmp/biotorch biotorch==0.0.16
    PYTHONPATH=/tmp/biotorch python -m benchmarks.compare_rules --suite biotorch-side-by-side ...

What the two ResNet-20s differ in (docs/rules.md, §11): biotorch's shape-changing shortcuts are
option A (subsample and zero-pad: no parameters, exact gradients; ours: ``[model] cifar_shortcut``),
and every conv and linear weight, W and B alike, is Xavier-uniform with zero biases (ours: He-normal
convolutions, PyTorch's default linear; B from ``feedback_init``).
"""

from __future__ import annotations

import contextlib
import importlib
import io

from torch import nn

MODES = ("backpropagation", "fa", "usf", "brsf", "frsf")  # biotorch's modes that run without a loss hook (not dfa)


def resnet20(num_classes: int, input_shape: tuple[int, ...], mode: str = "fa", init: str = "xavier") -> nn.Module:
    """biotorch's ``biotorch.models.<mode>.resnet20`` with its benchmark's layer options
    (``init`` "xavier", no weight constraint, no gradient clipping), for 3-channel images."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    if input_shape[0] != 3:
        raise ValueError(f"biotorch's ResNet-20 takes 3-channel images, got input_shape {input_shape}")
    try:
        models = importlib.import_module(f"biotorch.models.{mode}")
    except ImportError as err:
        raise ImportError(f"{err}: install biotorch on its own (pip install --no-deps --target DIR biotorch==0.0.16) "
                          "and put DIR on PYTHONPATH") from None
    config = {"type": mode, "options": {"constrain_weights": False, "init": init, "gradient_clip": False}}
    with contextlib.redirect_stdout(io.StringIO()):  # its converter prints a report per model
        return models.resnet20(num_classes=num_classes, layer_config=config)
