"""examples/language_model.py on a tiny generated corpus, and the language-model benchmark's corpus
split and table (issue 37)."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch

from benchmarks import language_model as bench

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "language_model.py"
spec = importlib.util.spec_from_file_location("language_model_example", EXAMPLE)
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)

SUBJECTS, VERBS, OBJECTS = ["the cat", "a dog", "my aunt", "the bird"], ["sees", "eats", "likes"], \
    ["the fish", "a mouse", "some bread", "the seed"]


def write_corpus(folder: Path, seed: int = 0) -> Path:
    """Three files of generated sentences (subject verb object .), one to a few a line: a corpus
    whose next word is predictable well below the vocabulary's uniform perplexity."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in (("train", 300), ("valid", 40), ("test", 40)):
        text = "\n".join(" ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} ."
                                  for _ in range(rng.randint(1, 3))) for _ in range(lines))
        (folder / f"{name}.txt").write_text(text + "\n")
    return folder


TINY = ["--width", "16", "--heads", "2", "--blocks", "2", "--bptt", "12", "--batch-size", "8",
        "--dropout", "0", "--lr", "1e-2", "--epochs", "4"]


@pytest.mark.parametrize("rule", ["bp", "dfa", "bdfa", "hybrid"])
def test_the_example_learns_the_generated_corpus_and_ends_with_json(tmp_path, capsys, rule):
    data = write_corpus(tmp_path / "corpus")
    result = example.main(["--data", str(data), "--rule", rule, "--seed", "1", *TINY])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == result
    assert [line.split(" ·")[0] for line in lines[1:-1]] == [f"epoch {i}/4" for i in range(1, 5)]
    vocab = result["vocab"]
    assert vocab == len({w for s in SUBJECTS + VERBS + OBJECTS for w in s.split()}) + 2  # '.' and <eos>
    # uniform guessing is a perplexity of `vocab` (17); the grammar allows about 3.5 on average
    assert result["valid_ppl"] < 0.5 * vocab and result["test_ppl"] < 0.5 * vocab, result
    assert math.isfinite(result["train_ppl"]) and result["step_ms"] > 0


def test_the_dfa_family_cuts_after_every_block_with_v_by_d_feedback():
    model = example.TransformerLM(vocab=23, width=16, blocks=3, heads=2, hidden=16)
    rule = example.rule_for("bdfa", model, torch.randint(0, 23, (2, 9)), seed=0)
    assert rule.unit_names == ["blocks.0", "blocks.1", "blocks.2", "output"]
    assert [(b.num_classes, b.dim) for b in rule.feedback] == [(23, 16)] * 3  # one B a block, not T-sized
    hybrid = example.rule_for("hybrid", example.TransformerLM(23, 16, 4, 2, 16), torch.randint(0, 23, (2, 9)), 0)
    assert hybrid.options.bp_units == ["blocks.0", "blocks.1"] and len(hybrid.feedback) == 2


def test_a_folder_without_the_three_files_is_one_line(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("a b c\n")
    with pytest.raises(SystemExit) as exit_:
        example.main(["--data", str(tmp_path)])
    assert exit_.value.code == 2
    assert "no valid.txt there; the folder needs train.txt, valid.txt and test.txt" in capsys.readouterr().err


def test_the_corpus_keeps_the_stream_and_ends_lines_with_eos(tmp_path):
    data = write_corpus(tmp_path / "corpus")
    corpus = example.Corpus(data)
    words = {i: w for w, i in corpus.words.items()}
    first_line = (data / "train.txt").read_text().splitlines()[0].split()
    assert [words[int(i)] for i in corpus.train[: len(first_line) + 1]] == [*first_line, "<eos>"]
    rows = example.batchify(corpus.train, 7)
    windows = list(example.chunks(rows, 5))
    assert torch.equal(torch.cat([x for x, _ in windows], 1), rows[:, :-1])
    assert torch.equal(torch.cat([y for _, y in windows], 1), rows[:, 1:])


def wikitext_like(path: Path, titles: list[str]) -> None:
    path.write_text("".join(f" \n = {t} = \n \n intro of {t} \n \n = = Section = = \n \n body of {t} \n" for t in titles))


def test_prepare_splits_wikitext_by_top_level_article(tmp_path):
    source = tmp_path / "wt2"
    source.mkdir()
    wikitext_like(source / "valid.txt", [f"V{i}" for i in range(7)])
    wikitext_like(source / "test.txt", [f"T{i}" for i in range(8)])
    words = bench.prepare(source, tmp_path / "out")
    text = {name: (tmp_path / "out" / f"{name}.txt").read_text() for name in ("train", "valid", "test")}
    heads = {name: [line.split()[1] for line in body.splitlines() if line.startswith(" = ") and " = = " not in line]
             for name, body in text.items()}
    pool = [f"V{i}" for i in range(7)] + [f"T{i}" for i in range(8)]
    assert heads == {"valid": [pool[0], pool[10]], "test": [pool[1], pool[11]],
                     "train": [t for i, t in enumerate(pool) if i % 10 > 1]}
    assert text["train"].count("= = Section = =") == 11  # sections stay with their article
    assert sum(words.values()) == sum(len(p.read_text().split()) for p in source.iterdir())


def test_the_table_reads_the_runs_against_bp(tmp_path, capsys):
    for rule, ppls in (("bp", [100.0, 110.0]), ("dfa", [180.0, 200.0])):
        for seed, ppl in enumerate(ppls):
            (tmp_path / rule).mkdir(exist_ok=True)
            (tmp_path / rule / f"seed{seed}.json").write_text(json.dumps(
                {"valid_ppl": ppl, "test_ppl": ppl - 5, "epochs": 3, "step_ms": 50.0 + seed}))
    (tmp_path / "hybrid").mkdir()  # a rule whose first run is still training
    bench.main(["table", "--out", str(tmp_path), "--markdown"])
    rows = {row["rule"]: row for row in json.loads((tmp_path / "table.json").read_text())}
    assert set(rows) == {"bp", "dfa"}
    assert rows["bp"]["valid_ppl"] == "105.0 ± 7.1" and rows["dfa"]["valid_vs_bp"] == round(190 / 105, 2)
    assert "| dfa | 2 | 3 | 190.0 ± 14.1 | 185.0 ± 14.1 | 1.81 | 50 |" in capsys.readouterr().out
