"""Unit-parallel training (``trainer.pipeline``): stages in torchrun processes (gloo, one thread
each) train exactly like one process: forward-only rules like one process with batch =
micro-batch, DFA and LRA like one process on the whole batch, BP (torch.distributed.pipelining)
like one process with gradient accumulation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_recipe
from trainer.cli import main
from trainer.config import ConfigError
from trainer.pipeline import balanced_stages, named_stages

MLP = {"name": "mlp", "hidden": [24, 16]}  # three BatchNorm-free units


def torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "trainer", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def assert_same_model(got: Path, want: Path) -> None:
    two, one = torch.load(got / "checkpoint.pt"), torch.load(want / "checkpoint.pt")
    assert two["step"] == one["step"] > 0
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    for name, value in one["rule"].items():
        torch.testing.assert_close(two["rule"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def pipeline_equals_one_process(tmp_path: Path, npz: Path, rule: dict, stages: int, micro: int, one_batch: int,
                                model: dict = MLP, nproc: int | None = None, optim: dict | None = None,
                                **train: object) -> subprocess.CompletedProcess:
    path = write_recipe(tmp_path / "r.toml", npz, rule=rule, model=model, data={"crop_padding": 1},
                        optim=optim or {}, train={"epochs": 2, "batch_size": 16, **train})
    result = torchrun(nproc or stages, "run", str(path), "--out", str(tmp_path / "pipe"),
                      "--set", f"train.pipeline_stages={stages}", "--set", f"train.micro_batches={micro}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["run", str(path), "--out", str(tmp_path / "one"), "--set", f"train.batch_size={one_batch}"]) == 0
    assert_same_model(tmp_path / "pipe", tmp_path / "one")
    return result


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("rule", [{"name": "drtp"}, {"name": "tpsgd"}], ids=["drtp", "tpsgd"])
def test_forward_only_stages_equal_one_process_with_the_micro_batch(tmp_path, tiny_npz, rule, stages):
    result = pipeline_equals_one_process(tmp_path, tiny_npz, rule, stages, micro=2, one_batch=8,
                                         model={**MLP, "activation": "tanh"}, optim={"name": "sgd", "lr": 0.01})
    assert f"pipeline of {stages} stages" in result.stdout and result.stdout.count("training summary") == 1
    results = json.loads((tmp_path / "pipe" / "results.json").read_text())
    assert results["pipeline_stages"] == stages and results["accuracy"] > 0.5


@pytest.mark.parametrize("rule", [{"name": "dfa"}, {"name": "sdfa"}, {"name": "dfa", "bp_units": ["0"]}],
                         ids=["dfa", "sdfa", "hybrid"])
def test_dfa_stages_equal_one_process_on_the_whole_batch(tmp_path, tiny_npz, rule):
    # sdfa's sign(e) signals are larger than DFA's: at lr 0.05 its loss explodes (exit 3), at 0.01 its
    # training is chaotic enough that the rounding of the micro-batch sums grows past the tolerance
    optim = {"name": "sgd", "lr": 0.002} if rule["name"] == "sdfa" else None
    pipeline_equals_one_process(tmp_path, tiny_npz, rule, stages=2, micro=4, one_batch=16, optim=optim)


def test_lra_error_units_travel_down_the_stages(tmp_path, tiny_npz):
    """Product E updates and the norm-ball on the summed micro-batch updates (the fused kernel is
    off: it would clip each micro-batch's ΔW)."""
    rule = {"name": "lra", "error_update": "product", "max_norm": 0.5}
    pipeline_equals_one_process(tmp_path, tiny_npz, rule, stages=3, micro=4, one_batch=16,
                                optim={"name": "sgd", "lr": 0.01})


def test_rec_lra_on_two_stages_equals_one_process(tmp_path, tiny_npz):
    """A conv net with BatchNorm: one micro-batch, so the statistics are those of one process."""
    rule = {"name": "rec_lra", "error_skip_every": 2}
    pipeline_equals_one_process(tmp_path, tiny_npz, rule, stages=2, micro=1, one_batch=16,
                                model={"name": "cnn", "width": 4})


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_bp_through_torch_pipelining_equals_gradient_accumulation(tmp_path, tiny_npz, schedule):
    pipeline_equals_one_process(tmp_path, tiny_npz, {"name": "bp"}, stages=2, micro=4, one_batch=16,
                                pipeline_schedule=schedule)


def test_trace_bp_runs_through_torch_pipelining(tmp_path, tiny_npz):
    """trace_bp's probes are drawn per process, so it equals no one-process run: it must train."""
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule={"name": "trace_bp"}, model={"name": "cnn", "width": 4},
                        optim={"name": "adamw", "lr": 0.01},
                        train={"epochs": 3, "batch_size": 16, "pipeline_stages": 2, "micro_batches": 2})
    result = torchrun(2, "run", str(path), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["pipeline_stages"] == 2 and results["accuracy"] > 0.4  # chance is 0.25


def test_pipeline_times_data_parallel(tmp_path, tiny_npz):
    """2 stages x 2 replicas of tpsgd: one process whose batch is the two replicas' micro-batches."""
    result = pipeline_equals_one_process(tmp_path, tiny_npz, {"name": "tpsgd"}, stages=2, micro=2, one_batch=16,
                                         nproc=4)
    assert "2 stages × 2 replica(s)" in result.stdout


def test_stage_boundaries_and_refusals(tmp_path, tiny_npz, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule={"name": "dfa"}, model=MLP,
                        train={"batch_size": 16, "pipeline_stages": 2, "stage_boundaries": ["2"]})
    result = torchrun(2, "run", str(path), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at train.stage_boundaries: stage 0 (2 units): 0.0 Linear … 1.0 Linear; stage 1 (1 unit): 2.0 Linear" \
        in result.stdout
    refused = [
        ({"rule": {"name": "lra"}}, "error_update = 'transpose'"),  # ΔE_l needs ΔW_(l+1) from the other stage
        ({"rule": {"name": "dfa", "align_every": 5}}, "align_every"),
        ({"rule": {"name": "fa"}}, "is not pipelined"),
        ({"train": {"stage_boundaries": ["9"]}}, "stage_boundaries: '9' names no unit"),
    ]
    for change, message in refused:
        sections = {"rule": {"name": "dfa"}, "train": {"batch_size": 16, "pipeline_stages": 2}}
        for key, value in change.items():
            sections[key] = {**sections[key], **value}
        path = write_recipe(tmp_path / "bad.toml", tiny_npz, model=MLP, **sections)
        result = torchrun(2, "run", str(path), "--out", str(tmp_path / "bad"))
        assert result.returncode != 0 and message in result.stderr, (change, result.stderr[-2000:])
        lines = result.stderr.splitlines()  # torchrun's own report quotes the line again, indented
        assert sum(line.startswith(f"error: {path}") for line in lines) == 2, "each rank says it, without a traceback"
        assert "trainer/" not in result.stderr  # the one traceback is torchrun's own ChildFailedError
    path = write_recipe(tmp_path / "one.toml", tiny_npz, train={"pipeline_stages": 2})
    assert main(["run", str(path), "--out", str(tmp_path / "alone")]) == 2  # one process, two stages
    assert "torchrun --nproc_per_node=2" in capsys.readouterr().err


def test_a_killed_stage_ends_the_job_and_the_run_resumes(tmp_path, tiny_npz):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule={"name": "dfa"}, model=MLP,
                        train={"epochs": 60, "batch_size": 16, "pipeline_stages": 2, "micro_batches": 2,
                               "stage_timeout": 20.0}, optim={"schedule": "constant"})
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "trainer", "run", str(path), "--out", str(out)]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (out / "checkpoint.pt").exists(), "no checkpoint within 120 s"
    workers = [int(pid) for pid in Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)  # stage 0 dies
    killed = time.time()
    _, stderr = job.communicate(timeout=60)
    assert job.returncode != 0 and time.time() - killed < 30
    assert "the checkpoint of epoch" in stderr and "continue with --resume" in stderr, stderr[-3000:]  # the survivor
    epoch = torch.load(out / "checkpoint.pt")["epoch"]
    assert 1 <= epoch < 60
    parts = sorted(p.name for p in (out / "stages").iterdir())
    assert parts == [f"epoch{epoch:04d}-rank0.pt", f"epoch{epoch:04d}-rank1.pt"], parts
    resumed = torchrun(2, "run", str(path), "--out", str(out), "--resume", "--set", f"train.epochs={epoch + 1}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from epoch {epoch}" in resumed.stdout
    assert torch.load(out / "checkpoint.pt")["epoch"] == epoch + 1


def test_balanced_stages_minimise_the_slowest_stage():
    import itertools

    generator = torch.Generator().manual_seed(3)
    for n, stages in [(7, 3), (5, 2), (9, 4), (4, 4)]:
        seconds = (torch.rand(n, generator=generator) + 0.1).tolist()
        got = balanced_stages(seconds, stages)
        assert [r.start for r in got][0] == 0 and got[-1].stop == n and all(len(r) for r in got)
        best = min(max(sum(seconds[a:b]) for a, b in zip((0, *cuts), (*cuts, n)))
                   for cuts in itertools.combinations(range(1, n), stages - 1))
        assert max(sum(seconds[i] for i in r) for r in got) == pytest.approx(best)


def test_named_stages():
    names = ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "head"]
    assert named_stages(names, ["layer2"]) == [range(0, 3), range(3, 6)]
    assert named_stages(names, ["layer1.1", "head"]) == [range(0, 2), range(2, 5), range(5, 6)]
    with pytest.raises(ConfigError, match="'layer3' names no unit"):
        named_stages(names, ["layer3"])
    with pytest.raises(ConfigError, match="does not come after"):
        named_stages(names, ["layer2", "layer1"])


def _silent_peer(rank: int, port: int, queue: "torch.multiprocessing.SimpleQueue") -> None:
    """Rank 1 waits for activations that rank 0 never sends (it sleeps, then exits)."""
    import datetime

    import torch.distributed as dist

    from trainer.distributed import DistEnv
    from trainer.errors import StageFailed
    from trainer.pipeline import ACTIVATION, Courier

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    if rank == 1:
        start = time.perf_counter()
        try:
            Courier(DistEnv(rank=1, world_size=2, stages=2), timeout_s=1.0).receive(
                [torch.empty(3)], 0, ACTIVATION, "activations")
            queue.put(("received", 0.0))
        except StageFailed as err:
            queue.put((str(err), time.perf_counter() - start))
    else:
        time.sleep(3)
    # no barrier: gloo closes the pair after a receive times out, as a stage that ends does


def test_a_receive_that_waits_too_long_ends_with_a_message():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_silent_peer, args=(port, queue), nprocs=2)
    message, waited = queue.get()
    assert "stage 1 (rank 1) waited for activations from stage 0 (rank 0) and timed out" in message
    assert "train.stage_timeout" in message and 0.9 < waited < 2.5
