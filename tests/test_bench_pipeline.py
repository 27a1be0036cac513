"""benchmarks/bench_pipeline.py: the recipes it trains, its goals, and one --quick run end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_pipeline as bench
from trainer.session import is_forward_only

ROOT = Path(__file__).resolve().parents[1]


MEASURED = [(model, label) for model in bench.MODELS for label in bench.RULES
            if bench.rule_name(label)[0] not in bench.MODELS[model].refused]


@pytest.mark.parametrize("model,label", MEASURED, ids=[f"{m}-{l}" for m, l in MEASURED])
def test_every_measured_rule_has_a_valid_pipeline_recipe(model, label):
    name, schedule = bench.rule_name(label)
    overrides = ["train.pipeline_stages=2", "train.micro_batches=4", "train.batch_size=32", 'train.device="cpu"']
    if schedule:
        overrides.append(f'train.pipeline_schedule="{schedule}"')
    recipe = bench.build_recipe(model, name, overrides)
    assert recipe.rule.name == name and recipe.train.pipeline_stages == 2
    assert recipe.model.name == ("resnet18" if model == "resnet18" else "vit")
    assert is_forward_only(recipe) == (name in bench.FORWARD_ONLY)
    assert getattr(recipe.rule.options, "align_every", 0) == 0  # a stage refuses DFA's angle diagnostic
    if schedule:
        assert recipe.train.pipeline_schedule == schedule


def row(rule, m, rate, efficiency):
    return {"rule": rule, "M": m, "images_per_s": rate, "efficiency": efficiency}


def test_goals_compare_local_rules_with_bps_best_schedule_at_the_same_m():
    rows = [row("bp-gpipe", 2, 10.0, 0.5), row("bp-1f1b", 2, 12.0, 0.6), row("dfa", 2, 13.0, 0.85),
            row("tpsgd", 2, 20.0, 0.95), row("drtp", 2, 11.0, 0.92)]
    met = {goal: ok for goal, ok, _ in bench.goals(rows)}
    assert met == {"forward-only (drtp, tpsgd) efficiency >= 0.9": True, "DFA efficiency >= 0.8": True,
                   "every local rule faster (S=2) than BP's best schedule at the same M": False}  # drtp 11 < 12
    assert [r.get("beats_best_bp") for r in rows] == [None, None, True, True, False]
    failed = [row("bp-1f1b", 2, 12.0, 0.6), {"rule": "dfa", "M": 2, "error": "boom"}]
    assert {goal: ok for goal, ok, _ in bench.goals(failed)}["DFA efficiency >= 0.8"] is False


def test_quick_run_measures_a_pipeline_and_its_baseline(tmp_path):
    out = tmp_path / "quick"
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_pipeline", "--quick", "--rules", "drtp", "--out",
                           str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.with_suffix(".json").read_text())
    [r] = result["tables"]["vit"]
    assert "error" not in r, r["error"]
    assert r["M"] == 2 and r["step_batch"] == 8  # forward-only: the baseline trains on micro-batches
    assert r["images"] == 2 * 16  # 2 timed batches of 16 images, as 2 x 2 micro-batches
    assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"], rel=0.05)  # the main stage's own clock
    assert r["images_per_s_1p"] > 0  # the efficiency is the two rates' ratio, whatever the machine's load
    assert r["efficiency"] == pytest.approx(r["images_per_s"] / (2 * r["images_per_s_1p"]), rel=1e-9)
    for key in ("activation_mib_stage0", "activation_mib_stage1", "activation_mib_1p"):
        assert r[key] > 0
    # each stage keeps only its own units' activations: at most the one process's, which keeps all
    assert max(r["activation_mib_stage0"], r["activation_mib_stage1"]) <= r["activation_mib_1p"] * 1.01
    assert out.with_suffix(".csv").is_file()
