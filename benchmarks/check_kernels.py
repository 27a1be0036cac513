"""Every public kernel op on ``--device`` against its PyTorch reference on the same inputs, in float32.

Why: the kernel tests (tests/test_binary_feedback.py, test_local_alignment.py, test_trace_conv.py,
test_compact_batch_norm.py) build CPU tensors only, so they check the kernels under Triton's
interpreter, never compiled. On a GPU this script is that check for the compiled kernels: each op
in float32, bfloat16 and float16 at odd sizes (tiles cut at every edge), error = max |got - want| /
max |want| against a tolerance per dtype, every output finite. Exit status 1 if any check fails or
raises (each is recorded and the rest still run).

* ``binary_feedback_project`` / ``project_labels`` (packed and seeded signs, with and without the
  mask) against the float32 product with the materialised signs;
* ``local_signal`` / ``local_weight_update`` (LRA; norm ball, prologue fusion on and off) against
  ``local_signal_reference`` / ``local_weight_update_reference``
  (α = 1: with α < 1 the sign term flips wherever z - y rounds differently, in any summation order);
* ``TraceConv2d`` against ``nn.Conv2d``: output, input and bias gradients are exact; the weight
  gradient is an unbiased estimate, so it is checked against the same module's PyTorch path (its
  torch references, float32, on the CPU) with the same probe seed;
* ``CompactBatchNorm2d`` against ``nn.BatchNorm2d`` (output, gradients, running statistics).

PyTorch's own float32 matmuls and convolutions run without TF32 here, so the references are float32;
Triton's float32 ``tl.dot`` in the trace-conv kernels may use TF32: a looser tolerance there.
Under the interpreter the local-alignment ops skip bfloat16: Triton 3.8's interpreter computes
``tl.dot`` of bfloat16 operands wrongly (results of order 1e10 for a 16x16x16 product; float16 and
float32 agree), so only a GPU checks those kernels in bfloat16.

    TRITON_INTERPRET=0 python -m benchmarks.check_kernels --device cuda --out kernels.json
    TRITON_INTERPRET=1 python -m benchmarks.check_kernels --device cpu --quick     # the interpreter
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

if not __package__:  # run as a file (python benchmarks/check_kernels.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import environment, make_console, table, write_results
from kernels import (
    PROBES,
    CompactBatchNorm2d,
    SeededSigns,
    TraceConv2d,
    binary_feedback_project,
    local_signal,
    local_signal_reference,
    local_weight_update,
    local_weight_update_reference,
    pack_signs,
    project_labels,
)
from kernels._dispatch import triton_interpreting, use_triton
from kernels.local_alignment import fuse_signal_default, phi

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# max-norm relative error: 16-bit outputs round at 2^-8 (bf16) and 2^-11 (fp16) of each element
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
TF32_TOLERANCE = 1e-2  # Triton's float32 tl.dot (TF32: 10 mantissa bits)
FP16_XHAT_TOLERANCE = 2e-3  # CompactBatchNorm2d keeps xhat in float16 (about 5e-4 relative)

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]  # output name -> (got, want)


@dataclass
class Check:
    op: str
    case: str
    dtype: torch.dtype
    tolerance: float
    compute: Callable[[], Pairs]


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| in float64; infinite if got has a non-finite entry (unwritten)."""
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    want = want.to(got.device)
    if not torch.isfinite(got).all():
        return float("inf")
    if got.numel() == 0:
        return 0.0
    scale = max(want.double().abs().max().item(), 1e-30)
    return (got.double() - want.double()).abs().max().item() / scale


class Inputs:
    """Seeded random tensors made on the CPU (the same values on every device), then moved."""

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen) * scale).to(self.device, dtype)

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen).to(self.device, dtype)

    def randint(self, high: int, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=self.gen).to(self.device, dtype)


# ---- binary feedback ------------------------------------------------------------------------------


def binary_feedback_checks(device: torch.device, dtypes: list[torch.dtype], quick: bool) -> Iterator[Check]:
    sizes = [(37, 10, 257)] + ([] if quick else [(130, 37, 1000)])  # N spans N tiles, C chunks, D tiles
    for dtype in dtypes:
        for n, c, d in sizes:
            for kind in ("packed", "seeded"):
                yield from _binary_feedback_cases(device, dtype, n, c, d, kind)


def _binary_feedback_cases(device: torch.device, dtype: torch.dtype, n: int, c: int, d: int,
                           kind: str) -> Iterator[Check]:
    inputs = Inputs(device, seed=n + c + d)
    if kind == "packed":
        signs = (inputs.randint(2, c, d, dtype=torch.int8) * 2 - 1)
        feedback, dense = pack_signs(signs), signs.float()
    else:
        feedback = SeededSigns(7, c, d)
        dense = feedback.materialize(device).float()
    e = inputs.randn(n, c, dtype=dtype)
    mask = inputs.rand(n, d, dtype=dtype)
    labels = inputs.randint(c, n)
    tolerance = TOLERANCE[dtype]
    for masked in (False, True):
        def project(masked: bool = masked) -> Pairs:
            want = 0.5 * (e.float() @ dense)
            return {"g": (binary_feedback_project(e, feedback, 0.5, mask if masked else None),
                          want * mask.float() if masked else want)}
        yield Check("binary_feedback_project", f"{kind} {n}x{c}->{d}{' masked' if masked else ''}", dtype,
                    tolerance, project)
    yield Check("project_labels", f"{kind} {n} labels ->{d}", dtype, tolerance,
                lambda: {"t": (project_labels(labels, feedback, 0.5, dtype), 0.5 * dense[labels])})


# ---- local alignment ------------------------------------------------------------------------------

SIGNAL_CASES = [("tanh", 10), ("relu", 10), ("tanh", 67), ("relu", 67)]  # (activation, C_up)
ARGS = dict(beta=0.1, alpha=1.0, scale=1.3)


def _unit_inputs(inputs: Inputs, act: str, n: int, c_up: int, d: int, dtype: torch.dtype):
    upstream = inputs.randn(n, c_up, dtype=dtype, scale=0.3)
    P = inputs.randn(c_up, d, dtype=dtype, scale=c_up**-0.5)
    a = inputs.randn(n, d, dtype=dtype)
    return upstream, P, a, phi(a, act)


def _local_alignment_dtypes(device: torch.device, dtypes: list[torch.dtype]) -> list[torch.dtype]:
    """The interpreter's bfloat16 tl.dot is wrong (module docstring): bfloat16 only compiled."""
    if device.type == "cpu" and triton_interpreting():
        return [dtype for dtype in dtypes if dtype != torch.bfloat16]
    return dtypes


def local_signal_checks(device: torch.device, dtypes: list[torch.dtype], quick: bool) -> Iterator[Check]:
    n, d = 37, 131
    for dtype in _local_alignment_dtypes(device, dtypes):
        for act, c_up in SIGNAL_CASES:
            inputs = Inputs(device, seed=c_up + len(act))
            upstream, P, a, z = _unit_inputs(inputs, act, n, c_up, d, dtype)
            for given_z in (True, False):
                zz = z if given_z else None

                def signal(act=act, upstream=upstream, P=P, a=a, zz=zz) -> Pairs:
                    kw = dict(ARGS, activation=act, diagnostics=True)
                    got = local_signal("lra", upstream, P, a, zz, **kw)
                    want = local_signal_reference("lra", upstream, P, a, zz, **kw)
                    return {"e": (got.e, want.e), "d": (got.d, want.d), "y": (got.y, want.y)}
                yield Check("local_signal", f"lra {act} {n}x{c_up}->{d}{' z given' if given_z else ''}", dtype,
                            TOLERANCE[dtype], signal)


# (C_up: the prologue is fused at C_up <= 64, not above, with D_prev > 64; norm ball as a share of the norm)
UPDATE_VARIANTS = [(10, None), (67, None), (10, 0.5), (67, 0.5)]


def local_weight_update_checks(device: torch.device, dtypes: list[torch.dtype], quick: bool) -> Iterator[Check]:
    n, d, d_prev = 37, 131, 67
    for dtype in _local_alignment_dtypes(device, dtypes):
        for c_up, ball in UPDATE_VARIANTS[:2] if quick else UPDATE_VARIANTS:
            inputs = Inputs(device, seed=c_up)
            upstream, P, a, z = _unit_inputs(inputs, "tanh", n, c_up, d, dtype)
            z_prev = inputs.randn(n, d_prev, dtype=dtype)

            def update(upstream=upstream, P=P, a=a, z=z, z_prev=z_prev, ball=ball) -> Pairs:
                kw = dict(ARGS, activation="tanh")
                if ball is not None:  # a ball that binds: a share of the update's norm
                    kw["max_norm"] = ball * local_weight_update_reference("lra", upstream, P, a, z, z_prev,
                                                                           **kw).norm.item()
                got = local_weight_update("lra", upstream, P, a, z, z_prev, **kw)
                want = local_weight_update_reference("lra", upstream, P, a, z, z_prev, **kw)
                return {"dw": (got.dw, want.dw), "norm": (got.norm, want.norm), "factor": (got.factor, want.factor)}
            what = f"dW lra {n}x{c_up}->{d}x{d_prev}{' +ball' if ball else ''}"
            what += f", prologue {'on' if fuse_signal_default(c_up, d_prev) else 'off'}"
            yield Check("local_weight_update", what, dtype, TOLERANCE[dtype], update)


# ---- trace conv -----------------------------------------------------------------------------------

# (C_in, C_out, kernel, stride, padding, dilation, groups, (H, W), bias)
CONV_CONFIGS = [
    (5, 7, 3, 2, 1, 1, 1, (13, 11), True),
    (6, 12, 3, 1, 2, 2, 3, (9, 9), False),  # grouped, dilated
    (8, 16, 1, 2, 0, 1, 1, (7, 7), False),  # 1x1 stride-2 (ResNet downsample)
]


def trace_conv_checks(device: torch.device, dtypes: list[torch.dtype], quick: bool) -> Iterator[Check]:
    configs = CONV_CONFIGS[:1] if quick else CONV_CONFIGS
    for dtype in dtypes:
        for cfg in configs:
            yield Check("TraceConv2d", f"exact parts vs nn.Conv2d {_conv_name(cfg)}", dtype, TOLERANCE[dtype],
                        lambda cfg=cfg, dtype=dtype: _trace_conv_exact(device, dtype, cfg))
        if not use_triton(torch.empty(0, device=device)):
            continue  # the PyTorch path of the weight gradient is the reference itself
        for probe in PROBES:
            for probes in (5,) if quick else (5, 70):
                for cfg in configs:
                    yield Check("TraceConv2d weight grad", f"{probe} r={probes} {_conv_name(cfg)}", dtype,
                                max(TOLERANCE[dtype], TF32_TOLERANCE),
                                lambda cfg=cfg, dtype=dtype, probe=probe, probes=probes:
                                _trace_conv_weight_grad(device, dtype, cfg, probe, probes))


def _conv_name(cfg) -> str:
    c_in, c_out, k, s, p, d, g, (h, w), _ = cfg
    return f"{c_in}->{c_out} k{k} s{s} p{p} d{d} g{g} {h}x{w}"


def _trace_conv_pair(cfg, device: torch.device, dtype: torch.dtype, probes: int = 5, probe: str = "gaussian",
                     reference: type[nn.Conv2d] = nn.Conv2d) -> tuple[TraceConv2d, nn.Conv2d]:
    """A TraceConv2d in ``dtype`` on ``device`` and a float32 ``reference`` with the same weights."""
    c_in, c_out, k, s, p, d, g, _, bias = cfg
    kw = dict(stride=s, padding=p, dilation=d, groups=g, bias=bias)
    module = TraceConv2d(c_in, c_out, k, probes=probes, probe=probe, **kw).to(device, dtype).train()
    extra = dict(probes=probes, probe=probe) if reference is TraceConv2d else {}
    twin = reference(c_in, c_out, k, **kw, **extra).train()
    twin.load_state_dict({key: value.float().cpu() for key, value in module.state_dict().items()})
    return module, twin


def _trace_conv_exact(device: torch.device, dtype: torch.dtype, cfg) -> Pairs:
    """Output, input and bias gradients: exact, so against nn.Conv2d in float32 on the same device."""
    module, reference = _trace_conv_pair(cfg, device, dtype)
    reference.to(device)
    inputs = Inputs(device, seed=cfg[0] * cfg[1])
    x = inputs.randn(3, cfg[0], *cfg[7], dtype=dtype).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    y, y32 = module(x), reference(x32)
    dy = inputs.randn(*y32.shape)
    y.backward(dy.to(dtype))
    y32.backward(dy)
    pairs = {"output": (y, y32), "input grad": (x.grad, x32.grad)}
    if module.bias is not None:
        pairs["bias grad"] = (module.bias.grad, reference.bias.grad)
    return pairs


@contextmanager
def pytorch_path() -> Iterator[None]:
    """CPU tensors take the ops' PyTorch references inside this block, even under the interpreter
    (``kernels._dispatch.use_triton`` reads TRITON_INTERPRET at each call)."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def _trace_conv_weight_grad(device: torch.device, dtype: torch.dtype, cfg, probe: str, probes: int) -> Pairs:
    """The estimated weight gradient (the kernels) against the same module's PyTorch path on the
    CPU in float32, with the same probe seed (drawn from torch's CPU generator at each forward)."""
    module, reference = _trace_conv_pair(cfg, device, dtype, probes, probe, reference=TraceConv2d)
    inputs = Inputs(device, seed=probes + cfg[0])
    x = inputs.randn(3, cfg[0], *cfg[7], dtype=dtype)
    torch.manual_seed(probes)
    y = module(x)
    dy = inputs.randn(*y.shape)
    y.backward(dy.to(dtype))
    with pytorch_path():
        torch.manual_seed(probes)
        reference(x.float().cpu()).backward(dy.cpu())
    return {"weight grad": (module.weight.grad, reference.weight.grad)}


# ---- compact batch norm ---------------------------------------------------------------------------


def batch_norm_checks(device: torch.device, dtypes: list[torch.dtype], quick: bool) -> Iterator[Check]:
    shapes = [(6, 5, 7, 9)] + ([] if quick else [(4, 16, 8, 8)])
    for dtype in dtypes:
        for shape in shapes:
            yield Check("CompactBatchNorm2d", f"vs nn.BatchNorm2d {'x'.join(map(str, shape))}", dtype,
                        max(TOLERANCE[dtype], FP16_XHAT_TOLERANCE),
                        lambda shape=shape, dtype=dtype: _batch_norm(device, dtype, shape))


def _batch_norm(device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> Pairs:
    inputs = Inputs(device, seed=sum(shape))
    reference = nn.BatchNorm2d(shape[1]).to(device).train()
    with torch.no_grad():
        reference.weight.copy_(inputs.randn(shape[1]))
        reference.bias.copy_(inputs.randn(shape[1]))
    compact = CompactBatchNorm2d.from_batch_norm(copy.deepcopy(reference))
    x = inputs.randn(*shape, dtype=dtype, scale=3.0).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    y, y32 = compact(x), reference(x32)
    dy = inputs.randn(*shape)
    y.backward(dy.to(dtype))
    y32.backward(dy)
    return {"output": (y, y32), "input grad": (x.grad, x32.grad), "weight grad": (compact.weight.grad, reference.weight.grad),
            "bias grad": (compact.bias.grad, reference.bias.grad),
            "running mean": (compact.running_mean, reference.running_mean),
            "running var": (compact.running_var, reference.running_var)}


# ---- running them ---------------------------------------------------------------------------------

SUITES = {"binary_feedback": binary_feedback_checks, "local_signal": local_signal_checks,
          "local_weight_update": local_weight_update_checks, "trace_conv": trace_conv_checks,
          "batch_norm": batch_norm_checks}


def run(check: Check) -> dict:
    """The check's row: worst error over its outputs, or the exception that stopped it."""
    row = {"op": check.op, "case": check.case, "dtype": str(check.dtype).removeprefix("torch."),
           "tolerance": check.tolerance}
    try:
        errors = {name: max_rel_error(got.detach(), want.detach()) for name, (got, want) in check.compute().items()}
    except Exception as err:  # noqa: BLE001 - a kernel that fails to compile or launch is a result
        return {**row, "error": float("inf"), "ok": False,
                "exception": "".join(traceback.format_exception_only(type(err), err)).strip()[-2000:]}
    worst = max(errors.values())
    return {**row, "error": worst, "ok": worst <= check.tolerance, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one size per op (for the CPU interpreter)")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated")
    parser.add_argument("--suites", default=",".join(SUITES),
                        help="comma-separated (separate processes compile them in parallel)")
    parser.add_argument("--out", type=Path, help="write every check here (.json, or .csv)")
    args = parser.parse_args(argv)
    console = make_console(140)
    device = torch.device(args.device)
    if device.type == "cuda" and triton_interpreting():
        console.print("[red]TRITON_INTERPRET=1 with --device cuda would check the interpreter, not the compiled "
                      "kernels: run with TRITON_INTERPRET=0[/red]")
        return 2
    path = ("compiled Triton kernels" if device.type == "cuda"
            else "Triton interpreter" if use_triton(torch.empty(1, device=device)) else "the ops' PyTorch paths")
    console.print(f"check_kernels on {device} ({path})")
    dtypes = [DTYPES[name.strip()] for name in args.dtypes.split(",")]
    skipped = []
    if torch.bfloat16 in dtypes and _local_alignment_dtypes(device, dtypes) != dtypes:
        skipped.append("local_signal and local_weight_update in bfloat16: the interpreter's bfloat16 tl.dot is wrong")
        console.print(f"[yellow]skipped: {skipped[-1]}[/yellow]")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    suites = [SUITES[name.strip()] for name in args.suites.split(",")]
    rows = [run(check) for suite in suites for check in suite(device, dtypes, args.quick)]

    summary = table(f"kernel ops on {device} ({path}) against their float32 references",
                    ["op", "dtype", "checks", "failed", "worst error", "tolerance"])
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["op"], row["dtype"]), []).append(row)
    for (op, dtype), group in groups.items():
        failed = sum(not r["ok"] for r in group)
        worst = max(r["error"] for r in group)
        summary.add_row(op, dtype, str(len(group)), f"[red]{failed}[/red]" if failed else "0", f"{worst:.1e}",
                        f"{max(r['tolerance'] for r in group):.0e}")
    console.print(summary)
    failures = [r for r in rows if not r["ok"]]
    for r in failures:
        console.print(f"[red]FAILED[/red] {r['op']} {r['case']} {r['dtype']}: "
                      f"{r.get('exception') or r['errors']} (tolerance {r['tolerance']:g})")
    headline = {"checks": len(rows), "failed": len(failures),
                "worst_error_over_tolerance": max(r["error"] / r["tolerance"] for r in rows)}
    write_results(args.out, {**environment(device), "path": path, "skipped": skipped}, {"checks": rows}, headline,
                  console)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
