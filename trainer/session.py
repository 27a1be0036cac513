"""A training session built from a recipe, and its checkpoint round trip.

``build_session`` assembles device, data, model, rule, optimizer and schedule in one place;
``trainer run`` (the loop), ``trainer eval`` and the benchmarks all build through this module, so
what trains is what gets measured and evaluated. The optimizer belongs to the session: a rule only
calls ``optimizer.step()`` on the gradients it wrote, and says through ``Rule.param_options`` which
parameters learn at another rate or decay otherwise than the recipe's ``[optim]`` says.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from kernels import FEEDBACK_STATE_KEYS
from trainer.checkpoint import rng_state, set_rng_state
from trainer.config import ConfigError, OptimConfig, Recipe
from trainer.data import DataBundle, NormStats, build_data, default_augmentation, source_facts
from trainer.distributed import DistEnv, average_gradients_before_step, broadcast_state, init_distributed
from trainer.models import build_model
from trainer.pipeline import LocalPipeline, Pipeline, build_pipeline
from trainer.recipes import recipe_from_dict
from trainer.rules import ParamOptions, Rule, RuleContext, RuleError, build_rule

if TYPE_CHECKING:
    from trainer.pipeline_bp import BackpropPipeline


def device_name(name: str) -> str:
    """``[train] device`` as this machine reads it: "auto" is cuda when available, else cpu. A
    ``cuda:N`` must be one of this machine's GPUs: torch refuses a long index with a traceback and
    wraps one above 127 (``cuda:128`` is ``cuda:-128``)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    index = name.partition(":")[2]
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        there = f"its GPUs are {', '.join(f'cuda:{i}' for i in range(count))}; use one of those, " if count else \
            "it has no CUDA device; use "
        raise ConfigError(f"[train] device = {name!r}: this machine has no such device ({there}'cpu' or 'auto')")
    return name


def on_cuda_by_default(flag: bool | None, device_type: str) -> bool:
    """An unset ``compile`` or ``amp``: on where CUDA is."""
    return device_type == "cuda" if flag is None else flag


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The training device; under torchrun each process takes the GPU of its local rank."""
    name = device_name(name)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"[train] device = {name!r} but CUDA is not available here; use 'cpu' or 'auto'")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def lr_factor(cfg: OptimConfig, step: int, total: int) -> float:
    """The learning-rate multiplier at ``step`` of ``total``: linear warm-up, then the schedule
    (constant; cosine to 0; onecycle: from 0.04 up to 1 over the warm-up, 0.3 by default, then cosine)."""
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


def build_optimizer(cfg: OptimConfig, model: nn.Module, rule: Rule | None = None) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW over the model's parameters and the rule's own.

    Weight decay applies to tensors of dimension >= 2 only (not to norms and biases). Every group
    learns at ``optim.lr`` times its ``lr_scale``: 1, unless ``rule.param_options()`` says
    otherwise (e.g. LRA's γ for its error maps), which may also set a parameter's weight decay.
    """
    special = rule.param_options() if rule is not None else {}
    owned = [("model", p) for p in model.parameters()]
    if rule is not None:
        owned += [("rule", p) for p in rule.parameters()]
    groups: dict[tuple[str, float, float], list[nn.Parameter]] = {}
    for owner, p in owned:
        if p.requires_grad:
            options = special.get(p, ParamOptions())
            decay = options.weight_decay if options.weight_decay is not None else cfg.weight_decay
            groups.setdefault((owner, decay if p.dim() >= 2 else 0.0, options.lr_scale), []).append(p)
    param_groups = [
        {"params": params, "owner": owner, "lr_scale": scale, "lr": cfg.lr * scale, "weight_decay": decay}
        for (owner, decay, scale), params in groups.items()
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas))


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
    pipeline: Pipeline | None = None  # this process's stage, when train.pipeline_stages > 1
    data_files: dict[str, dict[str, Any]] = field(default_factory=dict)  # data_fingerprints of the recipe

    @property
    def stepper(self) -> Rule | LocalPipeline | BackpropPipeline:
        """What turns a batch into updates: the rule, or this process's pipeline stage of it."""
        return self.rule if self.pipeline is None else self.pipeline.stage

    @property
    def lr(self) -> float:
        """``optim.lr`` times the schedule's factor now: the model's learning rate."""
        return self.recipe.optim.lr * lr_factor(self.recipe.optim, self.scheduler.last_epoch, self.total_steps)


def rule_context(recipe: Recipe, device: torch.device, num_classes: int, input_shape: tuple[int, ...]) -> RuleContext:
    """What a rule is told beyond its options; unset compile/amp mean "on where CUDA is"."""
    cfg = recipe.train
    return RuleContext(
        num_classes=num_classes, input_shape=input_shape, device=device,
        compile=on_cuda_by_default(cfg.compile, device.type), amp=on_cuda_by_default(cfg.amp, device.type),
        label_smoothing=cfg.label_smoothing, seed=cfg.seed,
    )


def effective_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a run on this machine will use it: unset and automatic values resolved
    (device, compile, amp; augmentation and class count from the data source)."""
    tree = recipe.to_dict()
    train, data = tree["train"], tree["data"]
    train["device"] = device_name(train["device"])
    device_type = torch.device(train["device"]).type
    train["compile"] = on_cuda_by_default(recipe.train.compile, device_type)
    train["amp"] = on_cuda_by_default(recipe.train.amp, device_type)
    channels, classes = source_facts(recipe.data)
    if channels is not None and recipe.data.name != "imagefolder":
        data["crop_padding"], data["flip"] = default_augmentation(recipe.data, channels)
    elif recipe.data.name == "imagefolder":
        data["flip"] = recipe.data.flip is not False
    if classes is not None:
        data["num_classes"] = classes
    return tree


def build_session(recipe: Recipe, sets: Mapping[str, str] | None = None) -> Session:
    """Build everything from a recipe; under torchrun, join the job and shard the data.

    Errors about the data or about what the rule can do with the model come back as ConfigError
    naming the recipe file and its section, or the ``--set`` that set the key they name (``sets``:
    dotted key -> the override's text).
    """
    sets = sets or {}
    cfg = recipe.train
    pipelined = cfg.pipeline_stages > 1
    env = init_distributed(torch.device(device_name(cfg.device)).type, cfg.pipeline_stages,
                           cfg.stage_timeout if pipelined else None)
    device = resolve_device(cfg.device, env.local_rank)
    torch.manual_seed(cfg.seed)
    # a forward-only rule updates on every micro-batch: its loader gives micro-batches (trainer.pipeline)
    forward_only = pipelined and is_forward_only(recipe)
    batch_size = cfg.batch_size // cfg.micro_batches if forward_only else cfg.batch_size
    try:
        data = build_data(recipe.data, device, batch_size, cfg.eval_batch_size, cfg.seed, env.replica, env.replicas)
    except ConfigError as err:
        raise blamed(err, recipe, sets) from None
    try:
        model = build_model(recipe.model, data.input_shape, data.num_classes).to(device)
    except ConfigError as err:
        raise blamed(err, recipe, sets) from None
    try:
        rule = build_rule(recipe.rule.name, recipe.rule.options, model,
                          rule_context(recipe, device, data.num_classes, data.input_shape))
    except RuleError as err:
        raise blamed(ConfigError(f"[rule] (rule {recipe.rule.name!r}): {err}"), recipe, sets, "rule.name") from None
    rule.check_divergence = False  # the loop decides, alike on every rank (after an all-reduce)
    optimizer = build_optimizer(recipe.optim, model, rule)
    if env.enabled:
        broadcast_state([model, rule])
    if env.replicas > 1:
        average_gradients_before_step(optimizer, env.replicas, env.replica_group)
    pipeline = None
    if pipelined:
        micro_batch = batch_size if forward_only else batch_size // cfg.micro_batches
        probe = torch.randn((micro_batch, *data.input_shape), device=device)
        try:
            pipeline = build_pipeline(rule, model, env, cfg, probe, optimizer)
        except (ConfigError, RuleError) as err:
            raise ConfigError(f"{recipe.source}: [train] pipeline_stages = {cfg.pipeline_stages} with rule "
                              f"{recipe.rule.name!r}: {err}") from None
    torch.manual_seed(cfg.seed + env.rank)  # ranks draw different randomness (e.g. probes) from here on
    total = cfg.epochs * len(data.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(recipe.optim, step, total))
    return Session(recipe, device, data, model, rule, optimizer, scheduler, total, env, pipeline,
                   data_fingerprints(recipe))


def data_fingerprints(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """The size and sha256 of each data file the recipe names (npz: data.path, data.test_path), by
    key: the recipe says only a path, and a resume must refuse other images under the same name."""
    if recipe.data.name != "npz":
        return {}
    prints = {}
    for key, name in (("data.path", recipe.data.path), ("data.test_path", recipe.data.test_path)):
        if name:
            digest = hashlib.sha256()
            with open(name, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            prints[key] = {"file": name, "size": Path(name).stat().st_size, "sha256": digest.hexdigest()}
    return prints


def blamed(err: ConfigError, recipe: Recipe, sets: Mapping[str, str], key: str | None = None) -> ConfigError:
    """``err`` prefixed by where its key (``key``, or the "[section] key" it begins with) was set: the
    ``--set`` that set it, or else the recipe file."""
    named = re.match(r"\[(\w+)\] (\w+)", str(err))
    key = key or (f"{named[1]}.{named[2]}" if named else "")
    return ConfigError(f"{f'--set {sets[key]}' if key in sets else recipe.source}: {err}")


def is_forward_only(recipe: Recipe) -> bool:
    """Whether the recipe's rule updates each unit right after its own forward (drtp, tpsgd)."""
    return bool(getattr(recipe.rule.options, "forward_only", False))


# --- checkpoints ---------------------------------------------------------------------------------


def gathered_rng_states(env: DistEnv) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (collective: all ranks call it)."""
    if not env.enabled:
        return [rng_state()]
    states: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(states, rng_state())
    return states


def checkpoint_payload(s: Session, epoch: int, step: int, rng: list[dict[str, Any]]) -> dict[str, Any]:
    """What a checkpoint holds: enough to resume exactly, and to evaluate without the data."""
    return {
        "recipe": s.recipe.to_dict(), "epoch": epoch, "step": step, "world_size": s.env.world_size,
        "model": s.model.state_dict(), "rule": s.rule.state_dict(),
        # under a pipeline each rank's optimizer state is its stage's: in the stage parts (trainer.checkpoint)
        "optimizer": s.optimizer.state_dict() if s.pipeline is None else None,
        "pipeline": {"stages": s.env.stages} if s.pipeline is not None else None,
        "scheduler": s.scheduler.state_dict(), "rng": rng,
        "data": {"mean": list(s.data.stats.mean), "std": list(s.data.stats.std),
                 "num_classes": s.data.num_classes, "input_shape": list(s.data.input_shape), "files": s.data_files},
    }


def restore(s: Session, payload: dict[str, Any], part: dict[str, Any] | None = None) -> tuple[int, int]:
    """Load a checkpoint (and, under a pipeline, this rank's part of it) into a freshly built
    session; returns (epoch, step) to continue from."""
    if payload["world_size"] != s.env.world_size:
        raise ConfigError(f"the checkpoint was written by {payload['world_size']} process(es); resume it with "
                          f"the same number (got {s.env.world_size})")
    stages = (payload.get("pipeline") or {}).get("stages", 1)
    if stages != s.env.stages:
        raise ConfigError(f"the checkpoint was written by a pipeline of {stages} stage(s); resume it with "
                          f"train.pipeline_stages = {stages} (got {s.env.stages})")
    for key, saved in payload["data"].get("files", {}).items():  # checkpoints before fingerprints have none
        now = s.data_files.get(key)
        if now is not None and now != saved:
            change = f"{saved['size']} → {now['size']} bytes" if now["size"] != saved["size"] else \
                "its sha256 differs"
            raise ConfigError(f"{now['file']} ({key}): the file changed since the checkpoint was written ({change}); "
                              "--resume needs the images it trained on: put that file back, or start a new run with "
                              "another --out")
    try:
        s.model.load_state_dict(payload["model"])
        s.rule.load_state_dict(payload["rule"])
        s.optimizer.load_state_dict(payload["optimizer"] if part is None else part["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        reason = " ".join(str(err).split())[:300]
        raise ConfigError(f"the checkpoint does not fit the model and rule built from the recipe ({reason}); "
                          "resume with the recipe it was written with, or start a new run with another --out") from None
    s.scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"][s.env.rank])
    return payload["epoch"], payload["step"]


@dataclass
class TrainedModel:
    """A checkpoint's model, ready for evaluation, with what is needed to feed it."""

    recipe: Recipe
    device: torch.device
    model: nn.Module
    stats: NormStats  # the training images' normalisation
    input_shape: tuple[int, ...]
    num_classes: int
    epoch: int  # epochs trained
    step: int


def trained_model(payload: dict[str, Any], source: str, device_flag: str | None = None) -> TrainedModel:
    """The plain model of a checkpoint in eval mode (every rule's checkpoint loads into it), on the
    device it trained on or on ``device_flag`` (``trainer eval --device``)."""
    recipe = recipe_from_dict(payload["recipe"], source=f"{source} (saved recipe)")
    try:
        device = resolve_device(device_flag or recipe.train.device)
    except ConfigError as err:  # a GPU this machine lacks
        where = f"--device {device_flag}:" if device_flag else f"{source}: it trained with"
        raise ConfigError(f"{where} {err} (trainer eval {source} --device cpu)") from None
    shape, num_classes = tuple(payload["data"]["input_shape"]), payload["data"]["num_classes"]
    model = build_model(recipe.model, shape, num_classes).to(device)
    try:
        missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    except RuntimeError as err:  # the same names with other shapes
        reason: str | None = " ".join(str(err).split())[:300]
    else:  # the feedback state of weight-transport layers is the rule's, not the model's
        unexpected = [key for key in unexpected if key.rsplit(".", 1)[-1] not in FEEDBACK_STATE_KEYS]
        reason = f"missing {missing[:3]}, unexpected {unexpected[:3]}" if missing or unexpected else None
    if reason is not None:
        raise ConfigError(f"{source}: the checkpoint's model does not fit {recipe.model.name!r} built from the "
                          f"recipe saved in it ({reason}); the checkpoint was edited or mixed from two runs: evaluate "
                          "a checkpoint as training wrote it")
    model.eval()
    stats = NormStats(tuple(payload["data"]["mean"]), tuple(payload["data"]["std"]))
    return TrainedModel(recipe, device, model, stats, shape, num_classes, payload["epoch"], payload["step"])
