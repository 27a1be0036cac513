"""Tests for kernels.trace_conv (trace-estimated Conv2d weight gradients, Louboutin et al. 2021) and
what goes with it: kernels.probes, kernels.conv_geometry, kernels.mask_relu, kernels.convert.

``tests/conftest.py`` sets TRITON_INTERPRET=1 before torch/triton are imported, so CPU tensors run
the Triton kernels under the interpreter; tests that need many seeds switch to the PyTorch path with
monkeypatch (``kernels._dispatch.use_triton`` reads the variable at call time) after the two paths
are checked against each other.
"""

import copy

import pytest
import torch
import torchvision
from torch import nn

from kernels import ConvGeometry, MaskReLU, TraceConv2d, convert_to_trace_conv
from kernels._hash import stream_key
from kernels.probes import PROBES, probe_matrix
from kernels.trace_conv import (
    trace_compress_torch,
    trace_compress_triton,
    trace_weight_grad_torch,
    trace_weight_grad_triton,
)

from conftest import assert_rel_close

# (C_in, C_out, kernel, stride, padding, dilation, groups, (H, W), bias): every supported kind of
# geometry on odd and non-square images.
CONFIGS = [
    (3, 4, 3, 1, 0, 1, 1, (7, 9), True),
    (3, 4, 3, 1, 1, 1, 1, (5, 5), False),
    (4, 6, 3, 2, 1, 1, 2, (9, 7), False),
    (4, 4, 3, 1, 2, 2, 4, (7, 7), True),  # depthwise, dilated
    (4, 8, 3, 2, 1, 1, 4, (7, 5), True),  # depthwise with channel multiplier 2
    (3, 6, (1, 3), (2, 1), (0, 1), (1, 2), 3, (5, 9), True),
    (2, 3, (3, 2), 2, 2, 2, 1, (9, 8), False),
    (4, 8, 1, 2, 0, 1, 1, (7, 7), False),  # 1x1 stride-2 (ResNet downsample)
    (2, 4, 5, 1, "same", 1, 2, (6, 5), True),
    (3, 2, 3, 2, "valid", (2, 1), 1, (9, 6), True),
]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _make(cfg, probes=16, probe="gaussian"):
    c_in, c_out, k, s, p, d, g, _, bias = cfg
    kw = dict(stride=s, padding=p, dilation=d, groups=g, bias=bias)
    conv = TraceConv2d(c_in, c_out, k, probes=probes, probe=probe, **kw)
    ref = nn.Conv2d(c_in, c_out, k, **kw)
    ref.load_state_dict(conv.state_dict())
    return conv, ref


def _geometry(ref: nn.Conv2d, input_hw) -> ConvGeometry:
    """The geometry of a plain nn.Conv2d on an ``input_hw`` image, its padding made ints here."""
    if ref.padding == "valid":
        pad = [0, 0]
    elif ref.padding == "same":
        pad = [d * (k - 1) // 2 for d, k in zip(ref.dilation, ref.kernel_size)]
    else:
        pad = list(ref.padding)
    return ConvGeometry(list(input_hw), list(ref.kernel_size), list(ref.stride), pad, list(ref.dilation), ref.groups)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops on a shared CPU run far faster on one thread than on a contended pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torch_path(monkeypatch):
    """Run CPU tensors on the PyTorch references (for tests that need many seeds)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


# ----------------------------------------------------------------------------- probes


@pytest.mark.parametrize("probe", PROBES)
def test_probe_second_moment_is_r_identity(probe):
    positions, probes, seeds = 6, 8, 600
    acc = sum(probe_matrix(s, positions, probes, probe) @ probe_matrix(s, positions, probes, probe).T
              for s in range(seeds)) / seeds  # fmt: skip
    assert torch.allclose(acc, probes * torch.eye(positions), atol=0.35 * probes**0.5)
    z = probe_matrix(7, positions, probes, probe)
    if probe != "gaussian":  # +-1 entries, or one +-sqrt(r) per row: diag(Z Z^T) = r
        torch.testing.assert_close(torch.diag(z @ z.T), torch.full((positions,), float(probes)))
    if probe == "orthogonal":  # disjoint column supports
        gram = z.T @ z
        assert torch.equal(gram, torch.diag(torch.diag(gram)))


@pytest.mark.parametrize("probe", PROBES)
def test_triton_probes_match_torch(probe):
    # Compressing the identity returns Z itself: Xbar[c, 0, :] = Z[c, :]. Seed 6 has both keys
    # with the top bit set, so the uint32 key path is covered too.
    assert min(stream_key(6, 0), stream_key(6, 1)) >= 2**31
    h, w, probes = 5, 7, 19
    eye = torch.eye(h * w).view(1, h * w, h, w)
    for seed in (6, 12345):
        got = trace_compress_triton(eye, seed, probes, probe)[:, 0, :]
        want = probe_matrix(seed, h * w, probes, probe)
        if probe == "gaussian":  # log/cos/sqrt may round differently in the last bit
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got, want)


# ----------------------------------------------------------------------------- kernels vs refs


@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("shape,probes", [((3, 5, 7, 9), 5), ((2, 3, 11, 13), 70), ((1, 67, 3, 5), 16)])
def test_compress_triton_matches_torch(probe, shape, probes):
    x = torch.randn(shape)
    got = trace_compress_triton(x, 11, probes, probe)
    want = trace_compress_torch(x, 11, probes, probe)
    assert got.shape == (shape[1], shape[0], probes) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compress_half_precision_input():
    x = torch.randn(2, 3, 5, 7)
    got = trace_compress_triton(x.to(torch.bfloat16), 5, 8, "rademacher")
    want = trace_compress_torch(x.to(torch.bfloat16), 5, 8, "rademacher")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize(
    "cfg", CONFIGS[:7:2] + CONFIGS[5:6] + [(3, 40, 3, 1, 1, 1, 1, (12, 11), True)]
)  # the last one spans several row blocks and output-position blocks
def test_weight_grad_triton_matches_torch(probe, cfg):
    _, ref = _make(cfg)
    x = torch.randn(2, cfg[0], *cfg[7])
    gy = torch.randn_like(ref(x))
    xbar = trace_compress_torch(x, 21, 9, probe)
    got = trace_weight_grad_triton(gy, xbar, 21, _geometry(ref, cfg[7]), probe)
    want = trace_weight_grad_torch(gy, xbar, 21, _geometry(ref, cfg[7]), probe)
    assert got.shape == ref.weight.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_geometry_output_size_is_the_convs(cfg):
    _, ref = _make(cfg)
    geometry = _geometry(ref, cfg[7])
    assert geometry.output_hw() == tuple(ref(torch.zeros(1, cfg[0], *cfg[7])).shape[2:])
    assert geometry.taps == ref.kernel_size[0] * ref.kernel_size[1]
    assert isinstance(geometry.stride, tuple) and hash(geometry) == hash(_geometry(ref, cfg[7]))


def test_geometry_and_weight_grad_errors():
    with pytest.raises(ValueError, match=r"ConvGeometry: stride must be 2 ints, got \[1\]"):
        ConvGeometry((5, 5), (3, 3), stride=[1])
    x, gy = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 3, 3)
    xbar = trace_compress_torch(x, 0, 4, "rademacher")
    with pytest.raises(ValueError, match="grad_output is 3x3 but the conv geometry gives 5x5"):
        trace_weight_grad_torch(gy, xbar, 0, ConvGeometry((5, 5), (3, 3), padding=(1, 1)), "rademacher")
    with pytest.raises(ValueError, match="groups=2 must divide C_in=3 and C_out=4"):
        trace_weight_grad_torch(gy, xbar, 0, ConvGeometry((5, 5), (3, 3), groups=2), "rademacher")
    with pytest.raises(ValueError, match="xbar holds 2 samples but grad_output 1"):
        trace_weight_grad_torch(gy[:1], xbar, 0, ConvGeometry((5, 5), (3, 3)), "rademacher")


# ----------------------------------------------------------------------------- estimator


def _identity_resolving_seed(positions: int, probes: int) -> int:
    """A seed whose orthogonal probes put every position in its own column, so Z Z^T = r I exactly."""
    for seed in range(1000):
        z = probe_matrix(seed, positions, probes, "orthogonal")
        if torch.equal(z @ z.T, probes * torch.eye(positions)):
            return seed
    raise AssertionError("no collision-free seed found")


@pytest.mark.parametrize("cfg", CONFIGS)
def test_estimator_is_exact_when_probes_resolve_identity(cfg):
    """With Z Z^T = r I the estimate must equal torch's gradient: checks S_k for every geometry.

    A 5x3 image (15 positions) in 256 orthogonal-probe columns has a collision-free seed within a
    few tries; every config still has borders on all sides.
    """
    _, ref = _make(cfg)
    h, w = 5, 3
    probes = 256
    seed = _identity_resolving_seed(h * w, probes)
    x = torch.randn(2, cfg[0], h, w)
    y = ref(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    for compress, weight_grad in ((trace_compress_torch, trace_weight_grad_torch),
                                  (trace_compress_triton, trace_weight_grad_triton)):  # fmt: skip
        got = weight_grad(gy, compress(x, seed, probes, "orthogonal"), seed, _geometry(ref, (h, w)), "orthogonal")
        torch.testing.assert_close(got, ref.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_module_gradient_matches_torch_in_expectation(torch_path, probe, cfg):
    """Mean over 4 seeds of 1024 probes each is within a relative-error bound of torch's gradient."""
    torch.manual_seed(0)
    conv, ref = _make(cfg, probes=1024, probe=probe)
    x = torch.randn(3, cfg[0], *cfg[7])
    gy = torch.randn_like(ref(x))
    ref(x).backward(gy)
    for _ in range(4):
        conv(x).backward(gy)
    assert_rel_close(conv.weight.grad / 4, ref.weight.grad, 0.3, norm="fro")


def test_unbiased_error_shrinks_like_inverse_sqrt_of_seeds(torch_path):
    """RMS error of the mean of S single-seed estimates halves when S quadruples (no bias floor)."""
    torch.manual_seed(0)
    _, ref = _make(CONFIGS[2])
    x = torch.randn(2, 4, 9, 7)
    gy = torch.randn_like(ref(x))
    ref(x).backward(gy)
    geometry = _geometry(ref, (9, 7))
    estimates = torch.stack([
        trace_weight_grad_torch(gy, trace_compress_torch(x, seed, 4, "gaussian"), seed, geometry, "gaussian")
        for seed in range(512)
    ])  # fmt: skip

    def rms_error(s):
        means = estimates.view(-1, s, *ref.weight.shape).mean(1)
        return ((means - ref.weight.grad).flatten(1).norm(dim=1) ** 2).mean().sqrt() / ref.weight.grad.norm()

    e8, e32, e128 = rms_error(8), rms_error(32), rms_error(128)
    assert 0.4 < e32 / e8 < 0.62, (e8, e32)
    assert 0.4 < e128 / e32 < 0.62, (e32, e128)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_input_and_bias_gradients_are_exact(cfg):
    conv, ref = _make(cfg, probes=4)
    x = torch.randn(2, cfg[0], *cfg[7], requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = conv(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    if cfg[-1]:
        torch.testing.assert_close(conv.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


def test_saved_tensors_are_probe_sized():
    n, c_in, h, w, probes = 2, 8, 16, 16, 4
    x = torch.randn(n, c_in, h, w, requires_grad=True)

    def saved_shapes(module):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return shapes

    conv = TraceConv2d(c_in, 16, 3, padding=1, probes=probes)
    shapes = saved_shapes(conv)
    assert (c_in, n, probes) in shapes
    assert all(torch.Size(s).numel() <= max(c_in * n * probes, conv.weight.numel()) for s in shapes)
    assert tuple(x.shape) in saved_shapes(nn.Conv2d(c_in, 16, 3, padding=1))  # the hook sees inputs


def test_eval_and_no_grad_run_the_exact_conv():
    conv, ref = _make(CONFIGS[2])
    x = torch.randn(2, 4, 9, 7)
    conv.eval()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0"
    torch.testing.assert_close(conv(x), ref(x), rtol=0, atol=0)
    conv.train()
    with torch.no_grad():
        torch.testing.assert_close(conv(x), ref(x), rtol=0, atol=0)
    conv.weight.requires_grad_(False)
    assert type(conv(x).grad_fn).__name__ != "_TraceConv2dFunctionBackward"


def test_drop_in_state_dict_and_reproducible_seeds():
    conv = TraceConv2d(3, 4, 3, probes=8, probe="rademacher")
    assert set(conv.state_dict()) == set(nn.Conv2d(3, 4, 3).state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 3, 7, 7)
    grads = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        conv.weight.grad = None
        conv(x).sum().backward()
        grads.append(conv.weight.grad)
    assert torch.equal(grads[0], grads[1])
    assert not torch.equal(grads[0], grads[2])


def test_autocast_bfloat16():
    conv, ref = _make(CONFIGS[0], probes=4)
    x = torch.randn(2, 3, 7, 9, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and torch.isfinite(conv.weight.grad).all()
    x_ref = x.detach().clone().requires_grad_()
    ref(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- MaskReLU


@pytest.mark.parametrize("inplace", [False, True])
def test_mask_relu_is_exact_and_saves_one_bit(inplace):
    x = torch.randn(3, 5, 7)  # 105 elements: not a multiple of 8
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    shapes = []

    def pack(t):
        shapes.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = MaskReLU(inplace=inplace)(a * 1.0)
    assert shapes == [((14,), torch.uint8)]
    y_ref = nn.ReLU()(b * 1.0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


# ----------------------------------------------------------------------------- converter


def test_convert_resnet18(torch_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    original = copy.deepcopy(model).eval()
    conv1_weight = model.layer1[0].conv1.weight
    converted = convert_to_trace_conv(model, probes=4, probe="rademacher")
    assert converted is model
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    assert type(model.conv1) is nn.Conv2d
    assert sum(isinstance(m, TraceConv2d) for m in convs) == 19
    assert model.layer1[0].conv1.weight is conv1_weight
    assert all(type(m) is not nn.ReLU for m in model.modules())
    assert model.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)
    model.train()
    model(x).sum().backward()
    assert all(torch.isfinite(m.weight.grad).all() for m in convs)

    every = convert_to_trace_conv(torchvision.models.resnet18(), keep_first_exact=False, mask_relu=False)
    assert sum(isinstance(m, TraceConv2d) for m in every.modules()) == 20
    assert any(type(m) is nn.ReLU for m in every.modules())


def test_convert_bare_conv_returns_replacement():
    conv = nn.Conv2d(3, 4, 3)
    new = convert_to_trace_conv(conv, probes=2, keep_first_exact=False)
    assert isinstance(new, TraceConv2d) and new.weight is conv.weight and new.probes == 2


def _nested(bad: nn.Module) -> nn.Module:
    block = nn.Module()
    block.conv1 = nn.Conv2d(4, 4, 3, padding=1)
    block.conv2 = bad
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 4, 3))
    model.add_module("layer1", nn.Sequential(block))
    return model


@pytest.mark.parametrize(
    "bad,message",
    [
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
         "layer1.0.conv2: padding_mode='reflect' is not supported"),
        (nn.ConvTranspose2d(4, 4, 3), "layer1.0.conv2: transposed convolution (ConvTranspose2d)"),
        (nn.Conv1d(4, 4, 3), "layer1.0.conv2: Conv1d is not supported"),
        (nn.Conv2d(4, 4, 4, padding="same"), "layer1.0.conv2: padding='same' with an even"),
    ],
)  # fmt: skip
def test_convert_refuses_unsupported_layers_by_name(bad, message):
    model = _nested(bad)
    with pytest.raises(ValueError) as err:
        convert_to_trace_conv(model)
    assert message in str(err.value)
    assert not any(isinstance(m, TraceConv2d) for m in model.modules())  # nothing half-converted


def test_argument_errors():
    with pytest.raises(ValueError, match="probe must be one of gaussian, rademacher, orthogonal"):
        TraceConv2d(3, 4, 3, probe="sobol")
    with pytest.raises(ValueError, match="probes must be a positive int"):
        convert_to_trace_conv(nn.Conv2d(3, 4, 3), probes=0)
    with pytest.raises(ValueError, match="TraceConv2d: padding_mode='circular' is not supported"):
        TraceConv2d(3, 4, 3, padding=1, padding_mode="circular")
    with pytest.raises(TypeError, match="trace_compress_torch: x has dtype torch.float64"):
        trace_compress_torch(torch.randn(1, 2, 3, 3, dtype=torch.float64), 0, 4, "gaussian")


# ----------------------------------------------------------------------------- torch.compile


def test_custom_ops_pass_opcheck():
    x = torch.randn(2, 3, 5, 7)
    seed = torch.tensor(9)
    torch.library.opcheck(torch.ops.bpfree.trace_compress.default, (x, seed, 4, "rademacher"))
    xbar = torch.ops.bpfree.trace_compress(x, seed, 4, "rademacher")
    gy = torch.randn(2, 6, 3, 4)
    args = (gy, xbar, seed, [5, 7], [3, 2], [2, 2], [1, 1], [1, 2], 3, "rademacher")
    torch.library.opcheck(torch.ops.bpfree.trace_weight_grad.default, args)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1))  # fmt: skip
    convert_to_trace_conv(model, probes=4)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    grads = []
    for _ in range(2):
        torch.manual_seed(5)
        model.zero_grad()
        x_in = x.clone().requires_grad_()
        compiled(x_in).sum().backward()
        grads.append((x_in.grad, model[3].weight.grad.clone(), model[3].bias.grad.clone()))
    assert torch.equal(grads[0][1], grads[1][1])  # reproducible under torch.manual_seed
    model.zero_grad()
    x_eager = x.clone().requires_grad_()
    model(x_eager).sum().backward()
    torch.testing.assert_close(grads[0][0], x_eager.grad)  # exact input gradient
    torch.testing.assert_close(grads[0][2], model[3].bias.grad)


def test_eval_mode_keeps_x_and_gives_the_exact_weight_gradient():
    """Documented: eval() is nn.Conv2d itself (X kept, exact dW); train() saves Xbar and estimates dW."""
    conv = TraceConv2d(3, 4, 3, padding=1, probes=4, probe="rademacher")
    ref = nn.Conv2d(3, 4, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    x, dy = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6)
    ref(x).backward(dy)
    conv.eval()(x).backward(dy)
    assert torch.equal(conv.weight.grad, ref.weight.grad)
    conv.weight.grad = conv.bias.grad = None
    conv.train()(x).backward(dy)
    torch.testing.assert_close(conv.bias.grad, ref.bias.grad)  # exact in both modes (up to summation order)
    assert not torch.allclose(conv.weight.grad, ref.weight.grad, rtol=0.05)  # r = 4 probes: an estimate
    doc = " ".join(TraceConv2d.__doc__.split())
    assert "Evaluation mode (``eval()``)" in doc and "keeps X for backward" in doc
    assert "gives the exact weight gradient" in doc and "unbiased estimate of the weight gradient" in doc
