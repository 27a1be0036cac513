"""The backprop pipeline baseline (torch.distributed.pipelining over gloo, two CPU processes) makes
exactly the update of one-process backprop on the full batch, for GPipe and 1F1B, with a plain
activation and with a (tensor, tensor) tuple carried across the cut; bad batches, templates that
do not match what the previous stage sends, and non-tensor states fail with a ValueError on
every rank instead of hanging.

One spawn of two processes runs every case (each process imports torch once); the parent compares
what they saved against the one-process reference computed here."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import assert_rel_close

N, M, CLASSES, STEPS, CUT = 16, 4, 4, 3, 2  # batch, micro-batches, classes, steps, first unit of stage 1
IN_SHAPE = (2, 3, 3)
CASES = [("mlp", "gpipe"), ("mlp", "1f1b"), ("skip", "gpipe"), ("skip", "1f1b")]


class SkipOpen(nn.Module):
    """h -> (relu(W h), h): the skip branch travels alongside the main output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.relu(self.lin(h)), h


class SkipClose(nn.Module):
    """(a, h) -> relu(W a + h)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a, h = state
        return torch.relu(self.lin(a) + h)


class CarriesANumber(nn.Module):
    """A unit whose state holds a plain int (what graph units may carry): not sendable."""

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, int]:
        return h, h.shape[1]


def make_units(kind: str) -> list[nn.Module]:
    """The model's units, seeded identically in every process. The cut is in front of unit CUT:
    "mlp" sends one tensor across it, "skip" a (tensor, tensor) tuple."""
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Flatten(), nn.Linear(18, 16), nn.ReLU())
    if kind == "mlp":
        return [stem, nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
                nn.Linear(16, CLASSES)]
    if kind == "skip":
        return [stem, SkipOpen(), SkipClose(), nn.Linear(16, CLASSES)]
    if kind == "number":
        return [stem, CarriesANumber(), nn.Identity(), nn.Linear(16, CLASSES)]
    raise ValueError(kind)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(N, *IN_SHAPE, generator=g), torch.randint(0, CLASSES, (N,), generator=g))
            for _ in range(STEPS)]


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.2, momentum=0.9)


def stage_template(kind: str, stage: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    b = N // M
    if stage == 0:
        return torch.zeros(b, *IN_SHAPE)
    return (torch.zeros(b, 16), torch.zeros(b, 16)) if kind == "skip" else torch.zeros(b, 16)


def named_params(units: list[nn.Module], first: int) -> dict[str, torch.Tensor]:
    return {f"{first + k}.{name}": p.detach().clone() for k, u in enumerate(units) for name, p in u.named_parameters()}


def expect_value_error(build, *needles: str) -> str:
    try:
        build()
    except ValueError as exc:
        for needle in needles:
            assert needle in str(exc), f"{needle!r} not in {exc}"
        return str(exc)
    raise AssertionError("no ValueError")


def worker(rank: int, port: int, out: str) -> None:
    from trainer.pipeline_bp import BackpropPipeline

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        def pipeline(kind: str, schedule: str, template=None) -> tuple[BackpropPipeline, list[nn.Module]]:
            units = make_units(kind)
            mine = units[:CUT] if rank == 0 else units[CUT:]
            bp = BackpropPipeline(mine, rank, 2, None, torch.device("cpu"), M, schedule, nn.CrossEntropyLoss(),
                                  stage_template(kind, rank) if template is None else template,
                                  contextlib.nullcontext)
            return bp, mine

        results: dict = {}
        for kind, schedule in CASES:
            bp, mine = pipeline(kind, schedule)
            optimizer = make_optimizer([p for u in mine for p in u.parameters()])
            steps = [bp.train_step(x, y, optimizer) for x, y in batches()]
            results[kind, schedule] = dict(
                params=named_params(mine, 0 if rank == 0 else CUT),
                losses=[s.loss for s in steps], logits=[s.logits for s in steps],
                bad_batch=expect_value_error(lambda: bp.train_step(torch.zeros(N + 2, *IN_SHAPE),
                                                                   torch.zeros(N + 2, dtype=torch.long), optimizer),
                                             f"batch {N + 2} is not a multiple of micro_batches {M}"))
        # Failures at construction reach both ranks (no rank is left waiting in a receive).
        wrong = torch.zeros(N // M, 15) if rank == 1 else None
        results["template"] = expect_value_error(lambda: pipeline("mlp", "gpipe", wrong),
                                                 "between unit 1", "and unit 2", "input_template")
        results["number"] = expect_value_error(lambda: pipeline("number", "1f1b"),
                                               "between unit 1 (CarriesANumber, stage 0) and unit 2", "int")
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("pipeline_bp")
    with pytest.MonkeyPatch.context() as mp_env:
        mp_env.setenv("OMP_NUM_THREADS", "1")
        context = mp.start_processes(worker, args=(free_port(), str(out)), nprocs=2, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + 120
        try:
            while not context.join(timeout=1):
                assert time.monotonic() < deadline, "the pipeline processes hung"
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def reference(kind: str) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """One process, the full batch, the mean loss."""
    units = make_units(kind)
    optimizer = make_optimizer([p for u in units for p in u.parameters()])
    losses, logits = [], []
    for x, y in batches():
        state = x
        for unit in units:
            state = unit(state)
        loss = nn.functional.cross_entropy(state, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        logits.append(state.detach())
    return named_params(units, 0), losses, logits


@pytest.mark.parametrize("kind,schedule", CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_pipeline_equals_one_process_backprop(ranks, kind, schedule):
    first, last = ranks[0][kind, schedule], ranks[1][kind, schedule]
    want_params, want_losses, want_logits = reference(kind)
    got_params = {**first["params"], **last["params"]}
    assert sorted(got_params) == sorted(want_params)
    initial = named_params(make_units(kind), 0)
    for name, want in want_params.items():
        assert (want - initial[name]).abs().max() > 1e-3, f"{name} did not train in the reference"
        assert_rel_close(got_params[name], want, 1e-5, name)
    for step in range(STEPS):
        assert last["losses"][step].shape == () and first["losses"][step].shape == ()
        assert_rel_close(last["losses"][step], want_losses[step], 1e-5, f"loss {step}")
        assert_rel_close(last["logits"][step], want_logits[step], 1e-5, f"logits {step}")
        assert last["logits"][step].shape == (N, CLASSES) and not last["logits"][step].requires_grad
        assert first["logits"][step].shape == (0, CLASSES)
        assert first["losses"][step].item() == 0.0


@pytest.mark.parametrize("kind,schedule", CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_bad_batch_size_is_a_value_error_on_every_stage(ranks, kind, schedule):
    for rank in ranks:
        assert "is not a multiple of micro_batches" in rank[kind, schedule]["bad_batch"]


def test_construction_errors_reach_every_stage(ranks):
    """A template that does not match what stage 0 sends, and a state carrying an int, are found
    at construction; both ranks raise (the test would hang, then fail, if one waited)."""
    for rank in ranks:
        assert "15" in rank["template"] and "16" in rank["template"]
        assert "CarriesANumber" in rank["number"]
