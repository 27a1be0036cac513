"""Fused LRA signal and weight update (kernels/local_alignment.py) against the equations written out here.

The Triton kernels run under the interpreter (``tests/conftest.py`` sets TRITON_INTERPRET=1), in
float32. Run: ``python -m pytest tests/test_local_alignment.py``.
"""

import pytest
import torch

import kernels
import kernels.local_alignment as la
from kernels._dispatch import use_triton

from conftest import assert_rel_close

RTOL = 2e-5


# ---- the equations, written independently of the module under test --------------------------------

def phi(x, act):
    return {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda t: t}[act](x)


def expected_signal(u, P, a, z, beta, alpha, act, scale):
    """float64: (error units e, d, y, z - y)."""
    u, P, a = u.double(), P.double(), a.double()
    p = scale * (u @ P)
    y = phi(a - beta * p, act)
    zz = phi(a, act) if z is None else z.double()
    diff = zz - y
    return alpha * diff + (1 - alpha) * torch.sign(diff), p, y, diff


def expected_update(u, P, a, z, zp, beta, alpha, act, scale, max_norm):
    g = expected_signal(u, P, a, z, beta, alpha, act, scale)[0]
    dw = g.T @ zp.double()
    norm = dw.norm()
    factor = (max_norm / norm) if (max_norm is not None and norm >= max_norm) else torch.tensor(1.0, dtype=torch.float64)
    return dw * factor, norm, factor


def make(n, c, d, dp=1, seed=0, act="tanh"):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, c, generator=g)
    P = torch.randn(c, d, generator=g) / c ** 0.5
    a = torch.randn(n, d, generator=g)
    z = phi(a, act).contiguous()
    zp = torch.randn(n, dp, generator=g)
    return u, P, a, z, zp


def near_sign_flip(diff, alpha):
    """Entries where sign(z - y) is ill-conditioned in float32 (only matters when alpha < 1)."""
    if diff is None or alpha == 1.0:
        return None
    return diff.abs() < 1e-5


def test_interpreter_runs_the_kernels():
    assert use_triton(torch.empty(1)), "TRITON_INTERPRET=1 must be set before triton is imported"


def test_exported_from_package():
    for name in ("local_signal", "local_weight_update", "local_signal_reference", "local_weight_update_reference"):
        assert getattr(kernels, name) is getattr(la, name)


# ---- the signal -------------------------------------------------------------------------------------

SIGNAL_CASES = [
    # act, N, C_up, D, alpha, beta, scale, pass z
    ("relu", 1, 1, 1, 1.0, 0.1, 1.0, False),
    ("identity", 33, 10, 65, 1.0, 0.1, 2.0, False),
    ("tanh", 5, 10, 17, 1.0, 0.1, 1.0, True),
    ("tanh", 33, 37, 130, 0.19, 0.12, 1.0, True),
    ("relu", 33, 10, 65, 0.0, 0.1, 1.0, True),
    ("sigmoid", 1, 1, 130, 0.19, 0.5, 1.5, False),
    ("identity", 5, 37, 1, 0.24, 0.1, 1.0, True),
    ("relu", 33, 1, 17, 1.0, 1.0, 1.0, False),
]


@pytest.mark.parametrize("act,n,c,d,alpha,beta,scale,with_z", SIGNAL_CASES)
def test_signal_matches_equations(act, n, c, d, alpha, beta, scale, with_z):
    u, P, a, z, _ = make(n, c, d, act=act, seed=n + c + d)
    zarg = z if with_z else None
    want, d_want, y_want, diff = expected_signal(u, P, a, zarg, beta, alpha, act, scale)
    out = la.local_signal("lra", u, P, a, zarg, beta=beta, alpha=alpha, activation=act, scale=scale,
                          diagnostics=True)
    assert_rel_close(out.e, want, RTOL, "e", ignore=near_sign_flip(diff, alpha))
    assert_rel_close(out.d, d_want, RTOL, "d")
    assert_rel_close(out.y, y_want, RTOL, "y")
    plain = la.local_signal("lra", u, P, a, zarg, beta=beta, alpha=alpha, activation=act, scale=scale)
    assert plain.d is None and plain.y is None
    assert torch.equal(plain.e, out.e)
    ref = la.local_signal_reference("lra", u, P, a, zarg, beta=beta, alpha=alpha, activation=act, scale=scale)
    assert_rel_close(ref.e, want, RTOL, "reference", ignore=near_sign_flip(diff, alpha))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kernels(dtype):
    """16-bit inputs: the dots take them as they are (bfloat16 as float32 under the interpreter)."""
    u, P, a, z, zp = (t.to(dtype) for t in make(33, 37, 130, 65))
    want = expected_signal(u, P, a, None, 0.1, 1.0, "tanh", 1.0)[0]
    got = la.local_signal("lra", u, P, a, activation="tanh").e
    assert got.dtype == dtype
    assert_rel_close(got, want, 1e-2, "16-bit signal")
    want_dw = expected_update(u, P, a, None, zp, 0.1, 1.0, "tanh", 1.0, None)[0]
    assert_rel_close(la.local_weight_update("lra", u, P, a, None, zp, activation="tanh").dw, want_dw, 1e-2, "16-bit dW")


def test_every_signal_element_written():
    u, P, a, z, _ = make(33, 37, 130)
    g, d, y = (torch.full_like(a, float("nan")) for _ in range(3))
    la._launch_signal(u, P, a, z, g, d, y, beta=0.1, alpha=0.19, activation="tanh", scale=1.0)
    assert all(torch.isfinite(t).all() for t in (g, d, y))


# ---- the weight update ---------------------------------------------------------------------------

UPDATE_CASES = [
    # act, N, C_up, D, D_prev, alpha, the signal made in the prologue (None: by size)
    ("relu", 1, 1, 1, 1, 1.0, None),
    ("identity", 5, 1, 130, 1, 1.0, None),
    ("sigmoid", 5, 37, 17, 130, 1.0, False),
    ("tanh", 33, 37, 65, 130, 0.19, True),
    ("tanh", 5, 10, 17, 65, 1.0, False),
    ("relu", 33, 1, 130, 17, 0.0, None),
    ("sigmoid", 1, 37, 1, 130, 0.19, None),
]


def fuse_signal(monkeypatch, fuse):
    """Force the prologue fusion on or off (None: the size rule), so small cases cover both paths."""
    if fuse is not None:
        monkeypatch.setattr(la, "fuse_signal_default", lambda c_up, d_prev: fuse)


@pytest.mark.parametrize("act,n,c,d,dp,alpha,fuse", UPDATE_CASES)
def test_weight_update_and_norm(monkeypatch, act, n, c, d, dp, alpha, fuse):
    fuse_signal(monkeypatch, fuse)
    u, P, a, z, zp = make(n, c, d, dp, act=act, seed=7 * n + d)
    want, norm, _ = expected_update(u, P, a, z, zp, 0.1, alpha, act, 1.0, None)
    got = la.local_weight_update("lra", u, P, a, z, zp, alpha=alpha, activation=act)
    assert_rel_close(got.dw, want, RTOL, "dW")
    assert abs(got.norm.item() - norm.item()) <= RTOL * norm.item() + 1e-7
    assert got.factor.item() == 1.0
    ref = la.local_weight_update_reference("lra", u, P, a, z, zp, alpha=alpha, activation=act)
    assert_rel_close(ref.dw, want, RTOL, "reference dW")


@pytest.mark.parametrize("fuse", [True, False])
def test_every_weight_update_element_written(monkeypatch, fuse):
    fuse_signal(monkeypatch, fuse)
    u, P, a, z, zp = make(33, 10, 130, 65)
    dw = torch.full((130, 65), float("nan"))
    la._launch_weight_update(u, P, a, z, zp, dw, beta=0.1, alpha=0.19, activation="tanh", scale=1.0, max_norm=0.5)
    assert torch.isfinite(dw).all()


@pytest.mark.parametrize("with_z", [True, False])
@pytest.mark.parametrize("where", ["below", "above"])
def test_norm_ball_projection(with_z, where):
    u, P, a, z, zp = make(33, 10, 65, 17, seed=3)
    zarg = z if with_z else None
    _, norm, _ = expected_update(u, P, a, zarg, zp, 0.1, 0.19, "tanh", 1.0, None)
    c = norm.item() * (2.0 if where == "below" else 0.25)
    want, _, factor = expected_update(u, P, a, zarg, zp, 0.1, 0.19, "tanh", 1.0, c)
    got = la.local_weight_update("lra", u, P, a, zarg, zp, alpha=0.19, activation="tanh", max_norm=c)
    assert_rel_close(got.dw, want, RTOL, "projected dW")
    assert abs(got.norm.item() - norm.item()) <= RTOL * norm.item()
    if where == "below":
        assert got.factor.item() == 1.0
    else:
        assert abs(got.factor.item() - factor.item()) <= RTOL * factor.item()
        assert abs(got.dw.double().norm().item() - c) <= 1e-4 * c


def test_pytorch_path_and_dtype(monkeypatch):
    """CPU without the interpreter runs the PyTorch path; outputs keep the activation dtype."""
    monkeypatch.setattr(la, "use_triton", lambda t: False)
    u, P, a, z, zp = make(5, 10, 17, 65)
    want, _, _ = expected_update(u, P, a, None, zp, 0.1, 1.0, "tanh", 1.0, None)
    got = la.local_weight_update("lra", u, P, a, None, zp, activation="tanh").dw
    assert_rel_close(got, want, RTOL, "torch path dW")
    ab, zb, zpb = a.bfloat16(), z.bfloat16(), zp.bfloat16()
    s = la.local_signal("lra", u, P, ab, zb, activation="tanh", diagnostics=True)
    assert s.e.dtype == s.d.dtype == s.y.dtype == torch.bfloat16
    up = la.local_weight_update("lra", u, P, ab, zb, zpb, activation="tanh", max_norm=1.0)
    assert up.dw.dtype == torch.bfloat16 and up.norm.dtype == torch.float32


# ---- torch.compile --------------------------------------------------------------------------------

def test_torch_compile_fullgraph():
    u, P, a, z, zp = make(5, 10, 17, 65)

    def step(u, P, a, z, zp):
        e = la.local_signal("lra", u, P, a, z, activation="tanh", alpha=0.19, diagnostics=True)
        g = la.local_signal("lra", u, P, a, activation="tanh")
        up = la.local_weight_update("lra", u, P, a, z, zp, activation="tanh", max_norm=1.0)
        return e.e * 2, e.y, g.e + 1, up.dw, up.norm, up.factor

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for x, y in zip(compiled(u, P, a, z, zp), step(u, P, a, z, zp)):
        torch.testing.assert_close(x, y)


# ---- bad inputs -----------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    u, P, a, z, zp = make(5, 10, 17, 65)
    sig = la.local_signal
    for kind in ("bp", "dfa", "drtp"):  # DFA's and DRTP's signals go through the projections of trainer.rules
        with pytest.raises(ValueError, match=f"unknown kind '{kind}'; expected one of lra"):
            sig(kind, u, P, a)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        sig("lra", u, P, a, activation="gelu")
    with pytest.raises(ValueError, match="P must be C_up x D"):
        sig("lra", u, P[:9], a)
    with pytest.raises(ValueError, match="a must be N x D"):
        sig("lra", u, P, a[:, :16].contiguous())
    with pytest.raises(ValueError, match="2 dimensions"):
        sig("lra", u[0], P, a)
    with pytest.raises(TypeError, match="dtype torch.float64"):
        sig("lra", u.double(), P, a)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        sig("lra", u.long(), P, a)
    with pytest.raises(ValueError, match="must be contiguous"):
        sig("lra", u, P.t().contiguous().t(), a)
    with pytest.raises(ValueError, match="z must have a's shape"):
        sig("lra", u, P, a, z[:4])
    with pytest.raises(ValueError, match="empty inputs"):
        sig("lra", u[:0], P, a[:0])
    with pytest.raises(ValueError, match="is on the meta device"):
        sig("lra", u, P.to("meta"), a)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        sig("lra", u, P.tolist(), a)
    upd = la.local_weight_update
    with pytest.raises(ValueError, match="z_prev must be N x D_prev"):
        upd("lra", u, P, a, None, zp[:4])
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        upd("lra", u, P, a, None, zp, max_norm=0.0)
    with pytest.raises(ValueError, match="unknown kind"):
        la.local_weight_update_reference("hebb", u, P, a, None, zp)
