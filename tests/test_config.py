"""Recipe validation: every mistake names the file, the key and what is allowed."""

from pathlib import Path

import pytest

from trainer.cli import main
from trainer.config import ConfigError, parse_override
from trainer.recipes import builtin_recipes, load_recipe
from trainer.rules import RULES

from conftest import write_recipe


def error_of(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def test_valid_recipe_is_typed(tmp_path, tiny_npz):
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", tiny_npz), ["train.epochs=3", "optim.lr=1", "model.hidden=[8, 4]"])
    assert recipe.train.epochs == 3
    assert recipe.optim.lr == 1.0 and isinstance(recipe.optim.lr, float)
    assert recipe.model.hidden == [8, 4]


@pytest.mark.parametrize(
    "section, values, expected",
    [
        ("train", {"epoch": 3}, "[train]: unknown key 'epoch'; allowed keys: epochs"),
        ("train", {"epochs": "ten"}, "[train] epochs: expected an integer, got 'ten'"),
        ("train", {"epochs": 0}, "[train] epochs: must be at least 1"),
        ("optim", {"name": "lbfgs"}, "[optim] name: expected one of 'sgd', 'adam', 'adamw', got 'lbfgs'"),
        ("optim", {"lr": -1.0}, "[optim] lr: must be positive"),
        ("data", {"val_fraction": 1.5}, "[data] val_fraction: must be in (0, 1)"),
        ("rule", {"name": "magic"}, "[rule] name: unknown rule 'magic'; rules: "),
        ("rule", {"granularity": "layer"}, "[rule] granularity: rule 'bp' has no options; remove the key"),
        ("model", {"name": "vgg"}, "[model]: name: expected one of"),
        ("train", {"compile": "yes"}, "[train] compile: expected true or false (or unset), got 'yes'"),
        ("train", {"pipeline_stages": 2, "micro_batches": 3}, "[train] micro_batches: must divide train.batch_size = 32"),
        ("train", {"micro_batches": 2}, "[train] micro_batches: and stage_boundaries split a batch"),
        ("train", {"pipeline_stages": 3, "stage_boundaries": ["1"]}, "[train] stage_boundaries: must name "
         "pipeline_stages - 1 = 2 units"),
        ("train", {"pipeline_stages": 2, "pipeline_schedule": "zb"}, "[train] pipeline_schedule: expected one of "
         "'gpipe', '1f1b'"),
    ],
)
def test_bad_values_name_file_key_and_allowed(tmp_path, tiny_npz, section, values, expected):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, **{section: values})
    message = error_of(path)
    assert str(path) in message
    assert expected in message


def test_unknown_section_and_missing_file(tmp_path, tiny_npz):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, trian={"epochs": 1})
    assert "unknown section [trian]" in error_of(path)
    assert "recipe file not found" in error_of(tmp_path / "missing.toml")


def test_npz_needs_path_and_the_file_must_exist(tmp_path, tiny_npz):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, data={"path": ""})
    assert "[data] path: name = 'npz' needs path" in error_of(path)


def test_overrides_are_typed_by_the_schema(tmp_path, tiny_npz):
    path = write_recipe(tmp_path / "r.toml", tiny_npz)
    assert "[train] epochs: expected an integer, got 2.5" in error_of(path, ("train.epochs=2.5",))
    assert "unknown section 'trainn'" in error_of(path, ("trainn.epochs=2",))
    assert "must look like section.key" in error_of(path, ("epochs=2",))
    assert parse_override("rule.name=dfa") == ("rule.name", "dfa")
    assert parse_override("model.hidden=[1, 2]") == ("model.hidden", [1, 2])


def test_builtin_recipes_all_validate():
    recipes = builtin_recipes()
    assert "quickstart" in recipes
    for name, path in recipes.items():
        recipe = load_recipe(path)
        assert recipe.source == str(path), name
        assert isinstance(recipe.rule.options, RULES[recipe.rule.name].Options), name


def test_cli_exit_code_2_without_traceback(tmp_path, tiny_npz, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": -1})
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "[train] epochs: must be at least 1" in err
    assert "Traceback" not in err
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert main(["show", str(path), "--set", "train.batch_size=x"]) == 2
