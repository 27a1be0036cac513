"""Without Triton (macOS, Windows: pyproject.toml installs it on Linux only) ``kernels`` and
``trainer`` import, every op runs its PyTorch path with the reference's results, and one line says so.

Each check runs in a fresh interpreter whose imports of ``triton`` fail (a ``sys.meta_path``
finder), so the block never reaches the other tests; TRITON_INTERPRET is unset there (the
interpreter is Triton's).
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTICE = "Triton cannot be imported"

BLOCK_TRITON = r'''
import sys

class BlockTriton:
    """A machine without Triton: importing triton.* fails (a meta_path finder), and triton itself
    is None in sys.modules, so that importlib.util.find_spec("triton") is None as where it is not
    installed (torch probes it that way) and ``import triton`` raises ModuleNotFoundError."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, BlockTriton())
sys.modules["triton"] = None
'''

OPS_AND_TRAINING = BLOCK_TRITON + r'''
import torch
import torch.nn.functional as F
from torch import nn

import kernels
import trainer
from kernels import (FeedbackLinear, SeededSigns, TraceConv2d, binary_feedback_project, local_signal, pack_signs,
                     trace_compress_torch, trace_compress_triton, trace_weight_grad_torch)
from kernels._hash import hash2_torch, sign_from_hash_torch, stream_key
from kernels.conv_geometry import ConvGeometry
from trainer.rules import RuleContext, build_rule, rule_options_class
from trainer.rules.dfa import DFA, DFAOptions

assert sys.modules["triton"] is None
torch.manual_seed(0)

# binary_feedback_project, seeded and packed, with a mask: the dense product of the same signs
e, mask = torch.randn(5, 10), torch.rand(5, 70)
signs = sign_from_hash_torch(hash2_torch(stream_key(3, 1), torch.arange(10)[:, None], torch.arange(70)[None, :]))
want = 0.5 * (e @ signs.float()) * mask
assert torch.allclose(binary_feedback_project(e, SeededSigns(3, 10, 70, 1), 0.5, mask), want, atol=1e-5)
assert torch.allclose(binary_feedback_project(e, pack_signs(signs), 0.5, mask), want, atol=1e-5)

# local_signal (LRA, alpha = 1): e = relu(a) - relu(a - beta * scale * (u @ P))
u, P, a = torch.randn(4, 3), torch.randn(3, 6), torch.randn(4, 6)
want = a.relu() - (a - 0.1 * 0.3 * (u @ P)).relu()
assert torch.allclose(local_signal("lra", u, P, a, scale=0.3).e, want, atol=1e-6)

# TraceConv2d forward and backward: the exact conv and input gradient, the reference weight estimate
conv = TraceConv2d(3, 4, 3, padding=1, probes=8)
x = torch.randn(2, 3, 6, 6, requires_grad=True)
torch.manual_seed(1)
y = conv(x)
gy = torch.randn_like(y)
y.backward(gy)
assert torch.allclose(y, F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-6)
assert torch.allclose(x.grad, torch.nn.grad.conv2d_input(x.shape, conv.weight, gy, padding=1), atol=1e-5)
torch.manual_seed(1)
seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
xbar = trace_compress_torch(x.detach(), seed, 8, "gaussian")
want = trace_weight_grad_torch(gy, xbar, seed, ConvGeometry((6, 6), (3, 3), padding=(1, 1)), "gaussian")
assert torch.allclose(conv.weight.grad, want, atol=1e-5)
try:
    trace_compress_triton(x.detach(), 0, 8, "gaussian")
except RuntimeError as error:
    assert "trace_compress_triton" in str(error) and "Triton cannot be imported" in str(error), error
else:
    raise AssertionError("trace_compress_triton ran without Triton")

# FeedbackLinear: dx = dy @ B
layer = FeedbackLinear(6, 3, mode="fa")
x = torch.randn(4, 6, requires_grad=True)
dy = torch.randn(4, 3)
layer(x).backward(dy)
assert torch.allclose(x.grad, dy @ layer.feedback_weight, atol=1e-6)

# a rule in your own loop, and the trainer's bdfa (packed signs through binary_feedback_project)
def tiny():
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU()), nn.Linear(16, 4))

x, labels = torch.randn(32, 1, 3, 4), torch.randint(0, 4, (32,))
ctx = RuleContext(num_classes=4, input_shape=(1, 3, 4))
for rule in (DFA(tiny(), DFAOptions(), ctx), build_rule("bdfa", rule_options_class("bdfa")(), tiny(), ctx)):
    before = [p.detach().clone() for p in rule.model.parameters()]
    optimizer = torch.optim.SGD(rule.model.parameters(), lr=0.1)
    losses = [rule.train_step(x, labels, optimizer).loss for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert all(not torch.equal(b, p) for b, p in zip(before, rule.model.parameters()))
print("ok")
'''


def run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter at the repository root, TRITON_INTERPRET unset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_without_triton_the_packages_import_and_the_ops_run_their_references():
    done = run_python(OPS_AND_TRAINING)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
    output = done.stdout + done.stderr
    assert output.count(NOTICE) == 1, output[-3000:]  # once per process, not once a call
    notice = next(line for line in output.splitlines() if NOTICE in line)
    assert "PyTorch reference path" in notice


def test_without_triton_the_kernels_are_stand_ins_that_refuse_to_launch():
    done = run_python(BLOCK_TRITON + r'''
from kernels import binary_feedback
try:
    binary_feedback._binary_feedback_kernel[(1,)]()
except RuntimeError as error:
    print(error)
''')
    assert done.returncode == 0, done.stderr[-3000:]
    assert "_binary_feedback_kernel runs a Triton kernel, but Triton cannot be imported" in done.stdout
    assert NOTICE not in done.stderr  # importing alone says nothing: only the first op does


def test_binary_op_on_the_cpu_prints_no_cuda_probe():
    """The first CPU calls of the binary projection neither compile (which probed for CUDA and
    printed "No CUDA runtime is found" on machines with a CUDA toolkit and no GPU) nor import
    torch._dynamo (1-2 s): they cost milliseconds."""
    done = run_python(r'''
import torch
from kernels import SeededSigns, binary_feedback_project, pack_signs
e = torch.randn(8, 10)
binary_feedback_project(e, SeededSigns(0, 10, 300))
binary_feedback_project(e, pack_signs(SeededSigns(1, 10, 300).materialize()))
import sys
print([m for m in ("torch._dynamo", "torch._inductor", "torch.utils.cpp_extension") if m in sys.modules])
''')
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
    assert "CUDA" not in done.stdout + done.stderr, done.stderr


def test_without_triton_cuda_tensors_and_the_interpreter_take_the_reference_path(monkeypatch, caplog):
    """The policy without Triton (kernels._dispatch): no tensor launches a kernel, CUDA ones
    included (they run the PyTorch path on their device), and TRITON_INTERPRET=1 changes nothing;
    the first call logs the notice, later ones do not."""
    from types import SimpleNamespace

    import torch

    from kernels import _dispatch

    cuda_like = SimpleNamespace(is_cuda=True, device=torch.device("cuda"))
    assert _dispatch.use_triton(cuda_like)  # with Triton: the kernel
    monkeypatch.setattr(_dispatch, "TRITON_MISSING", "ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _dispatch._notice_reference_paths.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="kernels"):
            assert not _dispatch.use_triton(cuda_like)
            assert not _dispatch.use_triton(torch.empty(1))
            assert not _dispatch.triton_interpreting()
    finally:
        _dispatch._notice_reference_paths.cache_clear()
    assert [r.getMessage().count(NOTICE) for r in caplog.records] == [1]
