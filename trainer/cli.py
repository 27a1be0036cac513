"""The ``trainer`` command: run, eval, list and show recipes.

Exit codes: 0 success, 2 bad input (recipe, override, file, data), 3 training diverged,
130 interrupted. Bad input is reported in one line, without a traceback.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from trainer.checkpoint import load_checkpoint
from trainer.config import ConfigError, Recipe, dump_toml
from trainer.data import DeviceLoader, Images, build_data, load_images, load_npz
from trainer.loop import TrainingDiverged, evaluate, train
from trainer.recipes import builtin_recipes, describe, find_recipe, load_recipe
from trainer.session import trained_model

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    table = Table(title="built-in recipes")
    table.add_column("recipe")
    table.add_column("what it does")
    for name, path in builtin_recipes().items():
        table.add_row(name, describe(path))
    console.print(table)
    return 0


def cmd_show(args: argparse.Namespace, console: Console) -> int:
    recipe = load_recipe(find_recipe(args.recipe), args.set)
    console.print(Syntax(dump_toml(recipe.to_dict()), "toml", theme="ansi_dark"))
    return 0


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    path = find_recipe(args.recipe)
    recipe = load_recipe(path, args.set)
    out = Path(args.out) if args.out else Path("runs") / path.stem
    train(recipe, out, resume=args.resume, console=console)
    return 0


def _eval_images(spec: str, recipe: Recipe) -> tuple[Images, str]:
    """The images named by ``--data`` (a whole .npz file, or another source's test split)."""
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
    data_cfg = recipe.data.__class__(**{**recipe.data.__dict__, "name": kind, "root": arg, "download": False})
    _, test, split = load_images(data_cfg)
    return test, f"{kind} {split}"


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    trained = trained_model(load_checkpoint(args.run), source=args.run)
    recipe, shape, num_classes = trained.recipe, trained.input_shape, trained.num_classes
    if args.data is None and recipe.data.name == "imagefolder":
        loader, name = build_data(recipe.data, trained.device, 1, recipe.train.eval_batch_size, 0).test, "imagefolder val"
    else:
        if args.data:
            images, name = _eval_images(args.data, recipe)
        else:
            _, images, split = load_images(recipe.data)
            name = f"{recipe.data.name} {split}"
        if tuple(images.x.shape[1:]) != shape:
            raise ConfigError(f"--data {name}: images are {tuple(images.x.shape[1:])} (C, H, W) but the model was "
                              f"trained on {shape}")
        if int(images.y.max()) >= num_classes:
            raise ConfigError(f"--data {name}: label {int(images.y.max())} is out of range for {num_classes} classes")
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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train a recipe")
    run.add_argument("recipe", help="a recipe file, or the name of a built-in recipe")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe value, e.g. --set train.epochs=3 (repeatable)")
    run.add_argument("--out", help="run folder (default: runs/RECIPE_NAME)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    ev = sub.add_parser("eval", help="evaluate a run folder or checkpoint")
    ev.add_argument("run", help="a run folder or a checkpoint file")
    ev.add_argument("--data", help="another data set: npz:PATH, mnist5k, mnist:ROOT, cifar10:ROOT, cifar100:ROOT")
    ev.add_argument("--json", action="store_true", help="print the result as a JSON object on the last line")
    sub.add_parser("list", help="list the built-in recipes")
    show = sub.add_parser("show", help="print a recipe as resolved (defaults filled in)")
    show.add_argument("recipe")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    console = Console(stderr=args.command == "eval" and args.json)  # keep stdout's last line JSON
    errors = Console(stderr=True, soft_wrap=True)  # one line per error, never hard-wrapped
    commands = {"run": cmd_run, "eval": cmd_eval, "list": cmd_list, "show": cmd_show}
    try:
        return commands[args.command](args, console)
    except ConfigError as err:
        errors.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        return EXIT_BAD_INPUT
    except TrainingDiverged as err:
        errors.print(f"[bold red]stopped:[/] {escape(str(err))}", highlight=False)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        errors.print("[yellow]interrupted[/]: the last epoch's checkpoint is kept; continue with --resume")
        return EXIT_INTERRUPTED
