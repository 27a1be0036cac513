"""Recipes: TOML files validated into typed config objects, with ``key=value`` overrides.

A recipe has the sections ``[data]``, ``[model]``, ``[rule]``, ``[optim]`` and ``[train]``. Each
maps to a dataclass below; the ``[rule]`` section holds ``name`` plus the options of that rule,
whose schema each rule declares and which the caller passes in (``trainer.recipes`` passes the
trainer's rules), so this module imports nothing of the trainer. Every problem raises
``ConfigError`` naming the file, the key and what is allowed, so the CLI can print it without a
traceback.
"""

from __future__ import annotations

import codecs
import dataclasses
import importlib
import json
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says where and what is allowed.

    A message that is about one key begins with it, "[section] key: ..." (the convention of every
    message in the trainer), and ``key`` reads it back as "section.key" (else ""): what
    ``RecipeOrigins.blame`` needs to name the ``--set`` that set the key."""

    @property
    def key(self) -> str:
        named = re.match(r"\[(\w+)\] (\w+)", str(self))
        return f"{named[1]}.{named[2]}" if named else ""


def import_module(module_name: str, key: str) -> types.ModuleType:
    """The module of a ``python:`` model or rule, imported from the working directory (or an
    installed package); ConfigError naming the recipe ``key`` when it does not import."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 -- ImportError, or whatever the module raises while importing
        raise ConfigError(f"{key}: cannot import {module_name!r} from {os.getcwd()} "
                          f"({type(err).__name__}: {err})") from None


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented."""

    name: Literal["mnist5k", "mnist", "cifar10", "cifar100", "imagefolder", "npz"] = "mnist5k"
    root: str = ""  # folder of the torchvision data sets / of imagefolder's train/ and val/
    path: str = ""  # the .npz file for name = "npz"
    test_path: str = ""  # npz: a held-out .npz in the same format; then all of path trains (val_fraction may be 0)
    download: bool = False  # let torchvision download mnist/cifar into root
    val_fraction: float = 0.1  # held-out share, for sources that have no official test split
    split_seed: int = 0  # fixes which images are held out
    crop_padding: int = -1  # random-crop padding in pixels; -1: the source's default
    flip: bool | None = None  # random horizontal flips; unset: the source's default
    image_size: int = 224  # imagefolder: training crop and evaluation size
    num_workers: int = 4  # imagefolder: DataLoader workers
    num_classes: int = 0  # 0: the data set's own (10 for mnist/cifar10, ...; npz: inferred from the labels)
    train_subset: int = 0  # keep this many training images, class-balanced (seeded by split_seed); 0: all
    whiten: Literal["none", "gcn", "zca", "gcn_zca"] = "none"  # instead of per-channel normalisation (trainer.data.NormStats)
    zca_epsilon: float = 0.1  # ZCA: added to the covariance's eigenvalues, as a multiple of their mean
    input_noise: float = 0.0  # std of Gaussian noise added to every training batch after normalisation


def path_kind(path: Path, key: str) -> Literal["file", "folder", "missing"]:
    """What ``path`` names: a file, a folder or nothing. ConfigError naming ``key`` where the file
    system refuses the name itself (a part longer than its limit): ``Path.is_file`` raises then
    instead of answering, which would reach the user as a traceback."""
    try:
        return "file" if path.is_file() else "folder" if path.is_dir() else "missing"
    except OSError as err:
        longest = max((len(part) for part in path.parts), default=0)
        raise ConfigError(f"{key}: the file system refuses this name ({err.strerror}: its longest part has {longest} "
                          f"characters, most file systems allow 255): {path}; choose a shorter one") from None


def require_file(path: Path, key: str, what: str, suffix: str, missing: str = "does not exist") -> None:
    """ConfigError naming ``key`` unless ``path`` is a file: a folder is said to be one, with a file
    ending in ``suffix`` that it holds as the example of ``what`` belongs there; else ``missing``."""
    kind = path_kind(path, key)
    if kind == "folder":
        inside = sorted(path.glob(f"*{suffix}"))
        example = f"e.g. {inside[0]}" if inside else f"e.g. {path / ('name' + suffix)}"
        raise ConfigError(f"{key}: {path} is a folder, not {what}; name the file, {example}")
    if kind == "missing":
        raise ConfigError(f"{key}: {path} {missing}")


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file as a dict; ConfigError naming the file when it is not UTF-8 or not TOML. A UTF-8
    byte-order mark (Windows editors write one) is dropped: TOML forbids it, but it is no mistake."""
    data = path.read_bytes()
    text = data.removeprefix(codecs.BOM_UTF8)
    try:
        return tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as err:
        offset = err.start + len(data) - len(text)  # in the file, the mark included
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {offset}); "
                          "save the recipe as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


MAX_CLASSES = 1 << 20
"""Labels are class indices below this (a million classes; ImageNet-21k has 21,841): a larger one is
a wrapped or foreign value (a uint64 -1, an ID, a hash) whose classifier would not fit in memory."""

MAX_INPUT_NOISE = 10.0
"""``data.input_noise`` is a standard deviation added to inputs normalised to unit deviation: above
this the images are noise (SNR below 1 %), and the logits of such inputs blow the loss up, which
would then be blamed on the learning rate."""

BUILTIN_MODELS = ("mlp", "cnn", "rnn", "vit", "resnet18", "resnet34", "resnet50", "resnet20", "resnet32", "resnet56")


@dataclass
class ModelConfig:
    """Which network; the input shape and class count come from the data.

    ``name``: a built-in model, ``torchvision:BUILDER`` (any classification builder of
    torchvision.models, e.g. torchvision:vgg11_bn, built with weights=None), or
    ``python:package.module:factory`` (a factory of the user's, importable from the working
    directory, called with num_classes, input_shape and ``kwargs``).
    """

    name: str = "cnn"
    kwargs: dict[str, Any] = field(default_factory=dict)  # torchvision: and python: models: builder arguments
    batchnorm_momentum: float | None = None  # every BatchNorm's running-statistics momentum; unset: the model's own
    cifar_stem: bool = False  # torchvision resnets: 3x3 stride-1 first conv and no max-pool
    cifar_shortcut: Literal["conv", "pad"] = "conv"  # resnet20/32/56: shape-changing shortcut 1x1 conv + BN, or subsample and zero-pad
    weight_init: Literal["model", "xavier"] = "model"  # xavier: every conv and linear weight Xavier-uniform, biases 0 (biotorch's)
    hidden: list[int] = field(default_factory=lambda: [256, 256])  # mlp hidden widths
    activation: Literal["relu", "tanh"] = "relu"  # mlp and cnn hidden activation
    width: int = 32  # cnn: channels of the first conv (the second has twice as many)
    rnn_cell: Literal["elman", "gru", "lstm"] = "lstm"  # rnn: recurrent cell (elman: tanh RNN)
    rnn_hidden: int = 128  # rnn: hidden units of each recurrent layer
    rnn_layers: int = 2  # rnn: stacked recurrent layers (images are read row by row)
    vit_patch: int = 7  # vit: patch size (the image side must be a multiple of it)
    vit_depth: int = 4  # vit: transformer blocks (pre-norm)
    vit_width: int = 64  # vit: token width
    vit_heads: int = 4  # vit: attention heads (must divide the width)
    vit_mlp: int = 128  # vit: hidden width of each block's MLP

    def validate(self) -> None:
        kind, _, target = self.name.partition(":")
        if kind == "torchvision" and target:
            return
        if kind == "python" and target.count(":") == 1 and all(target.split(":")):
            return
        if self.name not in BUILTIN_MODELS:
            raise ValueError(f"name: expected one of {', '.join(map(repr, BUILTIN_MODELS))}, 'torchvision:BUILDER' "
                             f"or 'python:package.module:factory', got {self.name!r}")
        if self.kwargs:
            raise ValueError(f"kwargs: only torchvision: and python: models take kwargs; {self.name!r} has its "
                             "own keys ([model] hidden, width, ...)")


@dataclass
class RuleConfig:
    """The learning rule: ``name`` and that rule's own options (validated by the rule's schema)."""

    name: str = "bp"
    options: Any = None
    rule_class: type | None = field(default=None, compare=False, repr=False)  # resolved once, by parse_recipe


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"  # adam: L2 decay through Adam's moments (biotorch's); adamw: decoupled
    lr: float = 0.05
    momentum: float = 0.9  # sgd; Nesterov momentum when nesterov = true
    nesterov: bool = True
    weight_decay: float = 5e-4  # applied to weights of dimension >= 2 only (not to norms and biases)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    schedule: Literal["constant", "cosine", "onecycle"] = "cosine"
    warmup_fraction: float = 0.0  # linear warm-up over this share of all steps (constant and cosine)


@dataclass
class TrainConfig:
    """The loop: length, batch, precision, compilation, seeding and checkpoints."""

    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 512
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    compile: bool | None = None  # torch.compile the forward passes; unset: where measured to pay (trainer.speed_choice)
    amp: bool | None = None  # bf16 autocast; unset: on for CUDA
    channels_last: bool | None = None  # conv weights (hence activations) NHWC; unset: where measured to pay
    log_every: int = 20  # steps between progress-line metrics
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    pipeline_stages: int = 1  # S: units split into S contiguous stages, one per process (trainer.parallel)
    micro_batches: int = 1  # M: micro-batches a batch is split into as it flows through the stages
    stage_boundaries: list[str] = field(default_factory=list)  # the S-1 units that begin stages 2..S; empty: balanced by time
    rebalance: bool = True  # local rules, balanced cut: time the stages' first steps and move the cut once if one lags
    pipeline_schedule: Literal["gpipe", "1f1b"] = "1f1b"  # bp and trace_bp pipelines (torch.distributed.pipelining)
    stage_timeout: float = 300.0  # seconds a stage waits for a message before it ends the job


@dataclass(frozen=True)
class RecipeOrigins:
    """Where a recipe's values came from, recorded once, when it is read: its file, the ``--set``
    of each key an override set, and the rule and [optim] keys the file itself names (learning
    rates are tuned per rule: a ``--set rule.name`` keeps the file's other rule's settings). Every
    message that blames a key asks ``where``."""

    source: str = "<recipe>"  # the recipe file (or "<recipe>" for one built from a dict)
    sets: dict[str, str] = field(default_factory=dict)  # "section.key" -> the --set text that set it
    file_rule: str = "bp"  # the rule the file names
    file_optim_keys: tuple[str, ...] = ()  # the [optim] keys the file sets, in its order

    @property
    def name(self) -> str:
        """The recipe's name: its file's stem."""
        return Path(self.source).stem

    def where(self, key: str) -> str:
        """"--set TEXT" where an override set ``key`` ("section.key"), else the recipe file."""
        text = self.sets.get(key)
        return f"--set {text}" if text is not None else self.source

    def blame(self, err: ConfigError, key: str | None = None) -> ConfigError:
        """``err`` prefixed by where its key (``key``, else the one its message names) was set."""
        return ConfigError(f"{self.where(key or err.key)}: {err}")


@dataclass
class Recipe:
    """A whole recipe, as resolved from a TOML file and overrides."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str = "<recipe>"  # the file it came from, for error messages
    origins: RecipeOrigins = field(default_factory=RecipeOrigins, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (the rule's options flattened into ``[rule]``), ready for TOML."""
        out: dict[str, Any] = {}
        for section in ("data", "model", "optim", "train"):
            out[section] = dataclasses.asdict(getattr(self, section))
        out["rule"] = {"name": self.rule.name}
        if self.rule.options is not None:
            out["rule"].update(dataclasses.asdict(self.rule.options))
        return out


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(annotation)
        unset = " (or unset)" if type(None) in args else ""
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + unset
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"a list of {_type_name(item)}"
    if origin is dict:
        return "a table (e.g. {image_size = 32})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, str(annotation)
    )


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against ``annotation`` (TOML types; ints pass as floats); raise ConfigError."""
    origin = typing.get_origin(annotation)
    fail = ConfigError(f"{where}: expected {_type_name(annotation)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise fail
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise fail
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):  # TOML gives lists; code may pass a tuple
            raise fail
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:  # a TOML table of keyword arguments, passed on as read
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise fail
        return dict(value)
    accepts = {bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
               int: lambda v: isinstance(v, int) and not isinstance(v, bool),  # TOML's true is no number
               float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if annotation in accepts:
        if not accepts[annotation](value):
            raise fail
        return float(value) if annotation is float else value
    raise UnsupportedAnnotation(f"unsupported config annotation {annotation!r}")  # a schema bug, not a user error


class UnsupportedAnnotation(TypeError):
    """A dataclass field whose annotation is no TOML type (e.g. a callable): no recipe can set it."""


def build_section(cls: type, values: dict[str, Any], where: str, origins: dict[str, str] | None = None) -> Any:
    """Make the dataclass ``cls`` from a TOML table, rejecting unknown keys and wrong types.

    ``where`` prefixes every message (file and section); a key in ``origins`` is blamed on the
    prefix given there instead (the ``--set`` it came from, and the section)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name in hints]
    origins = origins or {}
    for key in sorted(set(values) - set(names)):
        allowed = f"allowed keys: {', '.join(names)}" if names else "it takes no keys"
        raise ConfigError(f"{origins.get(key, where)}: unknown key {key!r}; {allowed}")
    kwargs = {k: _coerce(v, hints[k], f"{origins.get(k, where)} {k}") for k, v in values.items()}
    return check_section(cls(**kwargs), where, origins)


def check_section(obj: Any, where: str, origins: dict[str, str] | None = None) -> Any:
    """Check a dataclass as ``build_section`` checks one read from a recipe, and return it: every
    field against its annotation (fields no recipe can set, ``UnsupportedAnnotation``, are left to
    their owner), then its ``validate()``. The recipe reader and the rule API
    (``trainer.rules.checks``) both check options here, so they accept and refuse the same values."""
    hints = typing.get_type_hints(type(obj))
    origins = origins or {}
    for f in dataclasses.fields(obj):
        if f.name in hints:
            try:
                _coerce(getattr(obj, f.name), hints[f.name], f"{origins.get(f.name, where)} {f.name}")
            except UnsupportedAnnotation:
                continue
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as err:  # validate() messages begin with the key ("key: ..." or "key must ..."):
            key = re.match(r"\w*", str(err))[0]  # blame its --set if it had one
            raise ConfigError(f"{origins.get(key, where)}: {err}") from None
    return obj


SEED_LIMIT = 2**32
SEED_RANGE = f"must be below 2**32 = {SEED_LIMIT} in magnitude (torch's generators take it with the epoch mixed in)"

Where = Callable[[str, str], str]
"""The prefix of a message about ``[section] key``: the file, or the ``--set`` that set the key."""


def _check_ranges(recipe: Recipe, where: Where) -> None:
    """Values that type-check but cannot work."""
    r = recipe
    checks: list[tuple[bool, str, str, str]] = [
        (r.train.epochs >= 1, "train", "epochs", "must be at least 1"),
        (abs(r.train.seed) < SEED_LIMIT, "train", "seed", SEED_RANGE),
        (abs(r.data.split_seed) < SEED_LIMIT, "data", "split_seed", SEED_RANGE),
        (r.train.batch_size >= 1, "train", "batch_size", "must be at least 1"),
        (r.train.eval_batch_size >= 1, "train", "eval_batch_size", "must be at least 1"),
        (0.0 <= r.train.label_smoothing < 1.0, "train", "label_smoothing", "must be in [0, 1)"),
        (r.train.log_every >= 1, "train", "log_every", "must be at least 1"),
        (r.train.eval_every >= 1, "train", "eval_every", "must be at least 1"),
        (r.train.pipeline_stages >= 1, "train", "pipeline_stages", "must be at least 1"),
        (r.train.micro_batches >= 1, "train", "micro_batches", "must be at least 1"),
        (r.train.batch_size % max(1, r.train.micro_batches) == 0, "train", "micro_batches",
         f"must divide train.batch_size = {r.train.batch_size}"),
        (not r.train.stage_boundaries or len(r.train.stage_boundaries) == r.train.pipeline_stages - 1, "train",
         "stage_boundaries", f"must name pipeline_stages - 1 = {r.train.pipeline_stages - 1} units (where stages "
         "2, 3, ... begin), or be empty (balanced by measured time)"),
        (r.train.stage_timeout > 0, "train", "stage_timeout", "must be positive (seconds)"),
        (not (r.train.channels_last is True and r.train.pipeline_stages > 1), "train", "channels_last",
         "is not supported with pipeline stages yet (a stage's messages assume the default layout): "
         "set train.channels_last = false or train.pipeline_stages = 1"),
        (r.train.pipeline_stages > 1 or (r.train.micro_batches == 1 and not r.train.stage_boundaries), "train",
         "micro_batches", "and stage_boundaries split a batch and the model over pipeline stages: set "
         "train.pipeline_stages > 1 (under torchrun) or leave them unset"),
        (r.optim.lr > 0, "optim", "lr", "must be positive"),
        (0.0 <= r.optim.momentum < 1.0, "optim", "momentum", "must be in [0, 1)"),
        (r.optim.weight_decay >= 0, "optim", "weight_decay", "must be non-negative"),
        (len(r.optim.betas) == 2 and all(0 <= b < 1 for b in r.optim.betas), "optim", "betas",
         "must be two numbers in [0, 1)"),
        (0.0 <= r.optim.warmup_fraction < 1.0, "optim", "warmup_fraction", "must be in [0, 1)"),
        (0.0 < r.data.val_fraction < 1.0 or (r.data.val_fraction == 0.0 and bool(r.data.test_path)), "data",
         "val_fraction", "must be in (0, 1), or 0 with a test_path (npz)"),
        (not r.data.test_path or r.data.name == "npz", "data", "test_path", "only name = 'npz' takes a test_path"),
        (r.data.crop_padding >= -1, "data", "crop_padding", "must be -1 (default) or >= 0"),
        (r.data.image_size >= 8, "data", "image_size", "must be at least 8"),
        (r.data.train_subset >= 0, "data", "train_subset", "must be 0 (every training image) or a count of images"),
        (r.data.zca_epsilon > 0, "data", "zca_epsilon", "must be positive (a multiple of the mean eigenvalue)"),
        (r.data.input_noise >= 0, "data", "input_noise", "must be non-negative (a standard deviation)"),
        (r.data.input_noise <= MAX_INPUT_NOISE, "data", "input_noise",
         f"must be at most {MAX_INPUT_NOISE:g} (a standard deviation in units of the normalised pixels, whose own "
         f"is 1: {r.data.input_noise:g} drowns the images and blows the logits up); lower it, e.g. 0.1"),
        (r.data.name != "imagefolder" or (r.data.whiten == "none" and not r.data.train_subset), "data", "whiten",
         "and train_subset apply to the small sources held in memory, not to name = 'imagefolder'"),
        (r.data.num_workers >= 0, "data", "num_workers", "must be non-negative"),
        (0 <= r.data.num_classes <= MAX_CLASSES, "data", "num_classes",
         f"must be 0 (the data set's own) or the number of classes, at most {MAX_CLASSES}"),
        (all(h >= 1 for h in r.model.hidden), "model", "hidden", "widths must be at least 1"),
        (r.model.width >= 1, "model", "width", "must be at least 1"),
        (r.model.rnn_hidden >= 1, "model", "rnn_hidden", "must be at least 1"),
        (r.model.rnn_layers >= 1, "model", "rnn_layers", "must be at least 1"),
        (r.model.batchnorm_momentum is None or 0 < r.model.batchnorm_momentum <= 1, "model", "batchnorm_momentum",
         "must be in (0, 1]"),
        (min(r.model.vit_patch, r.model.vit_depth, r.model.vit_width, r.model.vit_heads, r.model.vit_mlp) >= 1,
         "model", "vit_patch", "vit_patch, vit_depth, vit_width, vit_heads and vit_mlp must be at least 1"),
        (r.model.vit_width % max(r.model.vit_heads, 1) == 0, "model", "vit_heads",
         f"must divide vit_width = {r.model.vit_width}"),
        (re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", r.train.device) is not None, "train", "device",
         f"must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N a device index), got {r.train.device!r}"),
        (r.data.name != "npz" or bool(r.data.path), "data", "path", "name = 'npz' needs path = the .npz file"),
        (r.data.name not in ("mnist", "cifar10", "cifar100", "imagefolder") or bool(r.data.root), "data", "root",
         f"name = {r.data.name!r} needs root = its data folder"),
    ]
    for ok, section, key, message in checks:
        if not ok:
            raise ConfigError(f"{where(section, key)}: [{section}] {key}: {message}")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, where: str) -> tuple[str, str]:
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{where}: override key {dotted!r} must look like section.key, e.g. train.epochs")
    section, key = parts
    if section not in (*SECTIONS, "rule"):
        raise ConfigError(f"{where}: unknown section {section!r}; sections: data, model, rule, optim, train")
    table = tree.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: {section} in the recipe is not a table [{section}]")
    table[key] = value
    return section, key


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``section.key=value``; the value is read as TOML (so 3, 0.1, true, [1, 2], "s")."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: take it as a string (e.g. rule.name=dfa)
    return key.strip(), value


RuleRegistry = Callable[[str], type]
"""The rule registry: a rule's name to its class, whose ``Options`` dataclass is the ``[rule]``
schema; KeyError (with the known names) for an unknown rule, ConfigError for a ``python:`` rule it
cannot use. ``trainer.rules.rule_class`` is the trainer's. The class is resolved here, once, and
kept in ``RuleConfig.rule_class`` for the session that builds the rule."""


def _named_by_file(tree: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """The rule a recipe tree names and its [optim] keys (empty where a section is not a table)."""
    rule, optim = tree.get("rule"), tree.get("optim")
    return (str(rule.get("name", "bp")) if isinstance(rule, dict) else "bp",
            tuple(optim) if isinstance(optim, dict) else ())


def parse_recipe(tree: dict[str, Any], rules: RuleRegistry, source: str = "<recipe>",
                 origins: RecipeOrigins | None = None) -> Recipe:
    """Validate a nested dict (as read from TOML) into a Recipe; ``[rule]`` by the schema of the
    rule class ``rules`` names.
    ``origins`` (``read_recipe``'s) says which ``--set`` set which key: its errors name that."""
    origins = origins or RecipeOrigins(source, {}, *_named_by_file(tree))

    def where(section: str, key: str) -> str:
        return origins.where(f"{section}.{key}")

    unknown = sorted(set(tree) - {*SECTIONS, "rule"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown section [{unknown[0]}]; sections: [data], [model], [rule], [optim], [train]"
        )
    for name, value in tree.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} must be a table [{name}], got {value!r}")

    def section(cls: type, name: str, values: dict[str, Any], label: str) -> Any:
        blamed = {key: f"{where(name, key)}: {label}" for key in values if f"{name}.{key}" in origins.sets}
        return build_section(cls, values, f"{source}: {label}", blamed)

    sections = {name: section(cls, name, tree.get(name, {}), f"[{name}]") for name, cls in SECTIONS.items()}
    rule_values = dict(tree.get("rule", {}))
    rule_name = rule_values.pop("name", "bp")
    if not isinstance(rule_name, str):
        raise ConfigError(f"{where('rule', 'name')}: [rule] name: expected a string, got {rule_name!r}")
    try:
        rule_cls = rules(rule_name)
    except KeyError as err:
        raise ConfigError(f"{where('rule', 'name')}: [rule] name: {err.args[0]}") from None
    except ConfigError as err:  # a python: rule that does not import or is no rule
        raise ConfigError(f"{where('rule', 'name')}: {err}") from None
    options_cls = rule_cls.Options
    if rule_values and not dataclasses.fields(options_cls):
        key = sorted(rule_values)[0]
        raise ConfigError(f"{where('rule', key)}: [rule] {key}: rule {rule_name!r} has no options; remove the key")
    options = section(options_cls, "rule", rule_values, f"[rule] (rule {rule_name!r})")
    recipe = Recipe(rule=RuleConfig(rule_name, options, rule_cls), source=source, origins=origins, **sections)
    _check_ranges(recipe, where)
    return recipe


def require_recipe_file(path: Path) -> None:
    """ConfigError unless ``path`` is a file: a folder (naming a recipe in it), missing, or a name too long."""
    require_file(path, "recipe", "a recipe file (.toml)", ".toml",
                 missing="does not exist (recipe file not found; see `trainer list` for the built-in recipes)")


def read_recipe(path: str | Path, rules: RuleRegistry, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a TOML recipe, apply ``section.key=value`` overrides, and validate the result."""
    path = Path(path)
    require_recipe_file(path)
    tree = read_toml(path)
    named = _named_by_file(tree)
    sets: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        section, name = _set_dotted(tree, key, value, f"--set {text}")
        sets[f"{section}.{name}"] = text
    origins = RecipeOrigins(str(path), sets, *named)
    return parse_recipe(tree, rules, source=str(path), origins=origins)


def recipe_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two recipes in ``Recipe.to_dict`` form."""
    return [f"{section}.{key}" for section in sorted(set(saved) | set(new))
            for key in sorted(set(saved.get(section, {})) | set(new.get(section, {})))
            if saved.get(section, {}).get(key) != new.get(section, {}).get(key)]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's string escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def dump_toml(tree: dict[str, dict[str, Any]]) -> str:
    """Write a two-level dict of scalars and lists as TOML; unset (None) values are left out."""
    lines: list[str] = []
    for section, values in tree.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None)
        lines.append("")
    return "\n".join(lines)
