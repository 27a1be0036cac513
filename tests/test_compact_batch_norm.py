"""CompactBatchNorm2d against nn.BatchNorm2d and against the plain equations: outputs, every gradient,
running statistics, what it saves for backward, the converter, torch.compile, bad input."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from kernels.compact_batch_norm import CompactBatchNorm2d, convert_batch_norms

from conftest import assert_rel_close

FP16_XHAT_RTOL = 2e-3  # xhat rounded to 11 significant bits; reductions average the rounding out


def batch_norm_equations(x, gamma, beta, eps, dy):
    """The spec's batch norm forward and backward, written out: y, dx, dgamma, dbeta."""
    dims = (0, 2, 3)
    m = x.numel() // x.shape[1]
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    xhat = (x - mean) / torch.sqrt(var + eps)
    g = gamma.view(1, -1, 1, 1)
    y = g * xhat + beta.view(1, -1, 1, 1)
    dbeta, dgamma = dy.sum(dims), (dy * xhat).sum(dims)
    dx = g / torch.sqrt(var + eps) * (dy - dbeta.view(1, -1, 1, 1) / m - xhat * dgamma.view(1, -1, 1, 1) / m)
    return y, dx, dgamma, dbeta


def random_bn(channels: int, **kwargs) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, **kwargs)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return bn


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (16, 32, 8, 8), (2, 1, 1, 3)])
def test_matches_the_equations(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) * 3 + 2
    dy = torch.randn(shape, generator=gen)
    bn = CompactBatchNorm2d.from_batch_norm(random_bn(shape[1]))
    xin = x.clone().requires_grad_()
    y = bn(xin)
    y.backward(dy)
    y_ref, dx_ref, dgamma_ref, dbeta_ref = batch_norm_equations(
        x.double(), bn.weight.detach().double(), bn.bias.detach().double(), bn.eps, dy.double()
    )
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)  # forward in fp32, not rounded
    assert_rel_close(xin.grad.double(), dx_ref, FP16_XHAT_RTOL, norm="fro")
    assert_rel_close(bn.weight.grad.double(), dgamma_ref, FP16_XHAT_RTOL, norm="fro")
    torch.testing.assert_close(bn.bias.grad.double(), dbeta_ref, rtol=1e-5, atol=1e-5)  # needs no xhat


@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}])
def test_matches_nn_batch_norm_over_steps_and_in_eval(kwargs):
    torch.manual_seed(0)
    reference = random_bn(6, **kwargs)
    compact = CompactBatchNorm2d.from_batch_norm(copy.deepcopy(reference))
    for _ in range(3):
        x = torch.randn(4, 6, 5, 3) * 2 - 1
        dy = torch.randn_like(x)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = reference(xa), compact(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        ya.backward(dy)
        yb.backward(dy)
        assert_rel_close(xb.grad, xa.grad, FP16_XHAT_RTOL, norm="fro")
        if reference.affine:
            assert_rel_close(compact.weight.grad, reference.weight.grad, FP16_XHAT_RTOL, norm="fro")
            torch.testing.assert_close(compact.bias.grad, reference.bias.grad)
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(getattr(compact, name), buffer, msg=name)
    reference.eval(), compact.eval()
    x = torch.randn(4, 6, 5, 3)
    torch.testing.assert_close(compact(x), reference(x), rtol=1e-5, atol=1e-6)  # running stats to rounding


def test_saves_fp16_xhat_and_per_channel_vectors_only():
    n, c, h, w = 5, 7, 6, 3
    bn = CompactBatchNorm2d(c)
    params = {p.untyped_storage().data_ptr() for p in bn.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bn(torch.randn(n, c, h, w, requires_grad=True))
    assert sorted(saved, key=str) == sorted([((n, c, h, w), torch.float16), ((c,), torch.float32)], key=str)


def test_bf16_input_keeps_its_dtype():
    bn = CompactBatchNorm2d(4)
    x = torch.randn(3, 4, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    y = bn(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and bn.weight.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all()


def test_convert_resnet18_shares_parameters_and_state_dict():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    original = copy.deepcopy(model)
    weight = model.bn1.weight
    assert convert_batch_norms(model) is model
    assert sum(type(m) is CompactBatchNorm2d for m in model.modules()) == 20
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert model.bn1.weight is weight
    assert list(model.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), original.eval()(x), rtol=0, atol=0)
    assert type(convert_batch_norms(nn.BatchNorm2d(3))) is CompactBatchNorm2d


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), random_bn(8), nn.ReLU())
    convert_batch_norms(model)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 3, 6, 6)
    for module in (compiled, eager):
        module(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    torch.testing.assert_close(model[1].running_var, eager[1].running_var)


def test_refuses_one_value_per_channel():
    with pytest.raises(ValueError, match="more than 1 value per channel.*batch of at least 2"):
        CompactBatchNorm2d(3)(torch.randn(1, 3, 1, 1, requires_grad=True))
    with pytest.raises(ValueError, match="expected 4D input"):
        CompactBatchNorm2d(3)(torch.randn(2, 3, requires_grad=True))
