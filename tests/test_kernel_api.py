"""The kernels' public API refuses bad arguments with a TypeError/ValueError that names the argument
(never a raw schema RuntimeError or an AttributeError from inside), and takes what its drop-in
modules' originals take (unbatched convolution inputs, a 1-d linear input).

The sweep puts each wrong-typed or wrong-valued argument of BAD_VALUES into an otherwise valid call
of every public op, every argument in turn (about 1,700 calls); it runs the PyTorch
paths (TRITON_INTERPRET=0). A value an op legitimately takes is listed in ACCEPTED, with why.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
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
    x, upstream = torch.randn(2, 6, 6), torch.randn(3, 6, 6)
    for conv in (TraceConv2d(2, 3, 3, padding=1, probes=4), FeedbackConv2d(2, 3, 3, padding=1)):
        grads = []
        for batched in (False, True):  # the same input as (C, H, W) and as a batch of one
            conv.zero_grad()
            xs = (x.unsqueeze(0) if batched else x).clone().requires_grad_()
            y = conv(xs)
            want = F.conv2d(x.unsqueeze(0), conv.weight, conv.bias, padding=1)
            assert torch.allclose(y, want if batched else want[0], atol=1e-6)
            y.backward(upstream.unsqueeze(0) if batched else upstream)
            grads.append((xs.grad.reshape(x.shape), conv.bias.grad.clone(), conv.weight.grad.clone()))
        (dx, db, dw), (dx_b, db_b, dw_b) = grads
        torch.testing.assert_close(dx, dx_b)  # exact input gradient (trace conv) or B's (feedback conv)
        torch.testing.assert_close(db, db_b)
        assert not torch.equal(dx, torch.zeros_like(dx)) and dw.shape == conv.weight.shape
        if isinstance(conv, FeedbackConv2d):  # exact dW; the trace conv's is an estimate from fresh probes
            torch.testing.assert_close(dw, dw_b)
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


BAD_VALUES: dict[str, object] = {  # a label for each value (the allow-list names them); callables make tensors fresh
    "None": None, "'yes'": "yes", "''": "", "1.5": 1.5, "-1": -1, "0": 0, "2**40": 2**40, "True": True,
    "nan": float("nan"), "inf": float("inf"), "[1, 2]": [1, 2], "(3,)": (3,), "{'a': 1}": {"a": 1},
    "0-d": lambda: torch.tensor(1.0), "(3,)-tensor": lambda: torch.randn(3),
    "float64": lambda: torch.randn(4, 3, dtype=torch.float64), "int64": lambda: torch.ones(4, 6, dtype=torch.int64),
    "meta": lambda: torch.empty(4, 3, device="meta"), "transposed": lambda: torch.randn(6, 4).t(),
    "(2, 3, 6, 6)": lambda: torch.randn(2, 3, 6, 6), "nn.Linear": lambda: nn.Linear(2, 2),
}

_NUMBERS = {"1.5", "-1", "0", "2**40"}  # a scale, beta or alpha: any finite number is one
_INTS = {"-1", "0", "2**40"}  # a seed or stream of the hash: any int (taken modulo 2**32)
_PAIR = {"[1, 2]"}  # a (height, width) pair as a list, as the torch.library ops pass it
ACCEPTED: dict[tuple[str, str], set[str]] = {
    **{("ConvGeometry", arg): _PAIR for arg in ("input_hw", "kernel_size", "stride", "padding", "dilation")},
    ("ConvGeometry", "groups"): {"2**40"},  # no channel counts here: trace_weight_grad checks that groups divide them
    ("FeedbackLinear", "seed"): {"0", "2**40"},  # in [0, 2**63)
    ("convert_to_feedback", "seed"): {"0", "2**40"},
    ("SeededSigns", "seed"): {"0"}, ("SeededSigns", "stream"): {"0"},
    ("binary_feedback_project", "grad_mask"): {"None"},  # optional
    ("binary_feedback_project", "out_dtype"): {"None"},  # None: e's dtype
    ("binary_feedback_project", "scale"): _NUMBERS, ("project_labels", "scale"): _NUMBERS,
    **{(op, "model"): {"nn.Linear"} for op in ("convert_batch_norms", "convert_to_feedback", "convert_to_trace_conv")},
    **{(op, arg): _NUMBERS for op in ("local_signal", "local_weight_update") for arg in ("alpha", "beta", "scale")},
    ("local_signal", "diagnostics"): {"True"},
    ("local_signal", "z"): {"None"}, ("local_weight_update", "z"): {"None"},  # None: z = phi(a)
    ("local_weight_update", "max_norm"): {"None", "1.5", "2**40"},  # None: no projection
    ("norm_ball_factor", "max_norm"): {"None", "1.5", "2**40"},
    ("norm_ball_factor", "norm"): {"0-d", "(3,)-tensor", "float64", "transposed", "(2, 3, 6, 6)"},  # elementwise
    ("lra_error_units", "alpha"): _NUMBERS, ("lra_error_units", "beta"): _NUMBERS,
    ("lra_error_units", "a"): {"transposed"},  # any layout
    ("lra_error_units", "d"): {"0-d", "transposed"},  # broadcast to a's shape
    ("lra_error_units", "z"): {"None", "0-d", "transposed"},
    ("pack_signs", "signs"): {"int64"},  # the signs of any real tensor
    ("probe_matrix", "positions"): {"0"},  # an empty Z
    ("probe_matrix", "seed"): _INTS, ("stream_key", "seed"): _INTS, ("stream_key", "stream"): _INTS,
    ("trace_compress_torch", "seed"): _INTS, ("trace_weight_grad_torch", "seed"): _INTS,
    ("trace_compress_torch", "x"): {"(2, 3, 6, 6)"},  # the valid input itself
    ("trace_weight_grad_torch", "grad_output"): {"(2, 3, 6, 6)"},  # 3 output channels: a valid gradient
    ("strip_feedback", "state_dict"): {"{'a': 1}"},  # a mapping; entries are kept or dropped by key
}


@pytest.mark.parametrize("name", sorted(_calls()))
def test_every_bad_argument_raises_a_type_or_value_error_naming_it(name):
    """Every argument of the op, given each value of BAD_VALUES in an otherwise valid call: a
    TypeError/ValueError naming the argument, or a value the op legitimately takes (ACCEPTED);
    anything else (silently accepted, another exception) fails."""
    _, valid = _calls()[name]
    failures = []
    for arg in sorted(valid):
        for label, bad in BAD_VALUES.items():
            fn, kwargs = _calls()[name]
            kwargs[arg] = bad() if callable(bad) else bad
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("TRITON_INTERPRET", "0")
                try:
                    fn(**kwargs)
                except (TypeError, ValueError) as error:
                    if not (arg in str(error) or arg.replace("_", " ") in str(error)):
                        failures.append(f"{arg}={label}: the message does not name it: {error}")
                    continue
                except Exception as error:  # noqa: BLE001 (any other exception is the failure reported)
                    failures.append(f"{arg}={label}: {type(error).__name__}: {str(error)[:200]}")
                    continue
            if label not in ACCEPTED.get((name, arg), set()):
                failures.append(f"{arg}={label}: accepted without an error (not in ACCEPTED)")
    assert not failures, f"{name}:\n" + "\n".join(failures)
