"""A user's own rule, ``[rule] name = "python:package.module:ClassName"``: the two examples of
docs/rules.md ("Writing a rule", examples/rules/) train from their recipes, on two pipeline stages
exactly as on one process, through ``trainer show``, ``eval`` and ``--resume``, and prepared for
the user's own loop; every way of getting one wrong is one line naming ``[rule] name`` (exit 2)."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import assert_rel_close, write_recipe
from test_pipeline import pipeline_equals_one_process
from trainer.cli import main
from trainer.rules import RuleContext, build_rule, rule_options_class

REPO = Path(__file__).resolve().parents[1]
SPARSE_DFA = "python:examples.rules.sparse_dfa:SparseDFA"
CLASS_CODES = "python:examples.rules.class_codes:ClassCodes"
ON_CPU = ["--set", "train.device=cpu", "--set", "train.compile=false"]


@pytest.fixture
def in_repo(monkeypatch):
    """The working directory a user runs the examples from: the repository root."""
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO))


def one_line_error(capsys, *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "[rule] name" in err, err
    for text in expected:
        assert text in err, err
    return err


@pytest.mark.parametrize("recipe", ["sparse_dfa", "class_codes"])
def test_the_example_recipes_train(tmp_path, in_repo, recipe):
    out = tmp_path / recipe
    assert main(["run", f"examples/rules/{recipe}.toml", "--out", str(out), "--set", "train.epochs=1", *ON_CPU]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["rule"].startswith("python:examples.rules.") and results["accuracy"] > 0.5  # chance is 0.1


@pytest.mark.parametrize("rule, micro, one_batch, lr", [(SPARSE_DFA, 4, 16, 0.05), (CLASS_CODES, 2, 8, 0.01)],
                         ids=["sparse_dfa", "class_codes"])
def test_two_stages_equal_one_process(tmp_path, tiny_npz, in_repo, rule, micro, one_batch, lr):
    """Sparse DFA adds up its micro-batches: one process on the whole batch; the forward-only class
    codes update on each micro-batch: one process with batch = micro-batch."""
    result = pipeline_equals_one_process(tmp_path, tiny_npz, {"name": rule}, stages=2, micro=micro,
                                         one_batch=one_batch, optim={"name": "sgd", "lr": lr})
    assert "pipeline of 2 stages" in result.stdout


def test_show_eval_and_resume(tmp_path, tiny_npz, in_repo, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule={"name": SPARSE_DFA, "density": 0.25},
                        optim={"name": "adamw", "lr": 0.01, "schedule": "constant"}, train={"batch_size": 16})
    assert main(["show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert f'name = "{SPARSE_DFA}"' in shown and "density = 0.25" in shown
    assert main(["run", str(path), "--out", str(tmp_path / "full")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "cut"), "--set", "train.epochs=1"]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "cut"), "--resume"]) == 0
    full, cut = (torch.load(tmp_path / run / "checkpoint.pt") for run in ("full", "cut"))
    assert full["step"] == cut["step"] > 0
    for part in ("model", "rule"):
        for name, value in full[part].items():
            assert torch.equal(cut[part][name], value), name
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "full"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["accuracy"] == json.loads((tmp_path / "full" / "results.json").read_text())["accuracy"] > 0.5


def test_the_prepared_sparse_dfa_equals_its_train_step(in_repo):
    def trained(prepared: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU()),
                              nn.Sequential(nn.Linear(16, 16), nn.Tanh()), nn.Linear(16, 5))
        rule = build_rule(SPARSE_DFA, rule_options_class(SPARSE_DFA)(density=0.5), model,
                          RuleContext(num_classes=5, input_shape=(3, 4), seed=3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        net = rule.prepare()
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            x, y = torch.randn(7, 3, 4, generator=g), torch.randint(0, 5, (7,), generator=g)
            if prepared:
                nn.functional.cross_entropy(net(x), y).backward()
                rule.step(optimizer)
            else:
                rule.train_step(x, y, optimizer)
        return [p.detach().clone() for p in model.parameters()]

    for k, (got, want) in enumerate(zip(trained(prepared=True), trained(prepared=False))):
        assert_rel_close(got, want, 1e-5, f"parameter {k}")


BAD_RULES = '''
from trainer.rules import UnitRule
from trainer.rules.base import UnitOptions


class Raises(UnitRule):
    name = "raises"
    Options = UnitOptions

    def signals(self, batch):
        raise ValueError("no signal for unit 1")


class NoOptions(UnitRule):
    name = "no_options"


class PlainOptions(UnitRule):
    name = "plain_options"

    class Options:
        granularity = "layer"


class NotARule:
    pass
'''


def test_mistakes_are_one_line_naming_the_key(tmp_path, tiny_npz, monkeypatch, capsys):
    (tmp_path / "bad_rules.py").write_text(BAD_RULES)
    (tmp_path / "broken_rules.py").write_text("import not_installed_anywhere\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule={"name": "python:bad_rules:Raises"})
    cases = [
        ("python:broken_rules:Rule", "cannot import 'broken_rules'", "No module named 'not_installed_anywhere'"),
        ("python:bad_rules:Missing", "bad_rules has no 'Missing'", "its rules: Raises, NoOptions, PlainOptions"),
        ("python:bad_rules:NotARule", "is the class NotARule, not a subclass of trainer.rules.Rule"),
        ("python:bad_rules:NoOptions", "has no Options dataclass"),
        ("python:bad_rules:PlainOptions", "has no Options dataclass"),
        ("python:bad_rules", "expected 'python:package.module:ClassName'"),
    ]
    for name, *expected in cases:
        assert main(["run", str(path), "--out", str(tmp_path / "run"), "--set", f"rule.name={name}"]) == 2
        one_line_error(capsys, f"--set rule.name={name}: [rule] name: ", *expected)
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, f"{path}: [rule] name: rule python:bad_rules:Raises raised ValueError in training: no signal "
                   "for unit 1 (in signals(), bad_rules.py:11)")


def test_option_mistakes_name_the_key(tmp_path, in_repo, capsys):
    for item, expected in [("rule.density=0", "density: must be in (0, 1], got 0"),
                           ("rule.density=true", "density: expected a number, got True"),
                           ("rule.dense=0.5", "unknown key 'dense'; allowed keys: granularity, units, bp_units, feedback_init, "
                            "feedback_storage, feedback_scale, align_every, token_feedback, density")]:
        assert main(["show", "examples/rules/sparse_dfa.toml", "--set", item]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"error: --set {item}: [rule] (rule '{SPARSE_DFA}')") \
            and expected in err, err


def test_the_packages_own_rules_keep_their_traceback(tmp_path, tiny_npz, monkeypatch):
    from trainer.rules.dfa import DFA

    def broken(self, batch):
        raise ValueError("a bug of the package")

    monkeypatch.setattr(DFA, "signals", broken)
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule={"name": "dfa"})
    with pytest.raises(ValueError, match="a bug of the package"):
        main(["run", str(path), "--out", str(tmp_path / "run")])


def test_compare_rules_runs_a_python_rule_from_its_recipe(tmp_path, in_repo, monkeypatch):
    import csv
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_rules", REPO / "benchmarks" / "compare_rules.py")
    compare_rules = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_rules)
    monkeypatch.setattr(compare_rules.sys, "argv", [
        "compare_rules.py", "--suite", "mnist5k", "--epochs", "1", "--rules", "sparse_dfa", "--out", str(tmp_path),
        "--recipe", "examples/rules/sparse_dfa.toml", "--set", "train.device=cpu", "--set", "train.compile=false"])
    compare_rules.main()
    (row,) = csv.DictReader((tmp_path / "results.csv").open())
    assert row["rule"] == "sparse_dfa" and not row["error"] and float(row["accuracy"]) > 0.5, row
