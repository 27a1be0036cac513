"""The ``trainer`` command: run, eval, export, list, show, runs and plot. ``export`` writes a run's
trained model alone (weights, recipe, normalisation statistics; no optimizer state), which ``eval``
reads as it reads a run folder: a file small enough to release beside a result.

Exit codes: 0 success, 2 bad input (recipe, override, file, data, run folder), 3 training
diverged, 130 interrupted (SIGINT), 143 terminated (SIGTERM). Bad input is reported in one line,
without a traceback. ``--help``, ``--version`` and ``list`` do not import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from trainer import __version__
from trainer.config import ConfigError, Recipe, dump_toml
from trainer.errors import RunInterrupted, StageFailed, TrainingDiverged
from trainer.recipes import builtin_recipes, describe, find_recipe, load_recipe

if TYPE_CHECKING:
    from trainer.data import Images

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_STAGE_FAILED, EXIT_INTERRUPTED = 2, 3, 4, 130


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    recipes = builtin_recipes()
    if not console.is_terminal:  # one line per recipe, for grep and logs
        width = max(map(len, recipes), default=0)
        for name, path in recipes.items():
            console.print(f"{name:<{width}}  {describe(path)}", soft_wrap=True, highlight=False, markup=False)
        return 0
    table = Table(title="built-in recipes")
    table.add_column("recipe")
    table.add_column("what it does")
    for name, path in recipes.items():
        table.add_row(name, describe(path))
    console.print(table)
    return 0


def cmd_show(args: argparse.Namespace, console: Console) -> int:
    from trainer.session import effective_recipe

    recipe = load_recipe(find_recipe(args.recipe), args.set)
    text = f"# {recipe.source}, as a run on this machine uses it (unset values resolved)\n"
    console.print(Syntax(text + dump_toml(effective_recipe(recipe)), "toml", theme="ansi_dark", word_wrap=True))
    return 0


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from trainer.loop import train
    from trainer.run_folder import auto_out

    path = find_recipe(args.recipe)
    recipe = load_recipe(path, args.set)
    if args.out == "auto":
        out = auto_out(path.stem)
    else:
        out = Path(args.out) if args.out else Path("runs") / path.stem
    try:
        train(recipe, out, resume=args.resume, console=console)
    except (ConfigError, TrainingDiverged, StageFailed):
        raise
    except Exception as err:
        failure = _user_rule_failure(err, recipe.rule.name)
        if failure is None:
            raise
        raise ConfigError(f"{recipe.origins.where('rule.name')}: [rule] name: {failure}") from None
    return 0


def _user_rule_failure(err: Exception, name: str) -> str | None:
    """What a ``python:`` rule's own code raised while training, in one line naming where, or None
    for an error that did not pass through it (the trainer's own bugs keep their traceback). A
    ``RuleError`` in training is the trainer's check of what a hook of the rule returned."""
    if not name.startswith("python:"):
        return None
    from trainer.rules import RuleError, rule_class

    if isinstance(err, RuleError):
        return f"rule {name} broke the rule contract in training: {' '.join(str(err).split())}"
    own = {cls.__module__ for cls in rule_class(name).__mro__
           if not cls.__module__.startswith(("trainer.", "torch.", "builtins", "abc"))}
    frames = [(frame, line) for frame, line in traceback.walk_tb(err.__traceback__)
              if frame.f_globals.get("__name__") in own]
    if not frames:
        return None
    frame, line = frames[-1]  # the innermost line of the rule's own code
    path = frame.f_code.co_filename
    with contextlib.suppress(ValueError):  # another drive (Windows)
        path = os.path.relpath(path)
    message = " ".join(str(err).split())
    return (f"rule {name} raised {type(err).__name__} in training: {message} (in {frame.f_code.co_name}(), "
            f"{path}:{line}); fix the rule there")


def _eval_images(spec: str, recipe: Recipe) -> tuple["Images", str]:
    """The images named by ``--data`` (a whole .npz file, or another source's test split)."""
    from trainer.data import load_images, load_npz

    kind, _, arg = spec.partition(":")
    if kind == "npz":
        if not arg:
            raise ConfigError("--data npz:PATH needs the path of the .npz file")
        return load_npz(arg, key="--data"), f"npz:{arg}"
    sources = ("mnist5k", "mnist", "cifar10", "cifar100")
    if kind not in sources:
        raise ConfigError(f"--data {spec!r}: expected npz:PATH, mnist5k, or mnist|cifar10|cifar100:ROOT")
    if kind != "mnist5k" and not arg:
        raise ConfigError(f"--data {kind}:ROOT needs the folder that holds the data set")
    data_cfg = dataclasses.replace(recipe.data, name=kind, root=arg, download=False)
    try:
        _, test, split = load_images(data_cfg, can_download=False)
    except ConfigError as err:
        raise ConfigError(f"--data {spec}: {err}") from None
    return test, f"{kind} {split}"


def _recipe_toml_note(run: Path, saved: Recipe) -> str | None:
    """What a run folder's recipe.toml says otherwise than the recipe saved in its checkpoint, which
    eval uses (the checkpoint's model was built from it), or None."""
    from trainer.config import recipe_changes

    path = run / "recipe.toml"
    if not path.is_file():
        return None
    try:
        changed = recipe_changes(saved.to_dict(), load_recipe(path).to_dict())
    except ConfigError:
        changed = ["(it is not a valid recipe)"]
    if not changed:
        return None
    return (f"{path} differs from the recipe saved in the checkpoint ({', '.join(changed[:4])}); eval uses the "
            f"checkpoint's own: model {saved.model.name}, rule {saved.rule.name}")


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    import torch

    from trainer.checkpoint_file import MODEL_KEYS, NOTE_KEY, load_checkpoint
    from trainer.data import DeviceLoader, build_data, load_images
    from trainer.evaluation import evaluate, trained_model

    payload = load_checkpoint(args.run, keys=MODEL_KEYS)  # a run's checkpoint or an exported model
    trained = trained_model(payload, source=args.run, device_flag=args.device)
    recipe, shape, num_classes = trained.recipe, trained.input_shape, trained.num_classes
    for note in (payload.get(NOTE_KEY), _recipe_toml_note(Path(args.run), recipe)):
        if note:
            console.print(f"[dim]note:[/] {escape(note)}", soft_wrap=True, highlight=False)
    if args.data is None and recipe.data.name == "imagefolder":
        loader, name = build_data(recipe.data, trained.device, 1, recipe.train.eval_batch_size, 0).test, "imagefolder val"
    else:
        if args.data:
            images, name = _eval_images(args.data, recipe)
        else:
            _, images, split = load_images(recipe.data, can_download=False)
            name = f"{recipe.data.name} {split}"
        if not len(images.y):
            raise ConfigError(f"--data {name}: holds no images")
        if tuple(images.x.shape[1:]) != shape:
            raise ConfigError(f"--data {name}: images are {tuple(images.x.shape[1:])} (C, H, W) but the model was "
                              f"trained on {shape}")
        if int(images.y.max()) >= num_classes:
            raise ConfigError(f"--data {name}: label {int(images.y.max())} is out of range for the model's "
                              f"{num_classes} classes")
        loader = DeviceLoader(images, recipe.train.eval_batch_size, trained.device, trained.stats, train=False)
    result = evaluate(trained.model, loader, torch.nn.CrossEntropyLoss())
    result = {"data": name, "samples": loader.num_samples, **result, "epoch": trained.epoch, "step": trained.step}
    table = Table(title=f"evaluation of {args.run}")
    for key in ("data", "samples", "accuracy", "loss"):
        table.add_column(key, justify="right")
    table.add_row(name, str(result["samples"]), f"{100 * result['accuracy']:.2f}%", f"{result['loss']:.4f}")
    console.print(table)
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    """Write what ``trainer eval`` needs of a run (its plain model's weights, the recipe, the data's
    normalisation, class count and input shape, epoch and step) with a digest: the rule's feedback
    state, the optimizer, scheduler and RNG states stay behind, as only a resume needs them."""
    from kernels import strip_feedback
    from trainer.checkpoint_file import (EXPORTED_KIND, MODEL_KEYS, NOTE_KEY, load_checkpoint, resolve_checkpoint,
                                         save_checkpoint)
    from trainer.evaluation import trained_model

    out = Path(args.out)
    try:
        is_dir = out.is_dir()
    except OSError as err:  # a name too long for the file system
        raise ConfigError(f"{out}: cannot be a file here ({err.strerror}); choose another OUT") from None
    if is_dir:
        raise ConfigError(f"{out}: is a folder; name the file to write, e.g. {out / 'model.pt'}")
    if not out.parent.is_dir():
        raise ConfigError(f"{out}: its folder {out.parent} does not exist; create it, or write the file elsewhere")
    source = resolve_checkpoint(args.run)
    if out.exists() and out.samefile(source):
        raise ConfigError(f"{out}: is the checkpoint being exported; write the exported model to another file")
    payload = load_checkpoint(source, keys=MODEL_KEYS)  # verified: a damaged or foreign file is refused here
    if NOTE_KEY in payload:
        console.print(f"[dim]note:[/] {escape(payload[NOTE_KEY])}", soft_wrap=True, highlight=False)
    exported = {"kind": EXPORTED_KIND, "recipe": payload["recipe"], "epoch": payload["epoch"], "step": payload["step"],
                "model": strip_feedback(payload["model"]),
                "data": {key: value for key, value in payload["data"].items() if key != "files"}}
    trained_model(exported, source=str(source), device_flag="cpu")  # eval will build and load it
    save_checkpoint(out, exported, fix="free some space or choose another OUT")
    console.print(f"wrote {escape(str(out))} ({out.stat().st_size:,} bytes: the model of epoch {payload['epoch']}, "
                  f"its recipe and normalisation; trainer eval {escape(str(out))})", soft_wrap=True, highlight=False)
    return 0


def cmd_runs(args: argparse.Namespace, console: Console) -> int:
    from trainer.runs import find_runs, summarize

    runs = [summarize(path) for path in find_runs(Path(args.dir))]
    table = Table(title=f"runs under {args.dir}")
    for column in ("run", "recipe", "rule", "epochs", "best acc", "last acc", "images/s", "state"):
        table.add_column(column, justify="right" if column in ("epochs", "best acc", "last acc", "images/s") else "left")

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    for r in runs:
        table.add_row(escape(str(r.path)), escape(r.recipe), escape(r.rule), f"{r.epochs_done}/{r.epochs or '?'}",
                      pct(r.best), pct(r.last), "-" if r.images_per_s is None else f"{r.images_per_s:,.0f}",
                      escape(r.state))
    console.print(table)
    return 0


def cmd_plot(args: argparse.Namespace, console: Console) -> int:
    from trainer.runs import plot_runs

    runs = [Path(run) for run in args.runs]
    out = Path(args.out) if args.out else runs[0] / f"{args.metric}.png"
    for warning in plot_runs(runs, args.metric, out):
        console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True, highlight=False)
    console.print(f"wrote {escape(str(out))}", soft_wrap=True, highlight=False)
    return 0


def _device(text: str) -> str:
    """``--device``: a value that ``[train] device`` takes."""
    if re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", text) is None:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N (N a device index), got {text!r}")
    return text


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description="Train, evaluate and compare recipes of backprop-free and low-memory learning rules.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train a recipe")
    run.add_argument("recipe", help="a recipe file, or the name of a built-in recipe")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe value, e.g. --set train.epochs=3 (repeatable)")
    run.add_argument("--out", help="run folder (default: runs/RECIPE_NAME; 'auto': runs/RECIPE_NAME-TIMESTAMP)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    ev = sub.add_parser("eval", help="evaluate a run folder, checkpoint or exported model")
    ev.add_argument("run", help="a run folder, a checkpoint file, or a model written by trainer export")
    ev.add_argument("--data", help="another data set: npz:PATH, mnist5k, mnist:ROOT, cifar10:ROOT, cifar100:ROOT")
    ev.add_argument("--json", action="store_true", help="print the result as a JSON object on the last line")
    ev.add_argument("--device", type=_device, help="evaluate on this device (auto, cpu, cuda, cuda:N) instead of "
                    "the one it trained on, e.g. a GPU-trained run on a machine without one")
    export = sub.add_parser("export", help="write a run's trained model alone (weights, recipe, normalisation; "
                            "no optimizer state), for trainer eval")
    export.add_argument("run", help="a run folder or its checkpoint file")
    export.add_argument("out", help="the file to write, e.g. model.pt (its folder must exist)")
    sub.add_parser("list", help="list the built-in recipes")
    show = sub.add_parser("show", help="print a recipe as a run on this machine uses it (defaults filled in)")
    show.add_argument("recipe")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    runs = sub.add_parser("runs", help="a table of the runs under a folder, with their states")
    runs.add_argument("dir", nargs="?", default="runs", help="the folder to search (default: runs)")
    plot = sub.add_parser("plot", help="training and held-out curves of one or more runs (needs matplotlib)")
    plot.add_argument("runs", nargs="+", help="run folders")
    plot.add_argument("--metric", choices=("accuracy", "loss"), default="accuracy")
    plot.add_argument("--out", help="the image to write, in the format its ending names (.png, .pdf, .svg, ...; "
                      "default: RUN/METRIC.png of the first run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    console = Console(stderr=args.command == "eval" and args.json, emoji=False)  # keep stdout's last line JSON
    if not console.is_terminal:
        console = Console(stderr=console.stderr, width=160, soft_wrap=True, emoji=False)  # logs: no 80-column wraps
    errors = Console(stderr=True, soft_wrap=True, emoji=False)  # one line per error, never hard-wrapped
    commands = {"run": cmd_run, "eval": cmd_eval, "export": cmd_export, "list": cmd_list, "show": cmd_show,
                "runs": cmd_runs, "plot": cmd_plot}
    try:
        return commands[args.command](args, console)
    except ConfigError as err:
        return _fail(errors, "[bold red]error:[/]", str(err), EXIT_BAD_INPUT)
    except TrainingDiverged as err:
        return _fail(errors, "[bold red]stopped:[/]", str(err), EXIT_DIVERGED)
    except StageFailed as err:
        return _fail(errors, "[bold red]stopped:[/]", str(err), EXIT_STAGE_FAILED)
    except RunInterrupted as stop:
        return _interrupted(errors, "[yellow]interrupted:[/]", stop.message, stop.exit_code, argv is None)
    except KeyboardInterrupt:  # outside a run (loading data, evaluating)
        return _interrupted(errors, "[yellow]interrupted[/]", "", EXIT_INTERRUPTED, argv is None)


def _interrupted(errors: Console, label: str, message: str, code: int, program: bool) -> int:
    """``_fail`` for an interrupted command, after which the program only exits: another Ctrl-C is
    held off while the line is printed, then ends the process at once (the default action, exit
    status 130) instead of raising KeyboardInterrupt inside an exit hook (torch's finalizers), whose
    traceback would follow the line. Only where ``main`` is the program (``program``: it read the
    command line); a caller's own process keeps its handler."""
    own = program and threading.current_thread() is threading.main_thread()
    if own:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = _fail(errors, label, message, code)
    if own:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return code


def _fail(errors: Console, label: str, message: str, code: int) -> int:
    """Print the one line of an error and return its exit code. Under torchrun the line also goes
    to the worker's error file, so that torchrun's failure report names it as the root cause."""
    line = f"{label} {escape(message)}".rstrip()
    errors.print(line, highlight=False)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):
            message = {"message": Text.from_markup(line).plain, "extraInfo": {"timestamp": str(int(time.time()))}}
            Path(error_file).write_text(json.dumps({"message": message}))  # torchelastic's ErrorHandler format
    return code
