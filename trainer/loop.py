"""The training loop: compact on purpose. The rule owns the step, the session owns what is trained
(``trainer.session``), the reporter owns what is shown (``trainer.report``); the loop owns the order."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from torch import nn

from trainer.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from trainer.config import ConfigError, Recipe, dump_toml
from trainer.data import Loader
from trainer.distributed import DistEnv, all_reduce_sum, average_buffers, finish
from trainer.report import MetricsLog, Reporter
from trainer.rules import Rule
from trainer.session import Session, build_session, checkpoint_payload, gathered_rng_states, restore


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


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


def train_epoch(s: Session, epoch: int, step: int, reporter: Reporter, ckpt_path: Path) -> tuple[int, dict[str, Any]]:
    """One epoch of training steps; returns the step count and the epoch's summary. Image rates are
    global (all ranks); losses are this rank's, averaged over ranks when logged."""
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
            reporter.step({"step": step, "epoch": epoch + 1, "split": "train", "loss": loss_now, "lr": s.lr,
                           "images_per_s": window_images / (time.perf_counter() - window_start),
                           "peak_memory_mb": peak_memory_mb(device), **s.rule.diagnostics()})
            window_images, window_start = 0, time.perf_counter()
        reporter.advance()
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
    epoch, step = restore(s, payload) if payload is not None else (0, 0)
    if s.env.enabled:
        torch.distributed.barrier()  # every rank has read the checkpoint before rank 0 rewrites files
    log = None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.toml").write_text(dump_toml(recipe.to_dict()))
        log = MetricsLog(out_dir / "metrics.jsonl", step if resume else None)
    reporter = Reporter(console if main and console else Console(quiet=not main), log)
    cfg = recipe.train
    reporter.header(
        f"[bold]{recipe.rule.name}[/] on {recipe.data.name} · {recipe.model.name} · {s.device} × {s.env.world_size} · "
        f"compile={s.rule.ctx.compile} · {len(s.data.train)} steps/epoch · out: {out_dir}"
    )
    history: list[dict[str, Any]] = []
    with reporter.running(len(s.data.train)):
        for epoch in range(epoch, cfg.epochs):
            reporter.start_epoch(epoch, cfg.epochs, len(s.data.train))
            step, summary = train_epoch(s, epoch, step, reporter, ckpt_path)
            if s.env.enabled:
                average_buffers(s.model, s.env.world_size)  # one set of BatchNorm statistics
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                s.model.eval()
                s.rule.eval()
                summary.update(evaluate(s.rule, s.data.test, nn.CrossEntropyLoss(), s.env))
            history.append(summary)
            reporter.end_epoch(summary, s.data.test_name)
            rng = gathered_rng_states(s.env)
            if main:
                save_checkpoint(ckpt_path, checkpoint_payload(s, epoch + 1, step, rng))
    reporter.summary(history, s.data.test_name)
    results = {"recipe": recipe.source, "rule": recipe.rule.name, "epochs": cfg.epochs, "steps": step,
               "device": str(s.device), "world_size": s.env.world_size, "rule_state_mb": rule_state_mb(s.rule),
               **(history[-1] if history else {})}
    if main:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    finish(s.env)
    return results
