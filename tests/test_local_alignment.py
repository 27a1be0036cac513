"""Fused local-alignment update (kernels/local_alignment.py) against the equations written out here.

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


def dphi(x, act):
    if act == "relu":
        return (x > 0).double()
    if act == "tanh":
        return 1 - torch.tanh(x) ** 2
    if act == "sigmoid":
        return torch.sigmoid(x) * (1 - torch.sigmoid(x))
    return torch.ones_like(x)


def expected_signal(kind, u, P, a, z, beta, alpha, act, scale):
    """float64: (signal, d, y, z - y)."""
    u, P, a = u.double(), P.double(), a.double()
    p = scale * (u @ P)
    if kind == "dfa":
        return p * dphi(a, act), None, None, None
    if kind == "drtp":
        return -p * dphi(a, act), None, None, None
    y = phi(a - beta * p, act)
    zz = phi(a, act) if z is None else z.double()
    diff = zz - y
    return alpha * diff + (1 - alpha) * torch.sign(diff), p, y, diff


def expected_update(kind, u, P, a, z, zp, beta, alpha, act, scale, max_norm):
    g = expected_signal(kind, u, P, a, z, beta, alpha, act, scale)[0]
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
    # kind, act, N, C_up, D, alpha, beta, scale, pass z
    ("dfa", "relu", 1, 1, 1, 1.0, 0.1, 1.0, False),
    ("dfa", "tanh", 5, 10, 17, 1.0, 0.1, 0.5, False),
    ("dfa", "sigmoid", 33, 37, 130, 1.0, 0.1, 2.0, False),
    ("dfa", "identity", 33, 10, 65, 1.0, 0.1, 1.0, False),
    ("drtp", "relu", 33, 10, 130, 1.0, 0.1, 1.0, False),
    ("drtp", "tanh", 5, 37, 65, 1.0, 0.1, 0.3, False),
    ("drtp", "sigmoid", 1, 10, 17, 1.0, 0.1, 1.0, False),
    ("drtp", "identity", 5, 1, 1, 1.0, 0.1, 1.0, False),
    ("lra", "tanh", 5, 10, 17, 1.0, 0.1, 1.0, True),
    ("lra", "tanh", 33, 37, 130, 0.19, 0.12, 1.0, True),
    ("lra", "relu", 33, 10, 65, 0.0, 0.1, 1.0, True),
    ("lra", "sigmoid", 1, 1, 130, 0.19, 0.5, 1.5, False),
    ("lra", "identity", 5, 37, 1, 0.24, 0.1, 1.0, True),
    ("lra", "relu", 33, 1, 17, 1.0, 1.0, 1.0, False),
]


@pytest.mark.parametrize("kind,act,n,c,d,alpha,beta,scale,with_z", SIGNAL_CASES)
def test_signal_matches_equations(kind, act, n, c, d, alpha, beta, scale, with_z):
    u, P, a, z, _ = make(n, c, d, act=act, seed=n + c + d)
    if kind == "drtp":
        u = torch.softmax(u, dim=1) if c > 1 else torch.ones(n, 1)  # soft labels
    zarg = z if with_z else None
    want, d_want, y_want, diff = expected_signal(kind, u, P, a, zarg, beta, alpha, act, scale)
    out = la.local_signal(kind, u, P, a, zarg, beta=beta, alpha=alpha, activation=act, scale=scale,
                          diagnostics=kind == "lra")
    if kind == "lra":
        assert_rel_close(out.e, want, RTOL, "e", ignore=near_sign_flip(diff, alpha))
        assert_rel_close(out.d, d_want, RTOL, "d")
        assert_rel_close(out.y, y_want, RTOL, "y")
        plain = la.local_signal(kind, u, P, a, zarg, beta=beta, alpha=alpha, activation=act, scale=scale)
        assert plain.d is None and plain.y is None
        assert torch.equal(plain.e, out.e)
    else:
        assert_rel_close(out, want, RTOL, kind)
    ref = la.local_signal_reference(kind, u, P, a, zarg, beta=beta, alpha=alpha, activation=act, scale=scale)
    assert_rel_close(ref.e if kind == "lra" else ref, want, RTOL, "reference", ignore=near_sign_flip(diff, alpha))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kernels(dtype):
    """16-bit inputs: the dots take them as they are (bfloat16 as float32 under the interpreter)."""
    u, P, a, z, zp = (t.to(dtype) for t in make(33, 37, 130, 65))
    want = expected_signal("dfa", u, P, a, None, 0.1, 1.0, "tanh", 1.0)[0]
    got = la.local_signal("dfa", u, P, a, activation="tanh")
    assert got.dtype == dtype
    assert_rel_close(got, want, 1e-2, "16-bit signal")
    want_dw = expected_update("dfa", u, P, a, None, zp, 0.1, 1.0, "tanh", 1.0, None)[0]
    assert_rel_close(la.local_weight_update("dfa", u, P, a, None, zp, activation="tanh").dw, want_dw, 1e-2, "16-bit dW")


def test_drtp_one_hot_labels():
    u, P, a, _, _ = make(33, 10, 65, act="relu")
    y_star = torch.nn.functional.one_hot(torch.arange(33) % 10, 10).float()
    got = la.local_signal("drtp", y_star, P, a)
    assert_rel_close(got, -(P.double()[torch.arange(33) % 10]) * (a > 0).double(), RTOL, "drtp one-hot")


def test_every_signal_element_written():
    u, P, a, z, _ = make(33, 37, 130)
    g, d, y = (torch.full_like(a, float("nan")) for _ in range(3))
    la._launch_signal("lra", u, P, a, z, g, d, y, beta=0.1, alpha=0.19, activation="tanh", scale=1.0)
    assert all(torch.isfinite(t).all() for t in (g, d, y))


# ---- the weight update ---------------------------------------------------------------------------

UPDATE_CASES = [
    # kind, act, N, C_up, D, D_prev, alpha, fuse_signal
    ("dfa", "relu", 1, 1, 1, 1, 1.0, None),
    ("dfa", "tanh", 33, 10, 130, 65, 1.0, None),
    ("dfa", "sigmoid", 5, 37, 17, 130, 1.0, False),
    ("drtp", "relu", 33, 10, 65, 17, 1.0, True),
    ("drtp", "identity", 5, 1, 130, 1, 1.0, None),
    ("lra", "tanh", 33, 37, 65, 130, 0.19, True),
    ("lra", "tanh", 5, 10, 17, 65, 1.0, False),
    ("lra", "relu", 33, 1, 130, 17, 0.0, None),
    ("lra", "sigmoid", 1, 37, 1, 130, 0.19, None),
]


@pytest.mark.parametrize("kind,act,n,c,d,dp,alpha,fuse", UPDATE_CASES)
def test_weight_update_and_norm(kind, act, n, c, d, dp, alpha, fuse):
    u, P, a, z, zp = make(n, c, d, dp, act=act, seed=7 * n + d)
    zarg = z if kind == "lra" else None
    want, norm, _ = expected_update(kind, u, P, a, zarg, zp, 0.1, alpha, act, 1.0, None)
    got = la.local_weight_update(kind, u, P, a, zarg, zp, alpha=alpha, activation=act, fuse_signal=fuse)
    assert_rel_close(got.dw, want, RTOL, "dW")
    assert abs(got.norm.item() - norm.item()) <= RTOL * norm.item() + 1e-7
    assert got.factor.item() == 1.0
    ref = la.local_weight_update_reference(kind, u, P, a, zarg, zp, alpha=alpha, activation=act)
    assert_rel_close(ref.dw, want, RTOL, "reference dW")


def test_every_weight_update_element_written():
    u, P, a, z, zp = make(33, 10, 130, 65)
    for fuse in (True, False):
        dw = torch.full((130, 65), float("nan"))
        la._launch_weight_update("lra", u, P, a, z, zp, beta=0.1, alpha=0.19, activation="tanh", scale=1.0,
                                 max_norm=0.5, fuse_signal=fuse, dw=dw, weight=None, lr=0.0)
        assert torch.isfinite(dw).all()


@pytest.mark.parametrize("kind", ["dfa", "lra"])
@pytest.mark.parametrize("where", ["below", "above"])
def test_norm_ball_projection(kind, where):
    u, P, a, z, zp = make(33, 10, 65, 17, seed=3)
    zarg = z if kind == "lra" else None
    _, norm, _ = expected_update(kind, u, P, a, zarg, zp, 0.1, 0.19, "tanh", 1.0, None)
    c = norm.item() * (2.0 if where == "below" else 0.25)
    want, _, factor = expected_update(kind, u, P, a, zarg, zp, 0.1, 0.19, "tanh", 1.0, c)
    got = la.local_weight_update(kind, u, P, a, zarg, zp, alpha=0.19, activation="tanh", max_norm=c)
    assert_rel_close(got.dw, want, RTOL, "projected dW")
    assert abs(got.norm.item() - norm.item()) <= RTOL * norm.item()
    if where == "below":
        assert got.factor.item() == 1.0
    else:
        assert abs(got.factor.item() - factor.item()) <= RTOL * factor.item()
        assert abs(got.dw.double().norm().item() - c) <= 1e-4 * c


@pytest.mark.parametrize("max_norm_scale", [None, 4.0, 0.25])
@pytest.mark.parametrize("fuse", [True, False])
def test_fused_sgd_step(max_norm_scale, fuse):
    u, P, a, z, zp = make(5, 37, 65, 130, seed=11)
    _, norm, _ = expected_update("lra", u, P, a, z, zp, 0.1, 0.19, "tanh", 1.0, None)
    c = None if max_norm_scale is None else norm.item() * max_norm_scale
    want, _, _ = expected_update("lra", u, P, a, z, zp, 0.1, 0.19, "tanh", 1.0, c)
    w0 = torch.randn(65, 130, generator=torch.Generator().manual_seed(1))
    w = w0.clone()
    lr = 0.05
    out = la.local_weight_update("lra", u, P, a, z, zp, alpha=0.19, activation="tanh", max_norm=c,
                                 weight=w, lr=lr, fuse_signal=fuse)
    assert out.dw is None
    assert abs(out.norm.item() - norm.item()) <= RTOL * norm.item()
    assert_rel_close(w - w0, -lr * want, RTOL, "step")
    w_ref = w0.clone()
    la.local_weight_update_reference("lra", u, P, a, z, zp, alpha=0.19, activation="tanh", max_norm=c,
                                     weight=w_ref, lr=lr)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)


def test_pytorch_path_and_dtype(monkeypatch):
    """CPU without the interpreter runs the PyTorch path; outputs keep the activation dtype."""
    monkeypatch.setattr(la, "use_triton", lambda t: False)
    u, P, a, z, zp = make(5, 10, 17, 65)
    want, _, _ = expected_update("dfa", u, P, a, None, zp, 0.1, 1.0, "tanh", 1.0, None)
    got = la.local_weight_update("dfa", u, P, a, None, zp, activation="tanh").dw
    assert_rel_close(got, want, RTOL, "torch path dW")
    ab, zb, zpb = a.bfloat16(), z.bfloat16(), zp.bfloat16()
    s = la.local_signal("lra", u, P, ab, zb, activation="tanh", diagnostics=True)
    assert s.e.dtype == s.d.dtype == s.y.dtype == torch.bfloat16
    up = la.local_weight_update("lra", u, P, ab, zb, zpb, activation="tanh", max_norm=1.0)
    assert up.dw.dtype == torch.bfloat16 and up.norm.dtype == torch.float32


# ---- torch.compile --------------------------------------------------------------------------------

def test_torch_compile_fullgraph():
    u, P, a, z, zp = make(5, 10, 17, 65)
    w_eager = torch.randn(17, 65)
    w_comp = w_eager.clone()

    def step(u, P, a, z, zp, w):
        e = la.local_signal("lra", u, P, a, z, activation="tanh", alpha=0.19, diagnostics=True)
        g = la.local_signal("dfa", u, P, a, activation="tanh")
        up = la.local_weight_update("lra", u, P, a, z, zp, activation="tanh", max_norm=1.0)
        st = la.local_weight_update("drtp", u, P, a, None, zp, activation="tanh", max_norm=1.0, weight=w, lr=0.1)
        return e.e * 2, e.y, g + 1, up.dw, up.norm, st.factor

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(u, P, a, z, zp, w_comp)
    want = step(u, P, a, z, zp, w_eager)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)
    torch.testing.assert_close(w_comp, w_eager)


# ---- bad inputs -----------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    u, P, a, z, zp = make(5, 10, 17, 65)
    sig = la.local_signal
    with pytest.raises(ValueError, match="unknown kind 'bp'"):
        sig("bp", u, P, a)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        sig("dfa", u, P, a, activation="gelu")
    with pytest.raises(ValueError, match="P must be C_up x D"):
        sig("dfa", u, P[:9], a)
    with pytest.raises(ValueError, match="a must be N x D"):
        sig("dfa", u, P, a[:, :16].contiguous())
    with pytest.raises(ValueError, match="2 dimensions"):
        sig("dfa", u[0], P, a)
    with pytest.raises(TypeError, match="dtype torch.float64"):
        sig("dfa", u.double(), P, a)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        sig("drtp", u.long(), P, a)
    with pytest.raises(ValueError, match="must be contiguous"):
        sig("dfa", u, P.t().contiguous().t(), a)
    with pytest.raises(ValueError, match="z is only used by kind='lra'"):
        sig("dfa", u, P, a, z)
    with pytest.raises(ValueError, match="z must have a's shape"):
        sig("lra", u, P, a, z[:4])
    with pytest.raises(ValueError, match="only defined for kind='lra'"):
        sig("dfa", u, P, a, diagnostics=True)
    with pytest.raises(ValueError, match="empty inputs"):
        sig("dfa", u[:0], P, a[:0])
    with pytest.raises(ValueError, match="is on the meta device"):
        sig("dfa", u, P.to("meta"), a)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        sig("dfa", u, P.tolist(), a)
    upd = la.local_weight_update
    with pytest.raises(ValueError, match="z_prev must be N x D_prev"):
        upd("dfa", u, P, a, None, zp[:4])
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        upd("dfa", u, P, a, None, zp, max_norm=0.0)
    with pytest.raises(ValueError, match="weight and lr together"):
        upd("dfa", u, P, a, None, zp, weight=torch.zeros(17, 65))
    with pytest.raises(ValueError, match="weight must be D x D_prev"):
        upd("dfa", u, P, a, None, zp, weight=torch.zeros(65, 17), lr=0.1)
    with pytest.raises(ValueError, match="unknown kind"):
        la.local_weight_update_reference("hebb", u, P, a, None, zp)
