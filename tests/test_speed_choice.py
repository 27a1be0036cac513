"""``train.compile`` and ``train.channels_last`` unset ("auto"): on CUDA it compiles in the default
layout; on the CPU channels_last where it was measured faster, and compile only a measured gain in
that layout that a run is long enough to win back (tested on a made-up timing table)."""

import pytest

from trainer.speed_choice import PAYBACK, Measured, choose_channels_last, choose_compile

TABLE = {  # resnet20 bp: channels_last 1.6x; compiled 1.5x in the default layout (1/300 s an image), 1.05x NHWC
    ("resnet20", "bp"): Measured(eager=100.0, channels_last=160.0, compiled=150.0, compiled_channels_last=168.0,
                                 compile_s=40.0),
    ("cnn", "dfa"): Measured(eager=1000.0, channels_last=1050.0, compiled=900.0, compiled_channels_last=950.0,
                             compile_s=20.0),  # slower compiled, channels_last within the noise
}


def test_an_explicit_setting_wins_everywhere():
    assert choose_compile(True, "cpu", "cnn", "dfa", 10, TABLE)[0] is True
    assert choose_compile(False, "cuda", "resnet20", "bp", 10**9, table=TABLE)[0] is False
    assert choose_channels_last(False, "cpu", "resnet20", "bp", table=TABLE)[0] is False
    assert choose_channels_last(True, "cuda", "vit", "dfa", table=TABLE)[0] is True


def test_auto_compiles_on_cuda():
    on, why = choose_compile(None, "cuda", "anything", "bp", 1, table=TABLE)
    assert on and "CUDA" in why
    off, why = choose_channels_last(None, "cuda", "resnet20", "bp", table=TABLE)
    assert not off and "unmeasured on cuda" in why


def test_auto_channels_last_on_the_cpu_where_measured_faster():
    on, why = choose_channels_last(None, "cpu", "resnet20", "bp", table=TABLE)
    assert on and "1.60x" in why
    off, why = choose_channels_last(None, "cpu", "cnn", "dfa", table=TABLE)
    assert not off and "runs 1.05x channels_last" in why
    off, why = choose_channels_last(None, "cpu", "vit", "bp", table=TABLE)
    assert not off and "was not measured" in why
    off, why = choose_channels_last(None, "cpu", "resnet20", "bp", pipeline_stages=2, table=TABLE)
    assert not off and "pipeline" in why


def test_auto_compile_weighs_the_gain_in_the_layout_chosen():
    """Compiled 1.5x in the default layout, but only 1.05x over the faster channels_last eager."""
    assert choose_compile(None, "cpu", "resnet20", "bp", 10**9, channels_last=False, table=TABLE)[0]
    off, why = choose_compile(None, "cpu", "resnet20", "bp", 10**9, channels_last=True, table=TABLE)
    assert not off and "runs 1.05x compiled channels_last" in why


def test_auto_on_the_cpu_compiles_a_long_enough_run_of_a_measured_gain():
    break_even = PAYBACK * 40.0 * 300  # images whose saving is PAYBACK x the compile time
    on, why = choose_compile(None, "cpu", "resnet20", "bp", int(break_even * 1.01), table=TABLE)
    assert on and "1.50x" in why and "40 s compile" in why
    off, why = choose_compile(None, "cpu", "resnet20", "bp", int(break_even * 0.99), table=TABLE)
    assert not off and "less than 1.5x the ~40 s compile" in why


@pytest.mark.parametrize("model,rule,expect", [("cnn", "dfa", "runs 0.90x compiled"),
                                                ("vit", "bp", "was not measured")])
def test_auto_on_the_cpu_stays_eager_without_a_measured_gain(model, rule, expect):
    on, why = choose_compile(None, "cpu", model, rule, 10**9, table=TABLE)
    assert not on and expect in why


def test_a_run_says_what_auto_chose_and_show_agrees(tmp_path, tiny_npz, capsys):
    from conftest import write_recipe
    from trainer.cli import main

    path = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 1, "compile": None})
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    assert "note: compile auto: off (on the CPU, mlp under bp was not measured to gain" in capsys.readouterr().out
    assert main(["show", str(path)]) == 0
    assert "compile = false" in capsys.readouterr().out


def test_a_run_takes_channels_last_where_the_table_says_so(tmp_path, tiny_npz, capsys, monkeypatch):
    from conftest import write_recipe
    from trainer import speed_choice
    from trainer.cli import main

    monkeypatch.setattr(speed_choice, "CPU_MEASURED", {("cnn", "bp"): TABLE[("resnet20", "bp")]})
    path = write_recipe(tmp_path / "r.toml", tiny_npz, model={"name": "cnn"},
                        train={"epochs": 1, "compile": None, "channels_last": None})
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "· channels_last ·" in out and "note: channels_last auto: on (1.60x on the CPU" in out
    assert "note: compile auto: off (on the CPU, cnn under bp runs 1.05x compiled channels_last)" in out
    assert main(["show", str(path)]) == 0
    assert "channels_last = true" in capsys.readouterr().out


def test_the_shipped_table_takes_channels_last_where_it_paid_and_compiles_only_long_runs():
    """What auto chooses on the CPU from the shipped measurements (BENCHMARKS.md)."""
    quickstart, cifar_sample = 10 * 4500, 10 * 4194  # 10 epochs of mnist5k's and the CIFAR sample's training split
    assert choose_channels_last(None, "cpu", "cnn", "bp")[0]  # the quickstart: 1.32x
    assert not choose_compile(None, "cpu", "cnn", "bp", quickstart, channels_last=True)[0]
    assert choose_channels_last(None, "cpu", "resnet20", "bp")[0]
    assert choose_channels_last(None, "cpu", "resnet18", "bp")[0]
    assert not choose_compile(None, "cpu", "resnet18", "bp", cifar_sample, channels_last=True)[0]  # 1.03x more
    assert not choose_channels_last(None, "cpu", "resnet20", "rec_lra")[0]  # 0.93x
    assert not choose_compile(None, "cpu", "resnet20", "dfa", 10**9)[0]  # per-unit compiles run slower
    assert choose_compile(None, "cpu", "resnet20", "trace_bp", 2 * cifar_sample)[0]  # inductor fuses the probes
