"""The code examples of the README and of docs/*.md run as written and learn; the pages link to
what exists; the README's set-up commands are the ones CI runs.

An example is a ```python block preceded by ``<!-- example: NAME -->``, in README.md or any page
under docs/: moving one between pages keeps it tested, and a name missing, repeated or new fails
``test_every_marked_example_is_run_here``."""

import re
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKED = re.compile(r"<!-- example: ([\w-]+) -->\n```python\n(.*?)```", re.DOTALL)
# the examples the tests below run, by name (test_sequence_rules.py runs "sequence")
EXAMPLES = {"prepare", "own-loop", "ddp", "lightning", "any-model", "sequence", "strip-feedback", "reuse-kernels"}


def marked_examples() -> dict[str, list[tuple[str, str]]]:
    """Every marked example of the pages: name -> [(page, code)], one entry per occurrence."""
    found: dict[str, list[tuple[str, str]]] = {}
    for page in PAGES:
        for name, code in MARKED.findall(page.read_text()):
            found.setdefault(name, []).append((page.relative_to(ROOT).as_posix(), code))
    return found


def example_code(name: str) -> tuple[str, str]:
    """The page holding the example NAME, and its code; one clear failure if it is missing or repeated."""
    places = marked_examples().get(name, [])
    assert len(places) == 1, (f"<!-- example: {name} --> is in {[page for page, _ in places] or 'no page'}: "
                              f"it must be in exactly one of README.md and docs/*.md")
    return places[0]


def run_example(name: str, **namespace) -> dict:
    page, code = example_code(name)
    exec(compile(code, f"{page}:{name}", "exec"), namespace)
    return namespace


def test_every_marked_example_is_run_here():
    found = marked_examples()
    assert set(found) == EXAMPLES, (f"missing: {sorted(EXAMPLES - set(found))}, "
                                    f"marked but run by no test: {sorted(set(found) - EXAMPLES)}")
    assert all(len(places) == 1 for places in found.values()), {n: [p for p, _ in v] for n, v in found.items()}


def test_the_readme_holds_the_two_set_up_commands_and_ci_runs_the_second():
    set_up = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", set_up, re.DOTALL)
    assert commands == [
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && trainer run quickstart",
        'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && python -m pytest',
    ]
    ci_command = (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1]
    assert ci_command == commands[1].replace(" && python -m pytest", " && ruff check . && python -m pytest"), \
        ".ci/run runs the README's test command, with ruff before the tests"


def test_the_readme_holds_no_dated_figures():
    """Dated measurements live in BENCHMARKS.md, where they keep their date, device and command."""
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", README)
    assert not re.search(r"\d\.\d+\s*(×|x\b)", README), "speed ratios belong in BENCHMARKS.md"


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_pages_reach_a_file_and_a_heading():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.MULTILINE)
                if anchor not in {github_anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_reuse_kernels_example_learns(capsys):
    losses = run_example("reuse-kernels")["losses"]
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert "loss" in capsys.readouterr().out


def test_rule_in_your_own_loop_example_learns():
    torch.manual_seed(0)
    images = torch.randn(512, 1, 28, 28)
    labels = (images.flatten(1) @ torch.randn(28 * 28, 10)).argmax(1)  # a linear teacher
    loader = DataLoader(TensorDataset(images, labels), batch_size=64, shuffle=True)
    namespace = run_example("own-loop", loader=loader)
    with torch.no_grad():
        accuracy = (namespace["model"](images).argmax(1) == labels).float().mean()
    assert accuracy > 0.6  # chance is 0.1
    assert namespace["rule"].diagnostics()["angle"] < 85  # the hidden units' updates align with BP's


def test_any_model_example_learns(capsys):
    torch.manual_seed(0)
    images = torch.randn(256, 3, 32, 32)
    labels = (images.flatten(1) @ torch.randn(3 * 32 * 32, 10)).argmax(1)
    loader = DataLoader(TensorDataset(images, labels), batch_size=32, shuffle=True)
    namespace = run_example("any-model", loader=loader)
    assert namespace["dfa_zoo"].unit_names == ["features.3", "features.8", "output"]
    assert namespace["dfa_mine"].unit_names == ["end", "output"]
    printed = capsys.readouterr().out
    assert "MobileNetV3: units" in printed and "TwoPaths: units" in printed
    with torch.no_grad():
        accuracy = (namespace["mine"](images).argmax(1) == labels).float().mean()
    assert accuracy > 0.3  # chance is 0.1


def linear_teacher_loader(n: int = 512, batch: int = 64):
    torch.manual_seed(0)
    images = torch.randn(n, 1, 28, 28)
    labels = (images.flatten(1) @ torch.randn(28 * 28, 10)).argmax(1)
    return images, labels, DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=True)


def test_prepare_example_learns_through_the_users_own_backward(capsys):
    images, labels, loader = linear_teacher_loader()
    namespace = run_example("prepare", loader=loader)
    assert not namespace["model"].training, "net.eval() set the model's mode"
    with torch.no_grad():
        accuracy = (namespace["net"](images).argmax(1) == labels).float().mean()
    assert accuracy > 0.5  # chance is 0.1
    assert capsys.readouterr().out.count("epoch") == 3


def test_lightning_example_learns():
    import pytest

    pytest.importorskip("lightning", reason="pip install -e '.[dev]' brings lightning")
    images, labels, loader = linear_teacher_loader()
    namespace = run_example("lightning", loader=loader)
    net = namespace["lit"].net.eval()
    with torch.no_grad():
        accuracy = (net(images).argmax(1) == labels).float().mean()
    assert accuracy > 0.4


def test_ddp_example_runs_under_torchrun_and_learns(tmp_path):
    import subprocess
    import sys

    _, code = example_code("ddp")
    script = tmp_path / "own_ddp.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, timeout=300,
                            cwd=ROOT, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"accuracy (\S+)", result.stdout).group(1))
    assert accuracy > 0.6 and result.stdout.count("accuracy") == 1  # chance is 0.25; rank 0 alone prints


def test_strip_feedback_example_loads_strictly_into_the_plain_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_example("strip-feedback")
    assert set(namespace["trained"].state_dict()) > set(namespace["plain"].state_dict()), "the feedback state is dropped"
