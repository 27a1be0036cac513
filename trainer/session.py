"""A training session built from a recipe.

``build_session`` assembles device, data, model, rule, optimizer, schedule and the layout of the
units over processes (``trainer.parallel.layout``) in one place; ``trainer run`` (the loop) and the
benchmarks build through this module, so what trains is what gets measured (the checkpoint round
trip is in ``trainer.checkpoint``, evaluation in ``trainer.evaluation``). The optimizer belongs to
the session: a rule only calls ``optimizer.step()`` on the gradients it wrote, and says through
``Rule.param_options`` which parameters learn at another rate or decay otherwise than the recipe's
``[optim]`` says.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.config import ConfigError, OptimConfig, Recipe
from trainer.data import DataBundle, build_data, default_augmentation, source_facts
from trainer.devices import cpu_bf16_note, device_name, on_cuda_by_default, resolve_device
from trainer.models import build_model, check_training_batch
from trainer.parallel.data_parallel import average_gradients_before_step, broadcast_state
from trainer.parallel.layout import Layout, Pipeline, Stepper
from trainer.parallel.processes import DistEnv, init_distributed
from trainer.rules import ParamOptions, Rule, RuleContext, RuleError, build_rule, rule_class
from trainer.speed_choice import choose_channels_last, choose_compile


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
    """SGD (Nesterov), Adam (weight decay as L2: added to the gradient) or AdamW (decoupled) over the
    model's parameters and the rule's own.

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
    adam = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return adam(param_groups, lr=cfg.lr, betas=tuple(cfg.betas))


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
    layout: Layout  # one process, or this process's stage of a pipeline (train.pipeline_stages > 1)
    data_files: dict[str, dict[str, Any]] = field(default_factory=dict)  # data_fingerprints of the recipe
    notes: list[str] = field(default_factory=list)  # what the session decided for the user (compile, layout)
    channels_last: bool = False  # the model's 4-D weights are NHWC (train.channels_last, as chosen)

    @property
    def stepper(self) -> Stepper:
        """What turns a batch into updates: the rule, or this process's pipeline stage of it."""
        return self.layout.stepper

    @property
    def lr(self) -> float:
        """``optim.lr`` times the schedule's factor now: the model's learning rate."""
        return self.recipe.optim.lr * lr_factor(self.recipe.optim, self.scheduler.last_epoch, self.total_steps)


def rule_context(recipe: Recipe, device: torch.device, num_classes: int, input_shape: tuple[int, ...],
                 compile: bool | None = None) -> RuleContext:
    """What a rule is told beyond its options. Unset amp means "on where CUDA is"; unset compile is
    ``compile`` as ``compile_decision`` chose it (None: its choice for a run of unknown length)."""
    cfg = recipe.train
    return RuleContext(
        num_classes=num_classes, input_shape=input_shape, device=device,
        compile=compile_decision(recipe, device.type, 0)[0] if compile is None else compile,
        amp=on_cuda_by_default(cfg.amp, device.type),
        label_smoothing=cfg.label_smoothing, seed=cfg.seed,
    )


def planned_images(recipe: Recipe) -> int:
    """The training images of the whole run where the source's size is known without loading it
    (mnist5k, npz; for ``trainer show``), else 0."""
    cfg = recipe.data
    if cfg.name == "mnist5k":
        count = 5000
    elif cfg.name == "npz":
        try:
            count = len(np.load(cfg.path, mmap_mode="r", allow_pickle=False)["y"])
        except Exception:  # noqa: BLE001 -- not readable here: the run itself will say why
            return 0
    else:
        return 0
    held_out = 0.0 if cfg.test_path else cfg.val_fraction
    return recipe.train.epochs * int(count * (1 - held_out))


def memory_format_decision(recipe: Recipe, device_type: str) -> tuple[bool, str]:
    """Whether this run stores its model channels_last, and why (``trainer.speed_choice``)."""
    cfg = recipe.train
    return choose_channels_last(cfg.channels_last, device_type, recipe.model.name, recipe.rule.name,
                                cfg.pipeline_stages)


def compile_decision(recipe: Recipe, device_type: str, images: int) -> tuple[bool, str]:
    """Whether this run compiles its forward passes, and why (``trainer.speed_choice``), in the layout
    ``memory_format_decision`` chose."""
    return choose_compile(recipe.train.compile, device_type, recipe.model.name, recipe.rule.name, images,
                          memory_format_decision(recipe, device_type)[0])


def effective_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a run on this machine will use it: unset and automatic values resolved
    (device, compile, channels_last, amp; augmentation and class count from the data source)."""
    tree = recipe.to_dict()
    train, data = tree["train"], tree["data"]
    train["device"] = device_name(train["device"])
    device_type = torch.device(train["device"]).type
    train["compile"] = compile_decision(recipe, device_type, planned_images(recipe))[0]
    train["channels_last"] = memory_format_decision(recipe, device_type)[0]
    train["amp"] = on_cuda_by_default(recipe.train.amp, device_type)
    channels, classes = source_facts(recipe.data)
    if channels is not None and recipe.data.name != "imagefolder":
        data["crop_padding"], data["flip"] = default_augmentation(recipe.data, channels)
    elif recipe.data.name == "imagefolder":
        data["flip"] = recipe.data.flip is not False
    if classes is not None:
        data["num_classes"] = classes
    return tree


@dataclass
class Trainee:
    """What a run trains, built from a recipe: the model, the rule over it and the optimizer."""

    model: nn.Module
    rule: Rule
    optimizer: torch.optim.Optimizer
    channels_last: bool  # the model's 4-D weights are NHWC, as ``memory_format_decision`` chose
    notes: list[str]  # why that layout, and why the rule compiles or not


def build_trainee(recipe: Recipe, device: torch.device, input_shape: tuple[int, ...], num_classes: int,
                  images: int, batch_size: int | None = None) -> Trainee:
    """The recipe's model, rule and optimizer as ``trainer run`` trains them: ``build_session`` and
    the benchmarks build through here, so what is measured is what trains.

    The model is fresh (the caller seeds it) and, where ``memory_format_decision`` says so, stored
    channels_last; the rule compiles as ``compile_decision`` decides for ``images`` training images
    (0: a run of unknown length) and leaves divergence to the loop (``check_divergence`` off: one
    host sync a logged step, not one a step, and every rank decides alike). ``batch_size``: a
    ``python:`` model's forward is checked on a training batch of that size (None: not checked).
    Errors are ConfigError naming the recipe file, or the ``--set`` that set the key they name.
    """
    try:
        model = build_model(recipe.model, input_shape, num_classes).to(device)
        if batch_size is not None:
            check_training_batch(model, recipe.model, input_shape, num_classes, batch_size)
        channels_last, memory_format_note = memory_format_decision(recipe, device.type)
        if channels_last:  # 4-D weights NHWC: convolutions then write NHWC activations (mkldnn's fast path)
            model = model.to(memory_format=torch.channels_last)
    except ConfigError as err:
        raise recipe.origins.blame(err) from None
    compiled, compile_note = compile_decision(recipe, device.type, images)
    try:
        rule = build_rule(recipe.rule.rule_class or recipe.rule.name, recipe.rule.options, model,
                          rule_context(recipe, device, num_classes, input_shape, compiled))
    except RuleError as err:
        raise recipe.origins.blame(ConfigError(f"[rule] (rule {recipe.rule.name!r}): {err}"), "rule.name") from None
    rule.check_divergence = False  # the loop decides, alike on every rank (after an all-reduce)
    return Trainee(model, rule, build_optimizer(recipe.optim, model, rule), channels_last, [memory_format_note, compile_note])


def build_session(recipe: Recipe) -> Session:
    """Build everything from a recipe; under torchrun, join the job and shard the data.

    Errors about the data or about what the rule can do with the model come back as ConfigError
    naming the recipe file and its section, or the ``--set`` that set the key they name
    (``recipe.origins``).
    """
    cfg = recipe.train
    kind: type[Layout] = Pipeline if cfg.pipeline_stages > 1 else Layout  # sizes the loader before it is built
    env = init_distributed(torch.device(device_name(cfg.device)).type, cfg.pipeline_stages,
                           kind.collective_timeout(cfg))
    device = resolve_device(cfg.device, env.local_rank)
    torch.manual_seed(cfg.seed)
    batch_size = kind.loader_batch_size(cfg, is_forward_only(recipe))
    try:
        data = build_data(recipe.data, device, batch_size, cfg.eval_batch_size, cfg.seed, env.replica, env.replicas)
    except ConfigError as err:
        raise recipe.origins.blame(err) from None
    images = cfg.epochs * len(data.train) * batch_size  # what this process trains on in the whole run
    trainee = build_trainee(recipe, device, data.input_shape, data.num_classes, images, batch_size)
    model, rule, optimizer = trainee.model, trainee.rule, trainee.optimizer
    if env.enabled:
        broadcast_state([model, rule])
    if env.replicas > 1:
        average_gradients_before_step(optimizer, env.replicas, env.replica_group)
    try:
        layout = kind.build(rule, model, env, cfg, data.input_shape, optimizer)
    except (ConfigError, RuleError) as err:  # a pipeline the rule or model cannot be split into
        raise ConfigError(f"{recipe.source}: [train] pipeline_stages = {cfg.pipeline_stages} with rule "
                          f"{recipe.rule.name!r}: {err}") from None
    torch.manual_seed(cfg.seed + env.rank)  # ranks draw different randomness (e.g. probes) from here on
    total = cfg.epochs * len(data.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(recipe.optim, step, total))
    files = data_fingerprints(recipe)
    notes = [*trainee.notes, *filter(None, [same_data_note(files), cpu_bf16_note(rule.ctx.amp, device.type)])]
    return Session(recipe, device, data, model, rule, optimizer, scheduler, total, env, layout, files, notes,
                   trainee.channels_last)


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


def same_data_note(files: dict[str, dict[str, Any]]) -> str | None:
    """A note when ``data.test_path`` holds the very bytes of ``data.path`` (the same file, or a copy:
    ``files`` are ``data_fingerprints``), or None: the run's "test" accuracy is then measured on the
    images it trains on, and reads as a perfect generalisation."""
    train, test = files.get("data.path"), files.get("data.test_path")
    if train is None or test is None or train["sha256"] != test["sha256"]:
        return None
    same = "is data.path" if os.path.samefile(train["file"], test["file"]) else \
        f"holds the same bytes as data.path {train['file']} (sha256 {test['sha256'][:12]}…)"
    return (f"data.test_path {test['file']} {same}: the test accuracy is measured on training images; give "
            "held-out images as test_path, or leave it unset to hold out val_fraction of data.path")


def is_forward_only(recipe: Recipe) -> bool:
    """Whether the recipe's rule updates each unit right after its own forward (drtp, tpsgd): its
    ``forward_only`` option where it has one, else its class's declaration (a python: rule's)."""
    declared = getattr(recipe.rule.options, "forward_only", None)
    cls = recipe.rule.rule_class or rule_class(recipe.rule.name)
    return bool(declared if declared is not None else getattr(cls, "forward_only", False))
