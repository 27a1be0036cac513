"""``train.compile`` unset ("auto"): on CUDA it compiles; on the CPU only a measured gain that a run
is long enough to win back (tested on a made-up timing table)."""

import pytest

from trainer.compile_choice import PAYBACK, Measured, choose_compile

TABLE = {("resnet20", "bp"): Measured(eager=100.0, compiled=150.0, compile_s=40.0),  # saves 1/300 s an image
         ("cnn", "dfa"): Measured(eager=1000.0, compiled=900.0, compile_s=20.0)}  # slower compiled


def test_an_explicit_setting_wins_everywhere():
    assert choose_compile(True, "cpu", "cnn", "dfa", 10, TABLE)[0] is True
    assert choose_compile(False, "cuda", "resnet20", "bp", 10**9, TABLE)[0] is False


def test_auto_compiles_on_cuda():
    on, why = choose_compile(None, "cuda", "anything", "bp", 1, TABLE)
    assert on and "CUDA" in why


def test_auto_on_the_cpu_compiles_a_long_enough_run_of_a_measured_gain():
    break_even = PAYBACK * 40.0 * 300  # images whose saving is PAYBACK x the compile time
    on, why = choose_compile(None, "cpu", "resnet20", "bp", int(break_even * 1.01), TABLE)
    assert on and "1.50x" in why and "40 s compile" in why
    off, why = choose_compile(None, "cpu", "resnet20", "bp", int(break_even * 0.99), TABLE)
    assert not off and "less than 1.5x the ~40 s compile" in why


@pytest.mark.parametrize("model,rule,expect", [("cnn", "dfa", "runs 0.90x compiled"),
                                                ("vit", "bp", "was not measured")])
def test_auto_on_the_cpu_stays_eager_without_a_measured_gain(model, rule, expect):
    on, why = choose_compile(None, "cpu", model, rule, 10**9, TABLE)
    assert not on and expect in why


def test_a_run_says_what_auto_chose_and_show_agrees(tmp_path, tiny_npz, capsys):
    from conftest import write_recipe
    from trainer.cli import main

    path = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 1, "compile": None})
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    assert "note: compile auto: off (on the CPU, mlp under bp was not measured to gain" in capsys.readouterr().out
    assert main(["show", str(path)]) == 0
    assert "compile = false" in capsys.readouterr().out


def test_the_measured_table_compiles_long_resnet_runs_and_leaves_the_quickstart_eager():
    """What auto chooses on the CPU from the shipped measurements (BENCHMARKS.md)."""
    quickstart = 10 * 4500  # 10 epochs of mnist5k's training split
    assert not choose_compile(None, "cpu", "cnn", "bp", quickstart)[0]
    assert choose_compile(None, "cpu", "resnet18", "bp", 10 * 4194)[0]  # 10 epochs of the CIFAR sample
    assert not choose_compile(None, "cpu", "resnet20", "dfa", 10**9)[0]  # per-unit compiles run slower
