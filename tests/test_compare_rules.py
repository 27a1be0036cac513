"""benchmarks/compare_rules.py: how runs over seeds are summarized (the numbers BENCHMARKS.md reports)."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_rules.py"
_SPEC = importlib.util.spec_from_file_location("compare_rules", _PATH)
compare_rules = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compare_rules)


def run(seed: int, accuracy: float, curve: list[tuple[int, float]]) -> dict:
    return {"label": "bp", "recipe": "quickstart", "seed": seed, "wall_s": 10.0, "accuracy": accuracy,
            "images_per_s": 100.0 + seed, "peak_memory_mb": 500.0 + seed, "rule_state_mb": 0.0, "curve": curve}


def test_summary_is_mean_and_sample_sd_over_seeds_with_the_mean_curve():
    runs = [run(0, 0.40, [(1, 0.2), (2, 0.40)]), run(1, 0.44, [(1, 0.3), (2, 0.44)]), run(2, 0.48, [(1, 0.1), (2, 0.48)])]
    summary = compare_rules.summarize("bp", "quickstart", runs)
    assert summary["accuracy"] == pytest.approx(0.44)
    assert summary["accuracy_sd"] == pytest.approx(0.04)  # sample sd of 0.40, 0.44, 0.48
    assert summary["accuracy_per_seed"] == [0.40, 0.44, 0.48]
    assert summary["curve"] == [(1, pytest.approx(0.2)), (2, pytest.approx(0.44))]
    assert summary["peak_memory_mb"] == 502.0 and summary["images_per_s"] == pytest.approx(101.0)
    assert summary["wall_s"] == 30.0 and summary["errors"] == []


def test_failed_seeds_are_named_and_left_out_of_the_mean():
    failed = {"label": "bp", "recipe": "quickstart", "seed": 1, "wall_s": 1.0, "error": ["exit 3: diverged"]}
    summary = compare_rules.summarize("bp", "quickstart", [run(0, 0.5, [(1, 0.5)]), failed])
    assert summary["accuracy"] == 0.5 and summary["accuracy_sd"] == 0.0
    assert summary["errors"] == ["seed 1: exit 3: diverged"]
    only_failed = compare_rules.summarize("bp", "quickstart", [failed])
    assert "accuracy" not in only_failed and only_failed["errors"]
