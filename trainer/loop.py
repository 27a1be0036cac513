"""The training loop: compact on purpose. The rule owns the step; the loop owns everything else."""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

from trainer.checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trainer.config import ConfigError, OptimConfig, Recipe, dump_toml
from trainer.data import DataBundle, Loader, NormStats, build_data
from trainer.distributed import (DistEnv, all_reduce_sum, average_buffers, average_gradients_before_step,
                                 broadcast_state, finish, init_distributed)
from trainer.models import build_model
from trainer.rules import Rule, RuleContext, build_rule


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The training device; under torchrun each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"[train] device = {name!r} but CUDA is not available here; use 'cpu' or 'auto'")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def build_optimizer(cfg: OptimConfig, modules: list[nn.Module]) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; weight decay only on tensors of dimension >= 2 (not norms, biases);
    a rule's ``lr_scales()`` give its parameters groups with ``lr = scale · optim.lr``, after the
    unscaled groups (group 0 has ``optim.lr``: the loop logs its learning rate)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    scales = {p: s for m in modules if isinstance(m, Rule) for p, s in m.lr_scales().items()}
    keys = {p: (p.dim() >= 2, scales.get(p, 1.0)) for p in params}
    groups = [
        {"params": [p for p in params if keys[p] == key], "lr": cfg.lr * key[1],
         "weight_decay": cfg.weight_decay if key[0] else 0.0}
        for key in sorted(set(keys.values()), key=lambda k: (k[1] != 1.0, not k[0], k[1]))
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(cfg: OptimConfig, step: int, total: int) -> float:
    """The learning-rate multiplier at ``step`` of ``total``: warm-up, then the schedule."""
    t = step / max(1, total)
    if cfg.schedule == "onecycle":
        peak = cfg.warmup_fraction or 0.3
        if t < peak:
            return 0.04 + 0.96 * t / peak
        return 0.5 * (1 + math.cos(math.pi * (t - peak) / (1 - peak)))
    if t < cfg.warmup_fraction:
        return (t + 1 / max(1, total)) / cfg.warmup_fraction
    if cfg.schedule == "constant":
        return 1.0
    u = (t - cfg.warmup_fraction) / (1 - cfg.warmup_fraction)
    return 0.5 * (1 + math.cos(math.pi * u))


def rule_state_mb(rule: Rule) -> float:
    """Memory of the rule's own state (feedback matrices, learned error matrices), in MiB."""
    return sum(t.numel() * t.element_size() for t in rule.state_dict().values() if torch.is_tensor(t)) / 2**20


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], loader: Loader, criterion: nn.Module,
             env: DistEnv = DistEnv()) -> dict[str, float]:
    """Loss and accuracy over a loader (summed over ranks' shards). A short last batch is padded
    so compiled shapes stay fixed."""
    total_loss, correct, count = 0.0, 0, 0
    for x, y in loader.batches(0):
        n = len(y)
        if n < loader.batch_size:
            x = torch.cat([x, x.new_zeros((loader.batch_size - n, *x.shape[1:]))])
        logits = forward(x)[:n].float()
        total_loss += criterion(logits, y).item() * n
        correct += (logits.argmax(1) == y).sum().item()
        count += n
    if env.enabled:
        total_loss, correct, count = all_reduce_sum([total_loss, correct, count])
    return {"loss": total_loss / count, "accuracy": correct / count}


class MetricsLog:
    """metrics.jsonl: one JSON object a line. On resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


@dataclass
class Session:
    """Everything built from a recipe: data, model, rule, optimizer and schedule."""

    recipe: Recipe
    device: torch.device
    data: DataBundle
    model: nn.Module
    rule: Rule
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    env: DistEnv


def build_session(recipe: Recipe) -> Session:
    """Build everything from a recipe; under torchrun, join the job and shard the data."""
    train_cfg = recipe.train
    requested = "cuda" if train_cfg.device == "auto" and torch.cuda.is_available() else train_cfg.device
    env = init_distributed(torch.device("cpu" if requested == "auto" else requested).type)
    device = resolve_device(train_cfg.device, env.local_rank)
    torch.manual_seed(train_cfg.seed)
    try:
        data = build_data(recipe.data, device, train_cfg.batch_size, train_cfg.eval_batch_size, train_cfg.seed,
                          env.rank, env.world_size)
    except ConfigError as err:
        raise ConfigError(f"{recipe.source}: {err}") from None
    model = build_model(recipe.model, data.input_shape, data.num_classes).to(device)
    ctx = RuleContext(
        num_classes=data.num_classes, input_shape=data.input_shape, device=device,
        compile=train_cfg.compile if train_cfg.compile is not None else device.type == "cuda",
        amp=train_cfg.amp if train_cfg.amp is not None else device.type == "cuda",
        label_smoothing=train_cfg.label_smoothing, seed=train_cfg.seed,
    )
    rule = build_rule(recipe.rule.name, recipe.rule.options, model, ctx)
    optimizer = build_optimizer(recipe.optim, [model, rule])
    if env.enabled:
        broadcast_state([model, rule])
        average_gradients_before_step(optimizer, env.world_size)
    torch.manual_seed(train_cfg.seed + env.rank)  # ranks draw different randomness (e.g. probes) from here on
    total = train_cfg.epochs * len(data.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(recipe.optim, step, total))
    return Session(recipe, device, data, model, rule, optimizer, scheduler, total, env)


def gathered_rng_states(env: DistEnv) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (collective: all ranks call it)."""
    if not env.enabled:
        return [rng_state()]
    states: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(states, rng_state())
    return states


def checkpoint_payload(s: Session, epoch: int, step: int, rng: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "recipe": s.recipe.to_dict(), "epoch": epoch, "step": step, "world_size": s.env.world_size,
        "model": s.model.state_dict(), "rule": s.rule.state_dict(),
        "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(), "rng": rng,
        "data": {"mean": list(s.data.stats.mean), "std": list(s.data.stats.std),
                 "num_classes": s.data.num_classes, "input_shape": list(s.data.input_shape)},
    }


def restore(s: Session, payload: dict[str, Any]) -> tuple[int, int]:
    """Load a checkpoint into a freshly built session; returns (epoch, step) to continue from."""
    if payload["world_size"] != s.env.world_size:
        raise ConfigError(f"the checkpoint was written by {payload['world_size']} process(es); resume it with "
                          f"the same number (got {s.env.world_size})")
    s.model.load_state_dict(payload["model"])
    s.rule.load_state_dict(payload["rule"])
    s.optimizer.load_state_dict(payload["optimizer"])
    s.scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"][s.env.rank])
    return payload["epoch"], payload["step"]


def stats_of(payload: dict[str, Any]) -> NormStats:
    return NormStats(tuple(payload["data"]["mean"]), tuple(payload["data"]["std"]))


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False, disable=console.quiet,
    )


def _summary_table(history: list[dict[str, Any]], test_name: str) -> Table:
    table = Table(title="training summary")
    for col in ("epoch", "train loss", "train acc", f"{test_name} loss", f"{test_name} acc", "images/s", "peak MB"):
        table.add_column(col, justify="right")
    for r in history:
        table.add_row(
            str(r["epoch"]), f"{r['train_loss']:.4f}", f"{100 * r['train_accuracy']:.2f}%",
            f"{r['loss']:.4f}" if "loss" in r else "-", f"{100 * r['accuracy']:.2f}%" if "accuracy" in r else "-",
            f"{r['images_per_s']:.0f}", f"{r['peak_memory_mb']:.0f}",
        )
    return table


def _train_epoch(s: Session, epoch: int, step: int, log: MetricsLog | None, progress: Progress, task: Any,
                 ckpt_path: Path) -> tuple[int, dict[str, Any]]:
    """One epoch of training steps with progress and logging; returns the step count and a summary.
    Image rates are global (all ranks); losses are this rank's, averaged over ranks when logged."""
    cfg, device, world = s.recipe.train, s.device, s.env.world_size
    s.model.train()
    s.rule.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, window_images = 0, 0
    epoch_start = window_start = time.perf_counter()
    for i, (x, y) in enumerate(s.data.train.batches(epoch)):
        out = s.rule.train_step(x, y, s.optimizer)
        s.scheduler.step()
        step += 1
        loss_sum += out.loss * len(y)
        correct += (out.logits.argmax(1) == y).sum()
        seen += len(y)
        window_images += len(y) * world
        if step % cfg.log_every == 0 or i + 1 == len(s.data.train):
            loss_now = out.loss.item()  # syncs the device: the timer below is honest
            if s.env.enabled:  # every rank takes the same decision on divergence
                loss_now = all_reduce_sum([loss_now])[0] / world
            if not math.isfinite(loss_now):
                raise TrainingDiverged(
                    f"loss became {loss_now} at step {step} (epoch {epoch + 1}); the last good checkpoint "
                    f"is kept in {ckpt_path if ckpt_path.exists() else 'none (first epoch)'}. "
                    "Lower optim.lr or check the data."
                )
            rate = window_images / (time.perf_counter() - window_start)
            diagnostics = s.rule.diagnostics()  # per-unit keys ("name/unit") go to the log only
            record = {"step": step, "epoch": epoch + 1, "split": "train", "loss": loss_now,
                      "lr": s.scheduler.get_last_lr()[0], "images_per_s": rate,
                      "peak_memory_mb": peak_memory_mb(device), **diagnostics}
            if log:
                log.write(record)
            extra = "".join(f" · {k} {v:.3g}" for k, v in diagnostics.items() if "/" not in k)
            progress.update(task, stats=f"{rate:,.0f} img/s · loss {loss_now:.4f} · lr {record['lr']:.3g}{extra}")
            window_images, window_start = 0, time.perf_counter()
        progress.advance(task)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_time = time.perf_counter() - epoch_start
    loss_total, correct_total, seen_total = loss_sum.item(), correct.item(), seen
    if s.env.enabled:
        loss_total, correct_total, seen_total = all_reduce_sum([loss_total, correct_total, seen_total])
    return step, {"step": step, "epoch": epoch + 1, "train_loss": loss_total / seen_total,
                  "train_accuracy": correct_total / seen_total, "images_per_s": seen_total / train_time,
                  "train_seconds": train_time, "peak_memory_mb": peak_memory_mb(device)}


def train(recipe: Recipe, out_dir: Path, resume: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Train a recipe into ``out_dir`` (checkpoint, metrics.jsonl, recipe.toml, results.json).

    Under torchrun every rank trains its shard; rank 0 alone prints, logs and writes files.
    """
    ckpt_path = out_dir / CHECKPOINT_NAME
    if ckpt_path.exists() and not resume:
        raise ConfigError(f"{out_dir}: already holds a run; pass --resume to continue it, or --out to choose another folder")
    if resume and not ckpt_path.exists():
        raise ConfigError(f"{out_dir}: --resume given but there is no {CHECKPOINT_NAME} to resume from")
    payload = load_checkpoint(ckpt_path) if resume else None
    if payload is not None and payload["epoch"] >= recipe.train.epochs:  # before building anything
        raise ConfigError(f"{out_dir}: the run already finished {payload['epoch']} of train.epochs = "
                          f"{recipe.train.epochs}; set train.epochs higher to train it on, or use --out to start another")
    s = build_session(recipe)
    main = s.env.is_main
    console = console if main and console else Console(quiet=not main)
    epoch, step = restore(s, payload) if payload is not None else (0, 0)
    if s.env.enabled:
        torch.distributed.barrier()  # every rank has read the checkpoint before rank 0 rewrites files
    log = None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.toml").write_text(dump_toml(recipe.to_dict()))
        log = MetricsLog(out_dir / "metrics.jsonl", step if resume else None)
    cfg = recipe.train
    history: list[dict[str, Any]] = []
    console.print(
        f"[bold]{recipe.rule.name}[/] on {recipe.data.name} · {recipe.model.name} · {s.device} × {s.env.world_size} · "
        f"compile={s.rule.ctx.compile} · {len(s.data.train)} steps/epoch · out: {out_dir}"
    )
    with _progress(console) as progress:
        task = progress.add_task("", total=len(s.data.train), stats="")
        for epoch in range(epoch, cfg.epochs):
            progress.reset(task, total=len(s.data.train), description=f"epoch {epoch + 1}/{cfg.epochs}", stats="")
            step, summary = _train_epoch(s, epoch, step, log, progress, task, ckpt_path)
            if s.env.enabled:
                average_buffers(s.model, s.env.world_size)  # one set of BatchNorm statistics
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                s.model.eval()
                s.rule.eval()
                summary.update(evaluate(s.rule, s.data.test, nn.CrossEntropyLoss(), s.env))
            history.append(summary)
            rng = gathered_rng_states(s.env)
            if main:
                log.write({"split": s.data.test_name, **summary})
                save_checkpoint(ckpt_path, checkpoint_payload(s, epoch + 1, step, rng))
            shown = f" · {s.data.test_name} acc {100 * summary['accuracy']:.2f}%" if "accuracy" in summary else ""
            progress.update(task, stats=f"{summary['images_per_s']:,.0f} img/s · loss {summary['train_loss']:.4f}{shown}")
    if history:
        console.print(_summary_table(history, s.data.test_name))
    results = {"recipe": recipe.source, "rule": recipe.rule.name, "epochs": cfg.epochs, "steps": step,
               "device": str(s.device), "world_size": s.env.world_size, "rule_state_mb": rule_state_mb(s.rule),
               **(history[-1] if history else {})}
    if main:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    finish(s.env)
    return results
