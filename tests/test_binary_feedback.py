"""Tests for kernels/binary_feedback.py: packed and seeded ±1 feedback, the fused projection kernel.

The Triton kernel runs on CPU under Triton's interpreter (``tests/conftest.py`` sets
TRITON_INTERPRET=1). Run with TRITON_INTERPRET=0 to test the PyTorch path instead (the
reference-path tests below run either way).
"""

import math
import warnings

import pytest
import torch

from kernels import _dispatch
from kernels import binary_feedback as bf
from kernels._dispatch import triton_interpreting
from kernels._hash import hash2_torch, sign_from_hash_torch, stream_key
from kernels.binary_feedback import (
    PackedSigns,
    SeededSigns,
    binary_feedback_project,
    pack_signs,
    project_labels,
)

from conftest import assert_rel_close

NS = (1, 7, 33, 70)  # 70 spans two N tiles
CS = (1, 10, 37)  # 37 spans two C chunks
DS = (1, 31, 33, 100, 257)  # 257 spans three D tiles
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_signs(c: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, (c, d), generator=gen) * 2 - 1).to(torch.int8)


def make_feedback(kind: str, c: int, d: int, gen: torch.Generator) -> tuple:
    """(feedback object, its dense int8 matrix computed independently of the feedback classes)."""
    if kind == "packed":
        signs = random_signs(c, d, gen)
        return pack_signs(signs), signs
    seed, stream = 1234 + c, d
    rows, cols = torch.arange(c)[:, None], torch.arange(d)[None, :]
    signs = sign_from_hash_torch(hash2_torch(stream_key(seed, stream), rows, cols)).to(torch.int8)
    return SeededSigns(seed, c, d, stream), signs


def reference(e, signs, scale=1.0, mask=None):
    out = scale * (e.float() @ signs.float())
    return out * mask.float() if mask is not None else out


def test_kernel_runs_interpreted_when_asked():
    """TRITON_INTERPRET=1 must reach Triton before it is first imported (conftest does it), or the
    kernels are built for a GPU and the CPU tests cannot launch them."""
    if triton_interpreting():
        assert type(bf._binary_feedback_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------- projection vs reference


@pytest.mark.parametrize("kind", ["packed", "seeded"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_projection_matches_reference(kind, with_mask):
    gen = torch.Generator().manual_seed(0)
    for c in CS:
        for d in DS:
            feedback, signs = make_feedback(kind, c, d, gen)
            for n in NS:
                e = torch.randn(n, c, generator=gen)
                mask = torch.rand(n, d, generator=gen) if with_mask else None
                out = binary_feedback_project(e, feedback, 0.37, mask)
                assert out.dtype == torch.float32 and out.shape == (n, d)
                ref = reference(e, signs, 0.37, mask)
                assert_rel_close(out, ref, RTOL[torch.float32], str((n, c, d)), norm="fro")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["packed", "seeded"])
def test_half_precision_errors_and_masks(kind, dtype):
    gen = torch.Generator().manual_seed(1)
    n, c, d = 33, 37, 100
    feedback, signs = make_feedback(kind, c, d, gen)
    e = torch.randn(n, c, generator=gen).to(dtype)
    mask = torch.rand(n, d, generator=gen)  # float32 mask with 16-bit e: mask dtype is free
    out = binary_feedback_project(e, feedback, 2.0, mask)
    assert out.dtype == dtype
    assert_rel_close(out, reference(e, signs, 2.0, mask), RTOL[dtype], norm="fro")
    out = binary_feedback_project(e.float(), feedback, 2.0, mask.to(dtype), out_dtype=dtype)
    assert out.dtype == dtype
    assert_rel_close(out, reference(e.float(), signs, 2.0, mask.to(dtype)), RTOL[dtype], norm="fro")


@pytest.mark.parametrize("kind", ["packed", "seeded"])
def test_kernel_writes_every_element(kind):
    gen = torch.Generator().manual_seed(2)
    n, c, d = 130, 37, 300  # seeded: 128-row tiles from N >= 128
    feedback, signs = make_feedback(kind, c, d, gen)
    e = torch.randn(n, c, generator=gen)
    mask = torch.rand(n, d, generator=gen)
    out = torch.full((n, d), float("nan"))
    bf._launch(e, None, feedback, mask, 0.5, out)
    assert_rel_close(out, reference(e, signs, 0.5, mask), 1e-5, norm="fro")
    labels = torch.randint(0, c, (n,), generator=gen)
    out = torch.full((n, d), float("nan"))
    bf._launch(None, labels, feedback, None, 0.5, out)
    assert torch.equal(out, 0.5 * signs[labels].float())


@pytest.mark.parametrize("kind", ["packed", "seeded"])
def test_pytorch_path_matches_reference(kind):
    """The CPU path (run when TRITON_INTERPRET is unset) against the plain reference."""
    gen = torch.Generator().manual_seed(3)
    n, c, d = 7, 37, 257
    feedback, signs = make_feedback(kind, c, d, gen)
    e = torch.randn(n, c, generator=gen)
    mask = torch.rand(n, d, generator=gen)
    out = torch.empty(n, d)
    bf._torch_project(e, feedback, mask, 0.5, out)
    assert_rel_close(out, reference(e, signs, 0.5, mask), 1e-6, norm="fro")
    labels = torch.randint(0, c, (n,), generator=gen)
    bf._torch_labels(labels, feedback, 0.5, out)
    assert torch.equal(out, 0.5 * signs[labels].float())


@pytest.mark.parametrize("kind", ["packed", "seeded"])
def test_large_chunked_materialize_and_projection(monkeypatch, kind):
    """Blocked CPU paths: tiny blocks, so several blocks of rows and of columns (and ragged last
    ones) are made; 16-bit outputs go through a float32 buffer and are rounded once."""
    monkeypatch.setattr(bf, "_CHUNK_ELEMENTS", 64)
    gen = torch.Generator().manual_seed(4)
    feedback, signs = make_feedback(kind, 10, 33, gen)
    assert torch.equal(feedback.materialize(), signs)
    e = torch.randn(3, 10, generator=gen)
    out = torch.empty(3, 33)
    bf._torch_project(e, feedback, None, 1.0, out)
    assert_rel_close(out, reference(e, signs), 1e-6, norm="fro")
    mask = torch.rand(3, 33, generator=gen).to(torch.float16)
    out = torch.full((3, 33), float("nan"), dtype=torch.bfloat16)
    bf._torch_project(e, feedback, mask, 0.5, out)
    assert torch.equal(out, reference(e, signs, 0.5, mask).to(torch.bfloat16))
    labels = torch.randint(0, 10, (5,), generator=gen)
    out = torch.full((5, 33), float("nan"))
    bf._torch_labels(labels, feedback, 0.5, out)
    assert torch.equal(out, 0.5 * signs[labels].float())


def test_sign_generators_fall_back_to_eager(monkeypatch):
    """Without torch.compile (no C++ compiler, no dynamo) the CPU path warns once and runs eagerly."""
    def unavailable(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", unavailable)
    monkeypatch.setattr(_dispatch, "COMPILE_AFTER_S", 0.0)  # compile at the first call
    gen = torch.Generator().manual_seed(10)
    words = torch.randint(-2**31, 2**31 - 1, (3, 2), dtype=torch.int32, generator=gen)
    unpack = _dispatch.compiled_on_cpu(bf._unpack_signs)
    with pytest.warns(RuntimeWarning, match="_unpack_signs runs eagerly: torch.compile failed"):
        first = unpack(words)
    assert torch.equal(first, bf._unpack_signs(words))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(unpack(words), first)


@pytest.mark.parametrize("budget,compiles", [(float("inf"), 0), (0.0, 1)])
def test_sign_makers_compile_only_after_their_eager_budget(monkeypatch, budget, compiles):
    """A short run never waits for torch.compile: the sign makers run eagerly until they have
    taken COMPILE_AFTER_S seconds, then compile once; the results are the same either way."""
    made = []

    def recording_compile(fn, **kwargs):
        made.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setattr(_dispatch, "COMPILE_AFTER_S", budget)
    seeded = _dispatch.compiled_on_cpu(bf._seeded_signs)
    key, rows, cols = torch.tensor(7), torch.arange(3), torch.arange(40)
    for _ in range(3):
        assert torch.equal(seeded(key, rows, cols), bf._seeded_signs(key, rows, cols))
    assert len(made) == compiles


@pytest.mark.parametrize("kind", ["packed", "seeded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_the_dense_projection(monkeypatch, kind, dtype):
    """d e = scale (grad * mask) S^T and d mask = grad * scale (e S), against autograd through the
    dense product; several blocks of S (a small block size) so the block loop is covered."""
    monkeypatch.setattr(bf, "_CHUNK_ELEMENTS", 64)
    gen = torch.Generator().manual_seed(12)
    feedback, signs = make_feedback(kind, 37, 100, gen)
    e = torch.randn(6, 37, generator=gen).to(dtype).requires_grad_()
    mask = torch.rand(6, 100, generator=gen).requires_grad_()
    weights = torch.randn(6, 100, generator=gen)
    (binary_feedback_project(e, feedback, 0.5, mask, out_dtype=torch.float32) * weights).sum().backward()
    e_ref, mask_ref = e.detach().float().requires_grad_(), mask.detach().clone().requires_grad_()
    ((0.5 * (e_ref @ signs.float()) * mask_ref) * weights).sum().backward()
    assert e.grad.dtype == dtype and mask.grad.dtype == torch.float32
    assert_rel_close(e.grad.float(), e_ref.grad.to(dtype).float(), RTOL[dtype], "d e")
    assert_rel_close(mask.grad, mask_ref.grad, 1e-5, "d mask")
    e.grad = None
    binary_feedback_project(e, feedback, 0.5).sum().backward()  # without a mask
    assert_rel_close(e.grad.float(), (0.5 * signs.float().sum(1)).expand(6, 37).to(dtype).float(), RTOL[dtype])


def test_opcheck_with_gradients():
    gen = torch.Generator().manual_seed(13)
    packed = pack_signs(random_signs(10, 40, gen))
    e = torch.randn(6, 10, generator=gen, requires_grad=True)
    mask = torch.rand(6, 40, generator=gen, requires_grad=True)
    project = torch.ops.bpfree.binary_feedback_project.default
    torch.library.opcheck(project, (e, packed.words, mask, 0, 0, 10, 40, 0.5, torch.float32))
    torch.library.opcheck(project, (e, None, None, 3, 1, 10, 40, 0.5, torch.float32))


def test_empty_batch():
    feedback = SeededSigns(0, 10, 33)
    assert binary_feedback_project(torch.empty(0, 10), feedback).shape == (0, 33)
    assert project_labels(torch.empty(0, dtype=torch.int64), feedback).shape == (0, 33)


# ---------------------------------------------------------------- storage forms


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.float32, torch.bfloat16])
def test_pack_unpack_round_trip(dtype):
    gen = torch.Generator().manual_seed(5)
    for c, d in ((1, 1), (3, 31), (4, 32), (5, 33), (2, 100)):
        signs = random_signs(c, d, gen)
        packed = pack_signs(signs.to(dtype))
        assert (packed.num_classes, packed.dim) == (c, d)
        assert packed.words.dtype == torch.int32 and packed.words.shape == (c, math.ceil(d / 32))
        assert packed.nbytes == 4 * c * math.ceil(d / 32)
        out = packed.materialize()
        assert out.dtype == torch.int8 and torch.equal(out, signs)
        assert torch.equal(packed.to("cpu").materialize(), signs)
    all_minus = pack_signs(-torch.ones(2, 64))
    assert (all_minus.words == -1).all()  # bit 31 set: the int32 words wrap correctly


def test_packed_is_32x_smaller_than_float32():
    signs = -torch.ones(10, 4096, dtype=torch.int8)
    assert signs.float().nbytes // pack_signs(signs).nbytes == 32


def test_seeded_determinism_and_balance():
    a = SeededSigns(7, 10, 1000)
    assert a.nbytes == 0
    s = a.materialize()
    assert s.dtype == torch.int8 and s.shape == (10, 1000)
    assert torch.equal(s, SeededSigns(7, 10, 1000).materialize())
    assert torch.equal(s, a.materialize(torch.device("cpu")))
    for other in (SeededSigns(8, 10, 1000), SeededSigns(7, 10, 1000, stream=1)):
        agree = (other.materialize() == s).float().mean().item()
        assert 0.45 < agree < 0.55  # independent signs agree about half the time
    assert abs((s == 1).float().mean().item() - 0.5) < 0.02
    assert a.to("cpu") is a


@pytest.mark.parametrize("kind", ["packed", "seeded"])
def test_identity_projection_gives_the_sign_rows(kind):
    """Projecting e = I_C reads back exactly the matrix the kernel uses, for keys below and above 2**31."""
    gen = torch.Generator().manual_seed(6)
    seeds = (0, 1, 5, 6, 2**32 - 1)
    assert {stream_key(s, 5) >= 2**31 for s in seeds} == {False, True}
    for seed in seeds:
        feedback = SeededSigns(seed, 37, 70, stream=5) if kind == "seeded" else pack_signs(random_signs(37, 70, gen))
        out = binary_feedback_project(torch.eye(37), feedback)
        assert torch.equal(out, feedback.materialize().float())


# ---------------------------------------------------------------- project_labels


@pytest.mark.parametrize("kind", ["packed", "seeded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_project_labels_equals_one_hot_projection(kind, dtype):
    gen = torch.Generator().manual_seed(7)
    for n, c, d in ((1, 1, 1), (7, 10, 33), (70, 37, 257)):
        feedback, signs = make_feedback(kind, c, d, gen)
        labels = torch.randint(0, c, (n,), generator=gen)
        out = project_labels(labels, feedback, 0.25, dtype=dtype)
        assert out.dtype == dtype and out.shape == (n, d)
        one_hot = torch.nn.functional.one_hot(labels, c).to(dtype)
        assert torch.equal(out, binary_feedback_project(one_hot, feedback, 0.25))
        assert torch.equal(out.float(), 0.25 * signs[labels].float())
        assert torch.equal(project_labels(labels.int(), feedback, 0.25, dtype=dtype), out)


# ---------------------------------------------------------------- torch.library / torch.compile


def test_opcheck():
    gen = torch.Generator().manual_seed(8)
    packed = pack_signs(random_signs(10, 40, gen))
    e, mask = torch.randn(6, 10, generator=gen), torch.rand(6, 40, generator=gen)
    project, labels = torch.ops.bpfree.binary_feedback_project.default, torch.ops.bpfree.project_labels.default
    torch.library.opcheck(project, (e, packed.words, mask, 0, 0, 10, 40, 0.5, torch.float32))
    torch.library.opcheck(project, (e, None, None, 3, 1, 10, 40, 0.5, torch.bfloat16))
    torch.library.opcheck(labels, (torch.tensor([1, 2, 9]), None, 3, 1, 10, 40, 0.5, torch.float16))


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(9)
    packed = pack_signs(random_signs(10, 40, gen))
    seeded = SeededSigns(5, 10, 40, stream=2)

    def signals(e, mask):
        return binary_feedback_project(e * 2, packed, 0.5, mask) + project_labels(e.argmax(1), seeded, 0.1)

    compiled = torch.compile(signals, fullgraph=True, backend="aot_eager")
    for n in (6, 9):  # the second size recompiles with a dynamic batch
        e, mask = torch.randn(n, 10, generator=gen), torch.rand(n, 40, generator=gen)
        assert torch.equal(compiled(e, mask), signals(e, mask))


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors():
    feedback = SeededSigns(0, 10, 33)
    e = torch.randn(4, 10)
    with pytest.raises(ValueError, match="e has 9 columns but feedback has num_classes=10"):
        binary_feedback_project(torch.randn(4, 9), feedback)
    with pytest.raises(TypeError, match="e has dtype torch.float64"):
        binary_feedback_project(e.double(), feedback)
    with pytest.raises(ValueError, match="e must have 2 dimensions"):
        binary_feedback_project(torch.randn(10), feedback)
    with pytest.raises(ValueError, match="e must be contiguous"):
        binary_feedback_project(torch.randn(10, 4).t(), feedback)
    with pytest.raises(ValueError, match=r"grad_mask must have shape \(4, 33\)"):
        binary_feedback_project(e, feedback, grad_mask=torch.rand(4, 32))
    with pytest.raises(TypeError, match="grad_mask has dtype torch.int32"):
        binary_feedback_project(e, feedback, grad_mask=torch.ones(4, 33, dtype=torch.int32))
    with pytest.raises(ValueError, match="grad_mask must be contiguous"):
        binary_feedback_project(e, feedback, grad_mask=torch.rand(33, 4).t())
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        binary_feedback_project(e, feedback, out_dtype=torch.int8)
    with pytest.raises(TypeError, match="scale must be a Python number"):
        binary_feedback_project(e, feedback, scale=torch.tensor(1.0))
    with pytest.raises(TypeError, match="feedback must be PackedSigns or SeededSigns"):
        binary_feedback_project(e, torch.ones(10, 33))
    meta_words = torch.empty(10, 2, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="words is on the meta device"):
        binary_feedback_project(e, PackedSigns(meta_words, 10, 33))
    with pytest.raises(ValueError, match="grad_mask is on the meta device"):
        binary_feedback_project(e, feedback, grad_mask=torch.empty(4, 33, device="meta"))

    with pytest.raises(ValueError, match="num_classes must be in"):
        SeededSigns(0, 0, 33)
    with pytest.raises(ValueError, match="dim must be in"):
        SeededSigns(0, 10, 0)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\)"):
        SeededSigns(-1, 10, 33)
    with pytest.raises(ValueError, match="stream must be an int"):
        SeededSigns(0, 10, 33, stream=2**32)
    with pytest.raises(ValueError, match="every entry of signs must be"):
        pack_signs(torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="every entry of signs must be"):
        pack_signs(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError, match="signs must be a real integer or float"):
        pack_signs(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="dim must be in"):
        pack_signs(torch.ones(2, 0))
    with pytest.raises(ValueError, match=r"words must have shape \(10, 2\)"):
        PackedSigns(torch.zeros(10, 1, dtype=torch.int32), 10, 33)
    with pytest.raises(TypeError, match="words has dtype torch.int64"):
        PackedSigns(torch.zeros(10, 2, dtype=torch.int64), 10, 33)

    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\), got values in \[0, 10\]"):
        project_labels(torch.tensor([0, 10]), feedback)
    with pytest.raises(ValueError, match="labels must be in"):
        project_labels(torch.tensor([-1, 3]), feedback)
    with pytest.raises(TypeError, match="labels has dtype torch.float32"):
        project_labels(torch.tensor([0.0]), feedback)
    with pytest.raises(TypeError, match="dtype must be one of"):
        project_labels(torch.tensor([0]), feedback, dtype=torch.int32)
