"""Recipes by name or path, read with the rules' option schemas.

``trainer.config`` validates a recipe against the schemas it is given and imports nothing of the
trainer; this module hands it the rule registry (``trainer.rules.rule_class``) and knows
where the built-in recipes live. Read recipes through here: ``load_recipe(path, overrides)``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from trainer import config
from trainer.config import ConfigError, Recipe


def _rule_class(name: str) -> type:
    from trainer.rules import rule_class  # noqa: PLC0415 -- imported on first use: `trainer list` needs no torch

    return rule_class(name)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a TOML recipe, apply ``section.key=value`` overrides, and validate the result."""
    return config.read_recipe(path, _rule_class, overrides)


def recipe_from_dict(tree: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate a nested dict (as read from TOML, or saved in a checkpoint) into a Recipe."""
    return config.parse_recipe(tree, _rule_class, source)


def recipe_dirs() -> list[Path]:
    """Where built-in recipes live: the source checkout, then the installed data files."""
    return [Path(__file__).resolve().parent.parent / "recipes", Path(sys.prefix) / "share" / "bpfree-trainer" / "recipes"]


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipes by name (file stem); a checkout's own recipes shadow installed ones."""
    found: dict[str, Path] = {}
    for folder in recipe_dirs():
        for path in sorted(folder.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def find_recipe(name: str) -> Path:
    """A recipe file path, or the name of a built-in recipe (with or without .toml)."""
    path = Path(name)
    kind = config.path_kind(path, "recipe")
    if kind == "file":
        return path
    builtin = builtin_recipes().get(path.name.removesuffix(".toml"))
    if builtin is not None:  # a folder of the same name does not hide it
        return builtin
    if kind == "folder":
        config.require_recipe_file(path)  # raises, saying it is a folder
    raise ConfigError(f"{name}: no such recipe file or built-in recipe (see `trainer list`)")


def describe(path: Path) -> str:
    """A recipe's one-line description: its first comment line."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
