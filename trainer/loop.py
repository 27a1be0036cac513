"""The training loop: compact on purpose. The rule owns the step, the session owns what is trained
(``trainer.session``) and its layout what differs under a pipeline (``trainer.parallel.layout``), the reporter
owns what is shown (``trainer.report``); the loop owns the order."""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console
from rich.markup import escape
from torch import nn

from trainer.checkpoint import checkpoint_payload, gathered_rng_states, restore
from trainer.checkpoint_file import NOTE_KEY, load_checkpoint, save_checkpoint
from trainer.config import ConfigError, Recipe, dump_toml, recipe_changes
from trainer.errors import RunInterrupted, StageFailed, TrainingDiverged, divergence, input_cause
from trainer.evaluation import evaluate
from trainer.parallel.data_parallel import all_reduce_sum, average_buffers
from trainer.parallel.processes import finish
from trainer.recipes import recipe_from_dict
from trainer.report import MetricsLog, Reporter
from trainer.rules import Rule, StepResult
from trainer.rules.base import input_peak
from trainer.run_folder import CHECKPOINT_NAME, RunFolder
from trainer.session import Session, build_session, same_data_note


def rule_state_mb(rule: Rule) -> float:
    """Memory of the rule's own state (feedback matrices, learned error matrices), in MiB."""
    return rule.state_nbytes() / 2**20


RESUMABLE_KEYS = frozenset({"train.epochs", "train.log_every", "train.eval_every", "train.eval_batch_size",
                            "train.compile", "train.channels_last", "train.device", "data.num_workers",
                            "train.stage_timeout"})
"""Recipe keys that ``--resume`` may change and applies truly (epochs re-stretch the schedule);
any other change (seed, batch size, lr, model, rule, data, ...) is refused."""


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_step(s: Session, x: torch.Tensor, y: torch.Tensor, step: int, epoch: int,
                  epoch_ends: bool) -> tuple[StepResult, str | None]:
    """Training step ``step + 1`` (in epoch ``epoch + 1``, its last when ``epoch_ends``) as a run takes
    it: the stepper's update, the layout's after-step (a pipeline moves its cut there, once: the line
    to note, else None) and the schedule's step. The benchmarks time this very step. An update that
    overflows float32 is TrainingDiverged."""
    try:
        out = s.stepper.train_step(x, y, s.optimizer)
    except RuntimeError as err:  # a Python scalar (lr, Adam's step size) beyond float32 in the update
        if "without overflow" not in str(err):
            raise
        raise TrainingDiverged(f"the update of step {step + 1} (epoch {epoch + 1}) overflowed float32 "
                               f"({err})") from None
    moved = s.layout.after_step(epoch_ends)
    s.scheduler.step()
    return out, moved


def train_epoch(s: Session, epoch: int, step: int, reporter: Reporter) -> tuple[int, dict[str, Any]]:
    """One epoch of training steps; returns the step count and the epoch's summary. Image rates are
    global (all replicas); losses are this rank's, averaged over the ranks that see logits when logged."""
    cfg, device, steps = s.recipe.train, s.device, len(s.data.train)
    s.model.train()
    s.rule.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, window_images = 0, 0
    largest, fewest = torch.zeros((), device=device), math.inf  # the batches' largest |x| and fewest samples
    epoch_start = window_start = time.perf_counter()
    for i, (x, y) in enumerate(s.data.train.batches(epoch)):
        out, moved = training_step(s, x, y, step, epoch, i + 1 == steps)
        largest, fewest = torch.maximum(largest, input_peak(x)), min(fewest, len(y))  # read if it diverges
        if moved:
            reporter.note(moved)
        step += 1
        n = len(out.logits)  # 0 on the pipeline stages below the last: they see no logits
        loss_sum += out.loss * n
        correct += (out.logits.argmax(1) == y[:n]).sum()
        seen += n
        window_images += len(y) * s.env.replicas
        if step % cfg.log_every == 0 or i + 1 == steps:
            loss_now = out.loss.item()  # syncs the device: the timer below is honest
            if s.env.enabled:  # every rank takes the same decision on divergence
                total, count = all_reduce_sum([loss_now * n, n])
                loss_now = total / count
            reason = divergence(loss_now, s.data.num_classes)
            if reason is not None:
                raise _diverged(f"{reason} at step {step} (epoch {epoch + 1})", largest, fewest)
            reporter.step({"step": step, "epoch": epoch + 1, "split": "train", "loss": loss_now, "lr": s.lr,
                           "images_per_s": window_images / (time.perf_counter() - window_start),
                           "peak_memory_mb": peak_memory_mb(device), **s.rule.diagnostics()}, i + 1, steps)
            window_images, window_start = 0, time.perf_counter()
        reporter.advance()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_time = time.perf_counter() - epoch_start
    loss_total, correct_total, seen_total = loss_sum.item(), correct.item(), seen
    if s.env.enabled:
        loss_total, correct_total, seen_total = all_reduce_sum([loss_total, correct_total, seen_total])
    reason = divergence(loss_total / seen_total, s.data.num_classes)  # spikes between the logged steps
    if reason is not None:
        raise _diverged(f"the mean training {reason} in epoch {epoch + 1}", largest, fewest)
    return step, {"step": step, "epoch": epoch + 1, "train_loss": loss_total / seen_total,
                  "train_accuracy": correct_total / seen_total, "images_per_s": seen_total / train_time,
                  "train_seconds": train_time, "peak_memory_mb": peak_memory_mb(device)}


def _diverged(what: str, largest: torch.Tensor, fewest: float) -> TrainingDiverged:
    """The loop's divergence error, naming the cause its batches show (``input_cause``: an empty
    batch, non-finite or huge inputs), if any; else ``train`` adds the learning-rate hint."""
    cause = input_cause(float(largest), fewest)
    return TrainingDiverged(f"{what}; {cause}" if cause else what, cause)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, schedulers) stops a run as Ctrl-C does: ``RunInterrupted("SIGTERM")``."""
    def on_sigterm(signum: int, frame: Any) -> None:
        raise RunInterrupted("SIGTERM")

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def resume_notes(recipe: Recipe, payload: dict[str, Any], out_dir: Path) -> list[str]:
    """What ``--resume`` changes, refused unless every changed key is in ``RESUMABLE_KEYS``."""
    saved = recipe_from_dict(payload["recipe"], source=f"{out_dir} (saved recipe)").to_dict()
    new = recipe.to_dict()
    changed = recipe_changes(saved, new)

    def value(tree: dict[str, Any], dotted: str) -> Any:
        section, key = dotted.split(".")
        return tree.get(section, {}).get(key)

    if "rule.name" in changed:  # another rule has other options: its name says it all
        changed = [k for k in changed if not k.startswith("rule.") or k == "rule.name"]
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    if refused:
        listed = "; ".join(f"{k}: {value(saved, k)!r} → {value(new, k)!r}" for k in refused)
        raise ConfigError(f"{out_dir}: --resume: its checkpoint was written by another recipe ({listed}); these "
                          f"keys cannot change mid-run (only {', '.join(sorted(RESUMABLE_KEYS))} can): put them back, "
                          "or start a new run with another --out")
    notes = [f"{k}: {value(saved, k)!r} → {value(new, k)!r}" for k in changed]
    if "train.epochs" in changed:
        notes.append(f"the learning-rate schedule is re-stretched over {recipe.train.epochs} epochs")
    return notes


def inherited_note(recipe: Recipe) -> str | None:
    """The note of a run whose ``--set rule.name`` replaced the rule its recipe file was tuned for
    while the file's [optim] settings stay: which ones it inherits; else None."""
    origins = recipe.origins
    kept = [key for key in origins.file_optim_keys if f"optim.{key}" not in origins.sets]
    if recipe.rule.name == origins.file_rule or not kept:
        return None
    values = recipe.to_dict()["optim"]
    listed = ", ".join(f"optim.{key}={values[key]!r}" for key in kept)
    return (f"rule {recipe.rule.name} inherits {listed} from recipe {origins.name}, tuned for rule "
            f"{origins.file_rule} (change them with --set optim.KEY=VALUE)")


def lr_hint(recipe: Recipe) -> str:
    """The likely fix of a diverged run: a lower learning rate, saying where the current one came from."""
    lr, origins = recipe.optim.lr, recipe.origins
    if "optim.lr" in origins.sets:
        source = " came from --set"
    elif origins.source == "<recipe>":  # built from a dict: no file to name
        source = ""
    elif "lr" in origins.file_optim_keys:
        tuned = f", tuned for rule {origins.file_rule}" if origins.file_rule != recipe.rule.name else ""
        source = f" came from recipe {origins.name}{tuned}"
    else:
        source = " is the default"
    return (f"optim.lr={lr:g} ({recipe.optim.name}){source}: lower it, e.g. --set optim.lr={lr / 10:g}, or check "
            "the data")


def train(recipe: Recipe, out_dir: Path, resume: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Train a recipe into ``out_dir`` (checkpoint, metrics.jsonl, recipe.toml, results.json).

    The folder is checked and locked before anything is built. Under torchrun every rank trains
    its shard; rank 0 alone prints, logs and writes files. SIGINT and SIGTERM end the run with
    ``RunInterrupted`` saying what was kept; a loss that ``divergence`` calls diverged with
    ``TrainingDiverged``, whose message says where ``optim.lr`` came from (``recipe.origins``).
    """
    main = int(os.environ.get("RANK", "0")) == recipe.train.pipeline_stages - 1  # DistEnv.is_main, before the job
    ckpt_path = out_dir / CHECKPOINT_NAME
    with RunFolder(out_dir) as folder, sigterm_interrupts():
        if main:
            folder.claim(resume)
        payload = load_checkpoint(ckpt_path) if resume else None
        inherited = inherited_note(recipe)
        notes = [*([inherited] if inherited else []), *folder.notes]
        unverified = payload is not None and NOTE_KEY in payload  # written before digests: it may be damaged
        if unverified:
            notes.append(payload[NOTE_KEY])
        if payload is not None:
            notes += resume_notes(recipe, payload, out_dir)  # first: another recipe's epochs say nothing of this one
            if payload["epoch"] >= recipe.train.epochs:
                raise ConfigError(f"{out_dir}: the run already finished {payload['epoch']} of train.epochs = "
                                  f"{recipe.train.epochs}; set train.epochs higher to train it on, or use --out to "
                                  "start another")
        reporter = Reporter(console if main and console else Console(quiet=not main, emoji=False), None)
        saved = [payload["epoch"]] if payload is not None else []  # epochs of the checkpoints on disk
        try:
            return _run(recipe, out_dir, payload, reporter, notes, saved)
        except KeyboardInterrupt as stop:  # SIGINT, or SIGTERM through sigterm_interrupts
            name = stop.signal_name if isinstance(stop, RunInterrupted) else "SIGINT"
            raise RunInterrupted(name, f"stopped by {name}: {_kept(saved, ckpt_path, out_dir)}") from None
        except StageFailed as err:
            raise StageFailed(f"{err}; {_kept(saved, ckpt_path, out_dir)}") from None
        except TrainingDiverged as err:
            if unverified and len(saved) == 1:  # only the resumed checkpoint, which nothing verified
                kept = (f"the checkpoint it resumed from (epoch {saved[-1]}, unverified: it has no digest) is kept in "
                        f"{ckpt_path}")
            elif saved:
                kept = f"the last good checkpoint (epoch {saved[-1]}) is kept in {ckpt_path}"
            else:
                kept = "no checkpoint was written yet (it diverged in the first epoch)"
            if main:
                _write_results(out_dir, {"state": "diverged", "recipe": recipe.source, "rule": recipe.rule.name,
                                         "message": str(err)})
            hint = "" if err.cause else f"; {lr_hint(recipe)}"  # the data's fault: the rate is not
            raise TrainingDiverged(f"{err}; {kept}{hint}", err.cause) from None
        except RuntimeError as err:  # a collective (log-step loss, epoch-end sync) lost a process
            if int(os.environ.get("WORLD_SIZE", "1")) == 1 or not _lost_peer(err):
                raise
            reason = str(err).strip().splitlines()[0].split("] ", 1)[-1][:200]
            raise StageFailed(f"rank {os.environ.get('RANK')} lost another process of the job ({reason}): it has "
                              f"stopped, see its own error; {_kept(saved, ckpt_path, out_dir)}") from None


def _kept(saved: list[int], ckpt_path: Path, out_dir: Path) -> str:
    """What a stopped run leaves, and how to go on."""
    if saved:
        return f"the checkpoint of epoch {saved[-1]} is kept in {ckpt_path}; continue with --resume --out {out_dir}"
    return "no checkpoint was written yet (stopped during the first epoch): run it again to start over"


def _lost_peer(err: RuntimeError) -> bool:
    """Whether a torch.distributed error says another process went away or stopped answering."""
    text = str(err)
    return any(sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Timed out",
                                          "timed out", "Broken pipe", "pair closure"))


def _write_results(out_dir: Path, results: dict[str, Any]) -> None:
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out_dir / "results.json")


def _run(recipe: Recipe, out_dir: Path, payload: dict[str, Any] | None, reporter: Reporter,
         notes: list[str], saved: list[int]) -> dict[str, Any]:
    """Build the session, restore the checkpoint, train the remaining epochs, write the results;
    ``saved`` gains the epoch of every checkpoint written."""
    ckpt_path = out_dir / CHECKPOINT_NAME
    s = build_session(recipe)
    main = s.env.is_main
    epoch, step = restore(s, payload, out_dir) if payload is not None else (0, 0)
    if s.env.enabled:
        torch.distributed.barrier()  # every rank has read the checkpoint before rank 0 rewrites files
    history: list[dict[str, Any]] = []
    if main:
        (out_dir / "recipe.toml").write_text(dump_toml(recipe.to_dict()))
        reporter.log = MetricsLog(out_dir / "metrics.jsonl", step if payload is not None else None)
        history = [r for r in reporter.log.kept if r.get("split") != "train"]
        notes += reporter.log.notes
    cfg = recipe.train
    reporter.say(f"[bold]{recipe.rule.name}[/] on {recipe.data.name} · {recipe.model.name} · {s.device} × "
                 f"{s.env.world_size} · compile={s.rule.ctx.compile}{' · channels_last' if s.channels_last else ''} · "
                 f"{len(s.data.train)} steps/epoch · "
                 f"out: {escape(str(out_dir))}")
    if payload is not None:
        reporter.say(f"resumed from epoch {epoch}, step {step}")
    for text in [*s.data.notes, *s.notes, *s.rule.notes, *s.layout.notes, *notes]:
        reporter.note(text)
    try:
        with reporter.running(len(s.data.train)):
            for epoch in range(epoch, cfg.epochs):
                reporter.start_epoch(epoch, cfg.epochs, len(s.data.train))
                step, summary = train_epoch(s, epoch, step, reporter)
                if s.env.replicas > 1:
                    average_buffers(s.model, s.env.replicas, s.env.replica_group)  # one set of BatchNorm statistics
                s.layout.synchronize()  # every rank now holds the whole trained model
                if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                    s.model.eval()
                    s.rule.eval()
                    summary.update(evaluate(s.rule, s.data.test, nn.CrossEntropyLoss(), s.env))
                history.append(summary)
                reporter.end_epoch(summary, s.data.test_name)
                rng = gathered_rng_states(s.env)
                s.layout.save_part(out_dir, epoch + 1, s.optimizer)
                if main:
                    save_checkpoint(ckpt_path, checkpoint_payload(s, epoch + 1, step, rng))
                saved.append(epoch + 1)
                s.layout.drop_older_parts(out_dir, epoch + 1)
    except KeyboardInterrupt:  # SIGINT or SIGTERM: the epochs done so far, then train() says what was kept
        reporter.summary(history, s.data.test_name)
        raise
    reporter.summary(history, s.data.test_name)
    same_data = same_data_note(s.data_files)  # said before training too (Session.notes); kept in the results
    if same_data:
        reporter.note(same_data)
    epoch_seconds = [r["train_seconds"] for r in history]
    results = {"state": "finished", "recipe": recipe.source, "rule": recipe.rule.name, "epochs": cfg.epochs,
               "steps": step, "device": str(s.device), "world_size": s.env.world_size,
               "pipeline_stages": s.env.stages,
               "rule_state_mb": rule_state_mb(s.rule), **(history[-1] if history else {}),
               "train_seconds": sum(epoch_seconds), "epoch_seconds": epoch_seconds,
               **({"note": same_data} if same_data else {})}
    if main:
        _write_results(out_dir, results)
    finish(s.env)
    return results
