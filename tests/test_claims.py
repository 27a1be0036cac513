"""benchmarks/claims.py: each verdict on made-up numbers, and each claim's --quick path end to end.

The quick paths train on synthetic CIFAR-shaped images written to tmp_path (tests never read the
real images); their verdicts mean nothing, so they check the table, the files and that a verdict is
one of the three."""

import csv
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from benchmarks import full_cifar
from benchmarks.claims import (CLAIMS, FAILS, HOLDS, UNDECIDED, Context, Setting, Spread, combine, compare, main,
                               markdown_summary, model_budgets, published, rec_lra_verdict, small_data_verdict,
                               tpsgd_verdict, trace_noise_verdict, weight_transport_verdict)
from trainer.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_compare_and_combine():
    assert compare(Spread(60, 1, 3), Spread(57, 2, 3)) == 1
    assert compare(Spread(60, 1, 3), Spread(59, 2, 3)) == 0
    assert compare(Spread(55, 1, 3), Spread(59, 2, 3)) == -1
    assert compare(Spread(60, 0.1, 3), Spread(59, 0.1, 3), floor=2) == 0
    assert combine([HOLDS, HOLDS]) == HOLDS and combine([HOLDS, UNDECIDED]) == UNDECIDED
    assert combine([UNDECIDED, FAILS, HOLDS]) == FAILS and combine([]) == UNDECIDED
    assert Spread.of([1, 2, 3]).sd == pytest.approx(1.0) and Spread.of([4]).sd == 0
    with pytest.raises(ValueError, match="every seed"):
        Spread.of([])


def _small(hybrid_gain: float, bdfa_gain: float, sd: float = 1.0) -> dict:
    acc = {}
    for model in ("resnet20", "cnn"):
        for subset in (250, 500, 4194):
            base = 40 + subset / 1000
            acc[(model, subset, "bp")] = [base - sd, base, base + sd]
            small = subset < 1000  # the rules' advantage only where data is small
            acc[(model, subset, "hybrid")] = [base + hybrid_gain * small + d for d in (-sd, 0, sd)]
            acc[(model, subset, "bdfa")] = [base + bdfa_gain * small + d for d in (-sd, 0, sd)]
            acc[(model, subset, "dfa")] = [base - 10] * 3
    return acc


def test_small_data_verdict():
    assert small_data_verdict(_small(3, 2.5)).verdict == HOLDS  # both beat BP by more than sd 1 at 250 and 500
    assert small_data_verdict(_small(3, 0.5)).verdict == UNDECIDED  # BDFA within the spread
    assert small_data_verdict(_small(3, -2)).verdict == FAILS
    assert small_data_verdict(_small(3, 2.5, sd=4)).verdict == UNDECIDED  # the same gains, noisier seeds
    reasons = small_data_verdict(_small(3, -2)).reasons
    assert len(reasons) == 8 and any("bdfa" in r and "below" in r for r in reasons)
    without_dfa = {key: acc for key, acc in _small(3, 2.5).items() if key[2] != "dfa"}  # --rules bp hybrid bdfa
    assert small_data_verdict(without_dfa).verdict == HOLDS


def _curve(final: float, reached: int, epochs: int = 8, seconds: float = 10.0) -> list:
    """(epoch, accuracy, seconds): accuracy rising linearly to ``final`` at epoch ``reached``, then flat."""
    return [(e, final * min(1.0, e / reached), seconds * e) for e in range(1, epochs + 1)]


def test_rec_lra_verdict():
    bp = [_curve(60 + d, 6) for d in (-0.5, 0, 0.5)]  # reaches 54 % (90 % of 60) at epoch 6
    fast = [_curve(59.5 + d, 3) for d in (-0.5, 0, 0.5)]  # level within 1 point, at 54 % by epoch 3
    assert rec_lra_verdict(bp, fast).verdict == HOLDS
    slow = [_curve(59.5 + d, 8) for d in (-0.5, 0, 0.5)]  # level at the end, but later
    assert rec_lra_verdict(bp, slow).verdict == FAILS
    behind = [_curve(50 + d, 3) for d in (-0.5, 0, 0.5)]  # 10 points behind and flat
    assert rec_lra_verdict(bp, behind).verdict == FAILS
    closing = [_curve(55 + d, 8) for d in (-0.5, 0, 0.5)]  # behind, the gap 19 points at epoch 6 and 5 at 8
    verdict = rec_lra_verdict(bp, closing)
    assert verdict.verdict == UNDECIDED and "closing" in verdict.reasons[-1]
    timed = [_curve(59.5 + d, 6, seconds=5.0) for d in (-0.5, 0, 0.5)]  # the same epochs, half the seconds
    assert rec_lra_verdict(bp, timed).verdict == HOLDS


def test_model_budgets_give_each_model_its_epochs():
    known = ["resnet20", "resnet18"]
    assert model_budgets(["resnet20", "resnet18:15"], known, 30) == {"resnet20": 30, "resnet18": 15}
    assert model_budgets(["resnet18"], known, 7) == {"resnet18": 7}
    with pytest.raises(ValueError, match="unknown model 'vit'; choose from resnet20, resnet18"):
        model_budgets(["vit"], known, 30)
    for bad in ("resnet18:0", "resnet18:", "resnet18:ten"):
        with pytest.raises(ValueError, match="EPOCHS must be a whole number above 0"):
            model_budgets([bad], known, 30)


@pytest.mark.parametrize(("argv", "message"), [
    (["rec-lra", "--models", "resnet50"], "unknown model 'resnet50'"),
    (["small-data", "--models", "cnn:3"], "names only"),
    (["tpsgd", "--models", "cnn"], "--models applies to small-data and rec-lra, not tpsgd"),
])
def test_bad_models_exit_2_naming_the_value(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_tpsgd_verdict():
    good = {"bp": [97, 98, 99], "tpsgd": [94, 95, 96], "memory_ratio": 0.3, "time_ratio": 0.8}
    assert tpsgd_verdict({"mlp": good, "cnn": good}).verdict == HOLDS
    far = {**good, "tpsgd": [80, 81, 82]}
    assert tpsgd_verdict({"mlp": good, "cnn": far}).verdict == FAILS
    near = {**good, "tpsgd": [91, 92.5, 94]}  # 5.5 points behind, within one sd of the 5-point line
    assert tpsgd_verdict({"mlp": near}).verdict == UNDECIDED
    assert tpsgd_verdict({"mlp": {**good, "time_ratio": 1.2}}).verdict == FAILS


def test_trace_noise_verdict():
    ratio = {(p, f"conv{i}", r): 20.0 / r * (1 + i / 10) for p in ("init", "end") for i in range(5)
             for r in (1, 4, 16, 64)}
    memory = {1: 10.0, 4: 20.0, 16: 40.0, 64: 90.0, "exact": 100.0}
    assert trace_noise_verdict(ratio, memory).verdict == HOLDS  # median at r = 16 is 1.5
    noisy = {k: v * 10 for k, v in ratio.items()}
    assert trace_noise_verdict(noisy, memory).verdict == FAILS
    assert trace_noise_verdict(ratio, {**memory, 64: 120.0}).verdict == FAILS  # r = 64 above exact
    assert trace_noise_verdict(ratio, {**memory, 4: 5.0}).verdict == FAILS  # not rising with r
    assert trace_noise_verdict(noisy, memory, probes=64).verdict == HOLDS


def test_weight_transport_verdict():
    bp = [60, 61, 62]
    assert weight_transport_verdict(bp, [59, 60, 61], [58.5, 59.5, 60.5], 30.0).verdict == HOLDS
    assert weight_transport_verdict(bp, [59, 60, 61], [40, 41, 42], 30.0).verdict == FAILS
    undecided = weight_transport_verdict(bp, [59, 60, 61], [40, 41, 42], 80.0)
    assert undecided.verdict == UNDECIDED and "not aligned" in undecided.reasons[-1]
    assert weight_transport_verdict(bp, [50, 51, 52], [59, 60, 61], 30.0).verdict == FAILS
    assert weight_transport_verdict(bp, [59, 60, 61], [59, 60, 61], None).verdict == UNDECIDED
    # KP held against BP trained at KP's decay, not the recipe's BP
    same_decay = weight_transport_verdict(bp, [59, 60, 61], [58.5, 59.5, 60.5], 30.0, kp_bp=[70, 71, 72])
    assert same_decay.verdict == FAILS and "bp at kp's decay" in same_decay.reasons[-1]
    assert weight_transport_verdict([70, 71, 72], [69, 70, 71], [55, 56, 57], 30.0, kp_bp=bp).verdict == FAILS
    assert weight_transport_verdict([70, 71, 72], [69, 70, 71], [59, 60, 61], 30.0, kp_bp=bp).verdict == HOLDS


def test_list_names_the_five_claims():
    done = subprocess.run([sys.executable, "-m", "benchmarks.claims", "--list"], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    for name in ("small-data", "rec-lra", "tpsgd", "trace-noise", "weight-transport"):
        assert name in done.stdout
    assert set(CLAIMS) == {"small-data", "rec-lra", "tpsgd", "trace-noise", "weight-transport"}


COLUMNS = {
    "small-data": ["model", "train images", "epochs", "bp (vs bp)", "dfa (vs bp)", "hybrid (vs bp)", "bdfa (vs bp)"],
    "rec-lra": ["model", "rule", "at 1/4 of training", "at 1/2", "at 3/4", "final held-out %", "train s"],
    "tpsgd": ["setting", "bp %", "tpsgd %", "gap (points)", "saved MiB bp / tp", "memory x", "step ms bp / tp",
              "time x"],
    "trace-noise": ["r", "error/noise, init", "error/noise, 1 epoch", "error/noise, 2 epochs", "saved MiB (b 128)",
                    "held-out %"],
    "weight-transport": ["rule", "recipe", "held-out %", "per seed", "vs bp", "B-W angle °"],
}


@pytest.mark.parametrize(("claim", "extra"), [(claim, []) for claim in sorted(COLUMNS)]
                         + [("weight-transport", ["--kp-decay", "5e-3"]),
                            ("rec-lra", ["--models", "resnet20", "resnet18:1"])])
def test_quick_path_writes_the_table_and_a_verdict(tmp_path, claim, extra):
    command = [sys.executable, "-m", "benchmarks.claims", claim, "--quick", "--seeds", "0", "--jobs", "2",
               "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), *extra]
    # the kernels' own tests run them under Triton's interpreter (conftest sets TRITON_INTERPRET); the claims
    # train with the PyTorch paths, as a user's CPU run does
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / f"{claim}.json").read_text())
    assert summary["columns"] == COLUMNS[claim] and summary["rows"]
    assert all(len(row) == len(COLUMNS[claim]) for row in summary["rows"])
    assert summary["verdict"] in (HOLDS, FAILS, UNDECIDED) and summary["reasons"] and summary["quick"]
    assert f"verdict: {summary['verdict']}" in done.stdout
    if claim == "rec-lra" and extra:  # each model at its own budget, both in the table and the verdict
        assert summary["budget"].startswith("resnet20 2 epochs, resnet18 1 epoch,")
        assert [row[0] for row in summary["rows"]] == ["resnet20", "resnet20", "resnet18", "resnet18"]
        assert any(reason.startswith("resnet18: final") for reason in summary["reasons"])
    elif extra:  # --kp-decay: KP at that decay, and BP at it beside the recipe's BP
        recipes = {row[0]: row[1] for row in summary["rows"]}
        assert list(recipes) == ["bp", "usf", "kp", "bp, kp's decay"]
        assert recipes["kp"].endswith("optim.weight_decay=0.005") and recipes["bp"] == "cifar10_resnet20_bp"
    with open(tmp_path / "out" / f"{claim}.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and not any(row.get("error") for row in rows)
    row = markdown_summary(tmp_path / "out").splitlines()[2]
    assert row.startswith(f"| `{claim}` |") and f"**{summary['verdict']}**" in row
    pytest.importorskip("matplotlib")
    assert (tmp_path / "out" / f"{claim}.png").stat().st_size > 0


# ---- the full data: --set, --rules, --from-table, the claims table of several budgets --------------------


def _context(runs: Path, overrides: tuple[str, ...] = ()) -> Context:
    return Context(seeds=[0], jobs=1, runs=runs, out=runs, reuse=True, quick=True, epochs=None, data=[],
                   data_note="", console=None, overrides=overrides)


def test_set_goes_last_into_every_setting_and_names_its_folder(tmp_path):
    setting = Setting("resnet20 bp", "cifar10_resnet20_bp", ("train.epochs=3",))
    plain, amp = _context(tmp_path), _context(tmp_path, ("train.amp=true",))
    assert plain.folder(setting, 0) == setting.folder(tmp_path) / "seed0"  # no --set: today's folders, --reuse finds them
    assert amp.full(setting).overrides == ("train.epochs=3", "train.amp=true")
    assert amp.folder(setting, 0) != plain.folder(setting, 0)  # a run with it never shares a run without it


def test_small_data_with_rules_and_set_trains_those_rules_with_the_override(tmp_path):
    """--rules bp hybrid bdfa (no dfa) and --set train.amp=true end to end, then --reuse reads every run."""
    command = [sys.executable, "-m", "benchmarks.claims", "small-data", "--quick", "--seeds", "0", "--jobs", "2",
               "--rules", "bp", "hybrid", "bdfa", "--set", "train.amp=true", "--out", str(tmp_path / "out"),
               "--runs", str(tmp_path / "runs")]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "small-data.json").read_text())
    assert summary["columns"] == ["model", "train images", "epochs", "bp (vs bp)", "hybrid (vs bp)", "bdfa (vs bp)"]
    assert all(int(size) * int(epochs) >= 80 for _, size, epochs, *_ in summary["rows"])  # every run sees >= --images
    results = sorted((tmp_path / "runs").glob("*/seed0/results.json"))
    assert len(results) == 2 * 3 and not any("_dfa-" in str(path) for path in results)  # 2 subsets x 3 rules
    for path in results:
        assert tomllib.loads((path.parent / "recipe.toml").read_text())["train"]["amp"] is True
    written = {path: path.stat().st_mtime_ns for path in results}
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {path: path.stat().st_mtime_ns for path in results} == written  # the same recipe, --set and all: reused


@pytest.mark.parametrize(("argv", "message"), [
    (["small-data", "--rules", "bp", "dfa"], "--rules must name bp, hybrid and bdfa"),
    (["rec-lra", "--rules", "bp", "hybrid", "bdfa"], "--rules applies to small-data, not rec-lra"),
    (["tpsgd", "--from-table", "x"], "--from-table applies to rec-lra and weight-transport, not tpsgd"),
    (["rec-lra", "--from-table", "x", "--epochs", "3", "--set", "train.amp=true"], "drop --epochs, --set"),
    (["rec-lra", "--out", "a", "--out", "b"], "--out: one folder"),
])
def test_bad_full_data_arguments_exit_2_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--quick"])  # --quick: were the check ever to let one through, it trains for seconds
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (["--set", "train.amp=maybe"], "error: --set train.amp=maybe: [train] amp: expected true or false"),
    (["--subsets", "40", "100000"], "error: --subsets 100000: the training split holds 540 images"),
])
def test_bad_set_or_subset_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as stop:
        main(["small-data", "--quick", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing trained


def _publish(table: Path, rule: str, seed: int, accuracy: list[float], angle: float | None = None) -> None:
    """A made-up run as benchmarks.full_cifar publishes it (RULE/seedN): results.json and metrics.jsonl."""
    folder = table / rule / f"seed{seed}"
    folder.mkdir(parents=True)
    records = []
    for epoch, acc in enumerate(accuracy, 1):
        records.append({"step": 10 * epoch, "split": "train", "epoch": epoch, "loss": 1.0,
                        **({} if angle is None else {"fb_angle": angle})})
        records.append({"step": 10 * epoch, "split": "held-out", "epoch": epoch, "train_loss": 1.0,
                        "train_accuracy": 0.5, "images_per_s": 100.0, "peak_memory_mb": 10.0, "train_seconds": 100.0,
                        "accuracy": acc})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "results.json").write_text(json.dumps({"state": "finished", "epochs": len(accuracy),
                                                     "accuracy": accuracy[-1]}))


def test_rec_lra_from_the_table_reads_its_curves(tmp_path, capsys):
    table = tmp_path / "cifar10_resnet20"
    for seed in (0, 1, 2):
        d = 0.005 * (seed - 1)
        _publish(table, "bp", seed, [0.5 + d, 0.7 + d, 0.8 + d, 0.9 + d])  # 81 % (90 % of 90) at epoch 4
        _publish(table, "rec_lra", seed, [0.6 + d, 0.8 + d, 0.88 + d, 0.895 + d])  # 0.5 behind, at 81 % by epoch 3
    _publish(table, "rec_lra_stages", 0, [0.1, 0.2, 0.3, 0.4])  # a row, not part of the verdict
    main(["rec-lra", "--from-table", str(table), "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")])
    summary = json.loads((tmp_path / "out" / "rec-lra.json").read_text())
    assert summary["budget"] == "ResNet-20, all of CIFAR-10 (45,000 / 5,000), 4 epochs, the full-CIFAR table's runs"
    assert [row[1] for row in summary["rows"]] == ["bp", "rec_lra", "rec_lra_stages"]
    assert summary["rows"][0][5] == "90.00 ± 0.50" and summary["rows"][2][5] == "40.00 ± 0.00"
    assert summary["verdict"] == HOLDS and not any("stages" in reason for reason in summary["reasons"])
    assert not (tmp_path / "runs").exists()  # read, not trained


def test_weight_transport_from_the_table_reads_accuracy_and_kp_angle(tmp_path):
    table = tmp_path / "cifar10_resnet20"
    for seed in (0, 1, 2):
        _publish(table, "bp", seed, [0.8, 0.90 + 0.01 * seed])
        _publish(table, "usf", seed, [0.8, 0.895 + 0.01 * seed])
        _publish(table, "kp", seed, [0.8, 0.89 + 0.01 * seed], angle=60.0 - 30 * (seed > 0) + seed)  # last: 31, 32
    main(["weight-transport", "--from-table", str(table), "--out", str(tmp_path / "out"),
          "--runs", str(tmp_path / "runs")])
    summary = json.loads((tmp_path / "out" / "weight-transport.json").read_text())
    assert summary["budget"] == "ResNet-20, all of CIFAR-10 (45,000 / 5,000), 2 epochs, the full-CIFAR table's runs"
    rows = {row[0]: row for row in summary["rows"]}
    assert list(rows) == ["bp", "usf", "kp"] and rows["kp"][1] == "cifar10full_resnet20_kp"
    assert rows["bp"][2] == "91.00 ± 1.00" and rows["usf"][4] == "-0.50"
    assert rows["kp"][5] == f"{(60 + 31 + 32) / 3:.1f}"  # the mean of each seed's final fb_angle
    assert summary["verdict"] == HOLDS and not (tmp_path / "runs").exists()


def test_a_missing_published_run_is_one_line_naming_the_folder_and_its_command(tmp_path, capsys):
    table = tmp_path / "cifar10_resnet20"
    for rule in ("bp", "usf", "kp"):
        for seed in (0, 1):
            _publish(table, rule, seed, [0.5])
    with pytest.raises(SystemExit) as stop:
        main(["weight-transport", "--from-table", str(table), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert f"{table / 'bp' / 'seed2'} holds no published run" in err
    assert f"python -m benchmarks.full_cifar --results {table} run --rules bp --seeds 2" in err
    with pytest.raises(ConfigError, match="make it with: python -m benchmarks.full_cifar run --rules kp --seeds 7$"):
        published(full_cifar.RESULTS, "kp", [7])  # the default results folder: no --results in the command


def _claim_json(out: Path, name: str, data: str, verdict: str) -> None:
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({
        "claim": name, "statement": CLAIMS[name].statement, "source": CLAIMS[name].source, "budget": f"{data} budget",
        "seeds": [0, 1, 2], "data": data, "reasons": [f"{name} at {data}"], "verdict": verdict}))


def test_markdown_has_a_row_per_claim_and_budget(tmp_path, capsys):
    small, full = tmp_path / "claims", tmp_path / "claims_full"
    _claim_json(small, "small-data", "4194 images", FAILS)
    _claim_json(small, "rec-lra", "4194 images", FAILS)
    _claim_json(full, "small-data", "45000 images", HOLDS)
    _claim_json(full, "weight-transport", "45000 images", UNDECIDED)
    main(["--markdown", "--out", str(small), "--out", str(full)])
    lines = capsys.readouterr().out.splitlines()
    assert lines == markdown_summary(small, full).splitlines()
    assert lines[0] == "| claim | budget | the paper says | setting | numbers | verdict |"
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[2:]]
    assert [(r[0], r[1], r[5]) for r in rows] == [
        ("`small-data`", "4194 images", f"**{FAILS}**"), ("`small-data`", "45000 images", f"**{HOLDS}**"),
        ("`rec-lra`", "4194 images", f"**{FAILS}**"), ("`weight-transport`", "45000 images", f"**{UNDECIDED}**")]
    assert rows[0][2].startswith(CLAIMS["small-data"].statement) and rows[1][2] == "(as above)"
    assert rows[1][3] == "45000 images budget; seeds 0, 1, 2"


@pytest.mark.parametrize(("script", "argv", "expected"), [("claims.py", ["--list"], "weight-transport"),
                                                          ("full_cifar.py", ["--help"], "table")])
def test_runs_as_a_file(tmp_path, script, argv, expected):
    """``python benchmarks/claims.py`` (not -m) finds the benchmarks package, from any folder."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *argv], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout
