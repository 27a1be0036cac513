"""The kernels' public API refuses bad arguments with a TypeError/ValueError that names the argument
(never a raw schema RuntimeError or an AttributeError from inside), and takes what its drop-in
modules' originals take (unbatched convolution inputs, a 1-d linear input).

The generated cases (hypothesis, derandomized) put one wrong-typed or wrong-valued argument into an
otherwise valid call of every public op; they run the PyTorch paths (TRITON_INTERPRET=0).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import kernels
from kernels import (
    CompactBatchNorm2d,
    ConvGeometry,
    FeedbackConv2d,
    FeedbackLinear,
    SeededSigns,
    TraceConv2d,
    convert_batch_norms,
    convert_to_feedback,
    convert_to_trace_conv,
    feedback_layers,
    local_signal,
    local_signal_reference,
    local_weight_update,
    local_weight_update_reference,
    lra_error_units,
    norm_ball_factor,
    probe_matrix,
    stream_key,
    trace_compress_torch,
    trace_weight_grad_torch,
)


def lra_inputs() -> dict:
    return {"upstream": torch.randn(4, 3), "P": torch.randn(3, 6), "a": torch.randn(4, 6)}


# ----------------------------------------------------------------------------- named cases


def test_local_alignment_options_are_checked_before_the_registered_op():
    inputs = lra_inputs()
    z_prev = torch.randn(4, 5)
    with pytest.raises(TypeError, match="local_signal: diagnostics must be True or False, got str 'yes'"):
        local_signal("lra", **inputs, diagnostics="yes")
    with pytest.raises(TypeError, match="local_signal_reference: beta must be a Python number"):
        local_signal_reference("lra", **inputs, beta="0.1")
    with pytest.raises(TypeError, match="local_weight_update_reference: max_norm must be a Python number"):
        local_weight_update_reference("lra", **inputs, z=None, z_prev=z_prev, max_norm="1.0")
    with pytest.raises(ValueError, match="lra_error_units: unknown activation 'gelu'"):
        lra_error_units(inputs["a"], inputs["a"], None, beta=0.1, alpha=1.0, activation="gelu")
    with pytest.raises(ValueError, match="norm_ball_factor: max_norm must be > 0"):
        norm_ball_factor(torch.tensor(2.0), -1.0)
    with pytest.raises(TypeError, match="norm_ball_factor: norm must be a torch.Tensor"):
        norm_ball_factor(2.0, 1.0)


@pytest.mark.parametrize("convert", [convert_to_trace_conv, lambda m: convert_to_feedback(m, "fa"),
                                     convert_batch_norms, feedback_layers])
def test_converters_refuse_a_list_of_layers_naming_the_argument(convert):
    layers = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3)]
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got list; wrap the layers in nn.Sequential"):
        convert(layers)


def test_compact_batch_norm_names_expected_and_actual_channels():
    bn = CompactBatchNorm2d(3)
    for mode in (bn.train, bn.eval):
        mode()
        with pytest.raises(ValueError, match=r"expected an input with 3 channels \(dim 1\), got 4"):
            bn(torch.randn(2, 4, 5, 5))
    with pytest.raises(TypeError, match="bn must be an nn.BatchNorm2d, got list"):
        CompactBatchNorm2d.from_batch_norm([nn.BatchNorm2d(3)])


def test_probe_and_geometry_arguments():
    with pytest.raises(ValueError, match="probe_matrix: positions must be an int >= 0"):
        probe_matrix(0, -1, 4, "gaussian")
    with pytest.raises(TypeError, match="probe_matrix: seed must be an int, got float 0.5"):
        probe_matrix(0.5, 4, 4, "gaussian")
    with pytest.raises(TypeError, match="probe_matrix: seed must be an int, got bool"):
        probe_matrix(True, 4, 4, "gaussian")
    assert probe_matrix(3, 0, 4, "rademacher").shape == (0, 4)
    with pytest.raises(TypeError, match="stream_key: stream must be an int"):
        stream_key(1, 0.5)
    with pytest.raises(TypeError, match="trace_compress_torch: seed must be an int"):
        trace_compress_torch(torch.randn(1, 2, 3, 3), 0.5, 4, "gaussian")
    with pytest.raises(ValueError, match="ConvGeometry: kernel_size must be 2 ints, got 3"):
        ConvGeometry((8, 8), 3)
    with pytest.raises(ValueError, match=r"ConvGeometry: stride must be >= 1 on both axes, got \(0, 1\)"):
        ConvGeometry((8, 8), (3, 3), (0, 1))
    with pytest.raises(ValueError, match="ConvGeometry: groups must be an int >= 1, got 0"):
        ConvGeometry((8, 8), (3, 3), groups=0)
    xbar = trace_compress_torch(torch.randn(1, 2, 6, 6), 0, 4, "gaussian")
    with pytest.raises(TypeError, match="trace_weight_grad_torch: geometry must be a ConvGeometry, got tuple"):
        trace_weight_grad_torch(torch.randn(1, 3, 4, 4), xbar, 0, ((6, 6), (3, 3)), "gaussian")


def test_keep_exact_must_be_layer_names():
    for bad in (None, 3, [nn.Linear(2, 2)]):
        with pytest.raises(TypeError, match="keep_exact must be a sequence of layer names"):
            convert_to_feedback(nn.Sequential(nn.Linear(2, 2)), "fa", keep_exact=bad)


def test_unbatched_and_one_sample_inputs_train_like_the_batched_ones():
    """nn.Conv2d takes (C, H, W) and nn.Linear a 1-d input: their drop-ins do too, in training."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 6)
    for conv in (TraceConv2d(2, 3, 3, padding=1, probes=4), FeedbackConv2d(2, 3, 3, padding=1)):
        xs = x.clone().requires_grad_()
        y = conv(xs)
        assert torch.allclose(y, F.conv2d(x.unsqueeze(0), conv.weight, conv.bias, padding=1)[0], atol=1e-6)
        y.sum().backward()
        assert conv.bias.grad.shape == (3,) and conv.weight.grad.shape == conv.weight.shape
        assert xs.grad.shape == x.shape
    layer = FeedbackLinear(2, 3)
    v = torch.randn(2, requires_grad=True)
    layer(v).backward(torch.ones(3))
    assert torch.equal(layer.bias.grad, torch.ones(3))
    assert torch.allclose(v.grad, torch.ones(3) @ layer.feedback_weight)


def test_the_trainers_vit_under_match_init_is_refused_with_the_recipe_fix():
    """The vit's head is zero-initialised: feedback_init = "match" (the rules' default) cannot draw B
    like it, and the message says what works, for a recipe and for Python."""
    from trainer.config import ModelConfig
    from trainer.models import build_model
    from trainer.rules import RuleContext, RuleError, build_rule, rule_options_class

    model = build_model(ModelConfig(name="vit"), (1, 28, 28), 10)
    ctx = RuleContext(num_classes=10, input_shape=(1, 28, 28))
    with pytest.raises(RuleError, match=r'heads.head: init=.match. needs a weight with spread') as error:
        build_rule("fa", rule_options_class("fa")(), model, ctx)
    assert '[rule] feedback_init = "default"' in str(error.value) and 'use init="default"' in str(error.value)
    assert "keep_exact=['heads.head']" in str(error.value)


# ----------------------------------------------------------------------------- generated cases


def _calls() -> dict[str, tuple]:
    """Every public op as (function, valid keyword arguments)."""
    inputs = lra_inputs()
    conv_x = torch.randn(2, 3, 6, 6)
    geometry = ConvGeometry((6, 6), (3, 3), padding=(1, 1))
    return {
        "binary_feedback_project": (kernels.binary_feedback_project, dict(
            e=torch.randn(4, 3), feedback=SeededSigns(0, 3, 5), scale=0.5, grad_mask=torch.rand(4, 5),
            out_dtype=torch.float32)),
        "project_labels": (kernels.project_labels, dict(
            labels=torch.tensor([0, 2, 1]), feedback=SeededSigns(0, 3, 5), scale=1.0, dtype=torch.float32)),
        "pack_signs": (kernels.pack_signs, dict(signs=torch.ones(3, 5))),
        "SeededSigns": (SeededSigns, dict(seed=1, num_classes=3, dim=5, stream=2)),
        "local_signal": (local_signal, dict(
            kind="lra", **inputs, z=torch.randn(4, 6), beta=0.1, alpha=0.5, activation="tanh", scale=1.0,
            diagnostics=True)),
        "local_weight_update": (local_weight_update, dict(
            kind="lra", **inputs, z=None, z_prev=torch.randn(4, 5), beta=0.1, alpha=1.0, activation="relu",
            scale=1.0, max_norm=1.0)),
        "lra_error_units": (lra_error_units, dict(
            d=torch.randn(4, 6), a=torch.randn(4, 6), z=None, beta=0.1, alpha=1.0, activation="relu")),
        "norm_ball_factor": (norm_ball_factor, dict(norm=torch.tensor(2.0), max_norm=1.0)),
        "probe_matrix": (probe_matrix, dict(seed=1, positions=6, probes=4, probe="orthogonal")),
        "stream_key": (stream_key, dict(seed=1, stream=2)),
        "trace_compress_torch": (trace_compress_torch, dict(x=conv_x, seed=1, probes=4, probe="gaussian")),
        "trace_weight_grad_torch": (trace_weight_grad_torch, dict(
            grad_output=torch.randn(2, 4, 6, 6), xbar=trace_compress_torch(conv_x, 1, 4, "gaussian"), seed=1,
            geometry=geometry, probe="gaussian")),
        "ConvGeometry": (ConvGeometry, dict(input_hw=(6, 6), kernel_size=(3, 3), stride=(1, 1), padding=(1, 1),
                                            dilation=(1, 1), groups=1)),
        # the drop-in modules' own arguments (nn.Conv2d's and nn.Linear's are PyTorch's)
        "TraceConv2d": (functools.partial(TraceConv2d, 3, 4, 3), dict(probes=4, probe="gaussian")),
        "FeedbackLinear": (functools.partial(FeedbackLinear, 3, 2), dict(mode="kp", init="xavier", storage="dense",
                                                                         seed=0)),
        "convert_to_feedback": (convert_to_feedback, dict(
            model=nn.Sequential(nn.Linear(3, 3)), mode="fa", init="default", storage="seeded", seed=0,
            keep_exact=())),
        "convert_to_trace_conv": (convert_to_trace_conv, dict(
            model=nn.Sequential(nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 3)), probes=4, probe="rademacher")),
        "convert_batch_norms": (convert_batch_norms, dict(model=nn.Sequential(nn.BatchNorm2d(3)))),
        "strip_feedback": (kernels.strip_feedback, dict(state_dict={})),
    }


BAD_VALUES = st.sampled_from([
    None, "yes", "", 1.5, -1, 0, 2**40, True, float("nan"), float("inf"), [1, 2], (3,), {"a": 1},
    lambda: torch.tensor(1.0), lambda: torch.randn(3), lambda: torch.randn(4, 3, dtype=torch.float64),
    lambda: torch.ones(4, 6, dtype=torch.int64), lambda: torch.empty(4, 3, device="meta"),
    lambda: torch.randn(6, 4).t(), lambda: torch.randn(2, 3, 6, 6), lambda: nn.Linear(2, 2),
])


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_one_bad_argument_raises_a_type_or_value_error_naming_it(data):
    name = data.draw(st.sampled_from(sorted(_calls())), label="op")
    fn, kwargs = _calls()[name]
    arg = data.draw(st.sampled_from(sorted(kwargs)), label="argument")
    bad = data.draw(BAD_VALUES, label="value")
    kwargs[arg] = bad() if callable(bad) else bad
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        try:
            fn(**kwargs)
        except (TypeError, ValueError) as error:
            assert arg in str(error) or arg.replace("_", " ") in str(error), f"{name}({arg}=...): {error}"
