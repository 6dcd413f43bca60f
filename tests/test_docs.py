"""The docs: links and anchors that hold, commands that exist, figures equal to reports/."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import docs

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = docs.documents(ROOT)


def code_chunks(text: str) -> list[str]:
    """The contents of fenced blocks and code spans: where the docs name commands."""
    chunks = [m.group(0) for m in docs.FENCE.finditer(text)]
    prose = docs.FENCE.sub("", text)
    return chunks + [m.group(0).strip("`") for m in docs.CODE_SPAN.finditer(prose)]


def make_targets_named(text: str) -> set[str]:
    """Every target of a `make ...` command in the code of a Markdown text."""
    targets = set()
    for chunk in code_chunks(text):
        for match in re.finditer(r"(?:^|[\s;&|(])make((?:[ \t]+[^\s;&|)`#]+)+)", chunk, re.M):
            words = [w for w in match.group(1).split() if "=" not in w and not w.startswith("-")]
            if words:
                targets.add(words[0])
    return targets


def modules_named(text: str) -> set[str]:
    """Every module of a `python -m ...` (or torchrun -m) command in the code of a text."""
    found = set()
    for chunk in code_chunks(text):
        pattern = r"\b(?:python3?|torchrun)\b[^\n]*?\s-m\s+([A-Za-z_][\w.]*)(?![\w.<])"
        found.update(re.findall(pattern, chunk))
    return found


def makefile_targets(path: Path) -> set[str]:
    targets = set()
    for line in path.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9_.\-/ ]+?)\s*::?(?!=)", line)
        if match and not line.startswith("\t"):
            targets.update(match.group(1).split())
    return targets


def module_exists(name: str) -> bool:
    """Whether `python -m name` finds a module, importing nothing (not even its packages)."""
    parts = name.split(".")
    spec = importlib.util.find_spec(parts[0])
    for depth in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            return False
        spec = importlib.machinery.PathFinder.find_spec(
            ".".join(parts[: depth + 1]), list(spec.submodule_search_locations)
        )
    return spec is not None


def tiny_project(root: Path) -> Path:
    """A project root with one reports file and a README holding one figure of it."""
    (root / "reports").mkdir(parents=True)
    metrics = {"task7": {"test_accuracy": 0.9607, "val_accuracy": 0.961}}
    (root / "reports" / "metrics.json").write_text(json.dumps(metrics))
    readme = root / "README.md"
    readme.write_text(
        "# Title\n\nTask 7: <!-- value:start metrics.json task7/test_accuracy pct -->"
        "<!-- value:end -->.\n\n<!-- table:start summary.md Results -->\n<!-- table:end -->\n"
    )
    (root / "reports" / "summary.md").write_text(
        "# Summary\n\n## Results\n\n| task | acc | plot |\n| --- | --- | --- |\n"
        "| task7 | 96.07% | [curves](plots/task7.png) |\n"
    )
    return readme


# ----------------------------------------------------------------------------- the real docs


def test_the_docs_exist_and_the_readme_is_short():
    assert (ROOT / "README.md") in DOCUMENTS and len(DOCUMENTS) > 5
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(path):
    assert docs.broken_links(path, ROOT) == []


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_make_target_named_exists(path):
    missing = make_targets_named(path.read_text()) - makefile_targets(ROOT / "Makefile")
    assert not missing, f"{path.name} names make targets the Makefile lacks: {sorted(missing)}"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_python_module_named_can_be_found(path):
    missing = sorted(m for m in modules_named(path.read_text()) if not module_exists(m))
    assert not missing, f"{path.name} names modules that python -m cannot find: {missing}"


def test_every_generated_block_equals_what_reports_say():
    result = subprocess.run(
        [sys.executable, "-m", "scripts.docs", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_every_flag_has_help():
    actions = docs.build_parser()._actions
    assert all(action.help for action in actions)


# ----------------------------------------------------------------------------- the checker


def test_check_passes_after_a_fill_and_names_a_changed_figure(tmp_path):
    readme = tiny_project(tmp_path)
    assert docs.run(tmp_path, [readme], check=False, show_diff=False, links=False) == []
    filled = readme.read_text()
    assert "96.07%<!-- value:end -->" in filled
    assert "[curves](reports/plots/task7.png)" in filled  # rebased from reports/ to the root
    assert docs.run(tmp_path, [readme], check=True, show_diff=False, links=False) == []

    readme.write_text(filled.replace("96.07%", "96.08%", 1))
    problems = docs.run(tmp_path, [readme], check=True, show_diff=False, links=False)
    assert len(problems) == 1
    assert "README.md:3: block 'value metrics.json task7/test_accuracy pct' differs" in problems[0]
    assert "96.08%" in readme.read_text()  # --check writes nothing


def test_check_fails_when_the_reports_change(tmp_path):
    readme = tiny_project(tmp_path)
    docs.run(tmp_path, [readme], check=False, show_diff=False, links=False)
    summary = tmp_path / "reports" / "summary.md"
    summary.write_text(summary.read_text().replace("96.07%", "95.00%"))
    problems = docs.run(tmp_path, [readme], check=True, show_diff=False, links=False)
    assert [p.split(": block ")[1] for p in problems] == [
        "'table summary.md Results' differs from what reports/ says"
    ]


def test_a_block_that_cannot_be_filled_is_named(tmp_path):
    readme = tiny_project(tmp_path)
    readme.write_text(
        "<!-- value:start metrics.json task9/test_accuracy pct --><!-- value:end -->\n"
        "<!-- nosuch:start -->\n<!-- nosuch:end -->\n"
    )
    problems = docs.run(tmp_path, [readme], check=False, show_diff=False, links=False)
    assert problems[0].endswith("no key 'task9/test_accuracy'")
    assert "README.md:2: block 'nosuch': unknown block" in problems[1]


def test_a_start_without_its_end_is_named(tmp_path):
    readme = tiny_project(tmp_path)
    readme.write_text("<!-- timing:start -->\n\nno end\n")
    problems = docs.run(tmp_path, [readme], check=True, show_diff=False, links=False)
    assert problems == ["README.md: a block's start has no matching end"]


def test_blocks_inside_code_fences_are_examples(tmp_path):
    readme = tiny_project(tmp_path)
    block = "<!-- value:start metrics.json task7/val_accuracy pct --><!-- value:end -->"
    example = f"```markdown\n{block}\n```\n"
    readme.write_text(example)
    docs.run(tmp_path, [readme], check=False, show_diff=False, links=False)
    assert readme.read_text() == example


def test_table_keeps_the_columns_and_rows_asked_for(tmp_path):
    readme = tiny_project(tmp_path)
    ctx = docs.Context(root=tmp_path, doc=readme)
    text = docs.block_table(ctx, "summary.md", "Results", "columns=1-2", "rows=task7")
    assert text.splitlines() == ["| task | acc |", "| --- | --- |", "| task7 | 96.07% |"]
    with pytest.raises(docs.DocsError, match="no row 'task8'"):
        docs.block_table(ctx, "summary.md", "Results", "rows=task8")


# ----------------------------------------------------------------------------- links


def test_a_broken_link_and_a_missing_anchor_are_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(
        "# Page\n\n## Set-up: two `make` commands\n\n## A\n\n## A\n"
    )
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Top\n\n[fine](docs/page.md#set-up-two-make-commands) [dup](docs/page.md#a-1) "
        "[self](#top)\n[gone](docs/missing.md) [bad](docs/page.md#nowhere) [x](#a-2)\n"
        "`[in code](nowhere.md)` [web](https://example.org/x.md)\n"
    )
    problems = docs.broken_links(readme, tmp_path)
    assert problems == [
        "README.md:4: docs/missing.md: no such file",
        "README.md:4: docs/page.md#nowhere: no heading gives #nowhere",
        "README.md:4: #a-2: no heading gives #a-2",
    ]


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Checking a clone: `make verify`", "checking-a-clone-make-verify"),
        (
            "Task 6: the original's best model, and a LeNet-5-style CNN",
            "task-6-the-originals-best-model-and-a-lenet-5-style-cnn",
        ),
        ("Tasks 2-5: the original", "tasks-2-5-the-original"),
        ("2026-11-28: OpenMP's wait policy", "2026-11-28-openmps-wait-policy"),
        ("train_task7 and [a link](x.md)", "train_task7-and-a-link"),
    ],
)
def test_slugs_follow_github(heading, anchor):
    assert docs.slug(heading) == anchor


def test_the_helpers_find_commands_in_code_only():
    text = (
        "Run `make verify REV=HEAD` or `make DVC_REPRO_ARGS=--force repro`; to make sure.\n"
        "```bash\npython -m pipeline.predict x.png && python -X importtime -m <stage>\n"
        "torchrun --nnodes 2 -m pipeline.stages.train_task2\n```\n"
    )
    assert make_targets_named(text) == {"verify", "repro"}
    assert modules_named(text) == {"pipeline.predict", "pipeline.stages.train_task2"}
    assert module_exists("scripts.docs") and not module_exists("scripts.nosuch")
