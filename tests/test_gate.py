"""The regression gate on tiny hand-written metrics.json files, with and without a git baseline."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from pipeline import gate, original
from pipeline.config import ROOT, TASKS, GateParams, StageError, load
from tests.conftest import write_params

MINIMUMS = {task: 0.80 for task in TASKS}
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]


def project(root: Path, max_drop: float = 0.01, **minimums) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_params(root, gate={"min_test_accuracy": minimums or MINIMUMS, "max_drop": max_drop})
    return root


def write_metrics(root: Path, **accuracies) -> None:
    metrics = {t: {"test_accuracy": a, "test_loss": 1.5} for t, a in accuracies.items()}
    (root / "reports").mkdir(parents=True, exist_ok=True)
    (root / "reports" / "metrics.json").write_text(json.dumps(metrics))


def all_tasks(accuracy: float, **others) -> dict:
    return {**{task: accuracy for task in TASKS}, **others}


def commit_baseline(repo: Path, root: Path, **accuracies) -> None:
    """A git repository at `repo` whose HEAD holds `root`'s metrics.json with `accuracies`."""
    write_metrics(root, **accuracies)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "baseline"], cwd=repo, check=True)


def run_gate(capsys, root: Path, *args: str) -> tuple[int, str, str, dict | None]:
    code = gate.main(["--root", str(root), *args])
    out, err = capsys.readouterr()
    report = root / "reports" / "gate.json"
    return code, out, err, json.loads(report.read_text()) if report.exists() else None


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


def row(out: str, task: str) -> list[str]:
    """The table row of `task`, as stripped cells."""
    return cells(next(line for line in out.splitlines() if line.startswith(f"| {task} ")))


def test_pass_prints_every_task_and_writes_gate_json(tmp_path, capsys):
    root = project(tmp_path)
    write_metrics(root, **all_tasks(0.9))
    code, out, err, report = run_gate(capsys, root)
    assert code == 0, err
    for task in TASKS:
        assert row(out, task) == [task, "-", "90.00%", "80.00%", "ok"]
    assert report["passed"] is True and report["baseline"] is None
    assert report["tasks"]["task2"] == {
        "baseline": None, "now": 0.9, "allowed": 0.8, "verdict": "ok", "passed": True
    }  # fmt: skip
    assert (root / "reports" / "timing" / "gate.json").is_file()


def test_below_threshold_fails_with_table_and_one_line(tmp_path, capsys):
    root = project(tmp_path)
    write_metrics(root, **all_tasks(0.9, task3=0.7995))
    code, out, err, report = run_gate(capsys, root)
    assert code == 1
    assert row(out, "task3")[4] == "FAIL: below threshold"
    assert all(row(out, t)[4] == "ok" for t in ("task2", "task4", "task5"))
    assert err.splitlines() == ["gate: error: 1 task(s) regressed: task3"]
    assert report["passed"] is False
    assert [t for t, r in report["tasks"].items() if not r["passed"]] == ["task3"]
    assert not (root / "reports" / "timing" / "gate.json").exists()


def test_threshold_at_exactly_the_minimum_passes(tmp_path, capsys):
    root = project(tmp_path, task2=0.8746)
    write_metrics(root, task2=0.8746)
    assert run_gate(capsys, root)[0] == 0


def test_task_missing_from_metrics_fails(tmp_path, capsys):
    root = project(tmp_path)
    present = {task: 0.9 for task in TASKS if task != "task5"}
    write_metrics(root, **present)
    code, out, err, report = run_gate(capsys, root)
    assert code == 1
    assert row(out, "task5") == [
        "task5",
        "-",
        "missing",
        "80.00%",
        "FAIL: missing from metrics.json",
    ]
    assert err.splitlines() == ["gate: error: 1 task(s) regressed: task5"]
    assert report["tasks"]["task5"]["now"] is None


def test_drop_from_git_baseline_fails(tmp_path, capsys):
    root = project(tmp_path / "sub")  # the project in a subfolder of the repository
    commit_baseline(tmp_path, root, **all_tasks(0.9))
    write_metrics(root, **all_tasks(0.9, task2=0.87, task5=0.885))
    code, out, err, report = run_gate(capsys, root, "--baseline", "HEAD")
    assert code == 1
    assert row(out, "task2") == [
        "task2", "90.00%", "87.00%", "89.00%", "FAIL: dropped 3.00 points from baseline"
    ]  # fmt: skip
    assert row(out, "task5")[4] == "FAIL: dropped 1.50 points from baseline"
    assert err.splitlines() == ["gate: error: 2 task(s) regressed: task2, task5"]
    assert report["baseline"] == "HEAD" and len(report["baseline_commit"]) == 40
    assert report["tasks"]["task2"]["allowed"] == pytest.approx(0.89)


def test_drop_within_max_drop_passes(tmp_path, capsys):
    root = project(tmp_path)
    commit_baseline(tmp_path, root, **all_tasks(0.9))
    write_metrics(root, **all_tasks(0.9, task2=0.895, task3=0.89, task4=0.95))
    code, out, err, report = run_gate(capsys, root, "--baseline", "HEAD")
    assert code == 0, err
    assert report["passed"] is True
    assert all(row(out, t)[4] == "ok" for t in TASKS)


def test_both_reasons_are_named():
    r = gate.check_task(now=0.7, threshold=0.8, baseline=0.9, max_drop=0.01)
    assert r["verdict"] == "FAIL: below threshold; dropped 20.00 points from baseline"
    assert r["allowed"] == pytest.approx(0.89) and r["passed"] is False


def test_task_missing_from_baseline_is_checked_against_the_threshold(tmp_path, capsys):
    root = project(tmp_path)
    commit_baseline(tmp_path, root, task2=0.9, task3=0.9, task4=0.9)
    write_metrics(root, **all_tasks(0.85))
    code, out, err, report = run_gate(capsys, root, "--baseline", "HEAD")
    assert code == 1  # tasks 2-4 dropped 5 points
    assert report["tasks"]["task5"] == {
        "baseline": None, "now": 0.85, "allowed": 0.8, "passed": True,
        "verdict": "ok (not in baseline: threshold only)",
    }  # fmt: skip


@pytest.mark.parametrize(
    "rev, message",
    [("nope", "--baseline nope: no such commit"),
     ("HEAD~1", "--baseline HEAD~1: no such commit"),
     ("--output=x", "--baseline --output=x: no such commit")],
)  # fmt: skip
def test_bad_revision_is_one_line(tmp_path, capsys, rev, message):
    root = project(tmp_path)
    commit_baseline(tmp_path, root, **all_tasks(0.9))
    code, out, err, report = run_gate(capsys, root, f"--baseline={rev}")
    assert code == 1 and err.splitlines() == [f"gate: error: {message}"]
    assert report is None and not (tmp_path / "x").exists()


def test_revision_without_metrics_is_one_line(tmp_path, capsys):
    root = project(tmp_path)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "no metrics"], cwd=tmp_path, check=True)
    write_metrics(root, **all_tasks(0.9))
    code, out, err, _ = run_gate(capsys, root, "--baseline", "HEAD")
    assert code == 1
    assert err.splitlines() == [
        "gate: error: --baseline HEAD: no reports/metrics.json in that revision"
    ]


def test_missing_metrics_is_the_missing_input_line(tmp_path, capsys):
    root = project(tmp_path)
    code, out, err, report = run_gate(capsys, root)
    assert code == 1 and report is None
    assert err.splitlines() == [
        f"gate: error: missing input {root / 'reports' / 'metrics.json'} (run `dvc repro`)"
    ]


def test_markdown_is_appended_as_a_table(tmp_path, capsys):
    root = project(tmp_path)
    write_metrics(root, **all_tasks(0.9, task4=0.5))
    summary = tmp_path / "summary.md"
    summary.write_text("# Earlier step\n\n")
    assert run_gate(capsys, root, "--markdown", str(summary))[0] == 1
    text = summary.read_text()
    assert text.startswith("# Earlier step\n\n### Regression gate: FAILED\n")
    lines = [line for line in text.splitlines() if line.startswith("|")]
    rows = [cells(line) for line in lines]
    assert rows[0] == gate.HEADER
    assert re.fullmatch(r"\|(-{3,}\|){5}", lines[1])
    assert [r[0] for r in rows[2:]] == list(TASKS)
    assert all(len(r) == 5 for r in rows)
    assert text.count("|\n|") == len(lines) - 1  # one block, no blank line inside the table


def test_default_minimums_are_the_original_minus_two_points():
    p = load(ROOT / "params.yaml", "gate", GateParams)
    assert p.min_test_accuracy == pytest.approx(
        {
            **{task: original.TASKS[task]["test_accuracy"] - 0.02 for task in original.TASKS},
            "task6_mlp": 0.8934,  # Task 6's first committed run (91.34%) minus 2 points
            "task6_cnn": 0.91,  # its goal (93%) minus 2 points
        }
    )
    assert p.max_drop == 0.01


@pytest.mark.parametrize(
    "values, message",
    [
        ({"min_test_accuracy": {"task9": 0.5}}, "gate.min_test_accuracy: unknown task 'task9'"),
        ({"min_test_accuracy": {"task2": 89.5}}, r"gate.min_test_accuracy.task2: must be a number"),
        ({"min_test_accuracy": {"task2": True}}, r"gate.min_test_accuracy.task2: must be a number"),
        ({"min_test_accuracy": [0.8]}, "gate.min_test_accuracy: must be a mapping"),
        ({"max_drop": -0.01}, r"gate.max_drop: must be a number in \[0, 1\]"),
        ({"max_drop": "1 point"}, r"gate.max_drop: must be a number in \[0, 1\]"),
    ],
)
def test_bad_gate_params_name_the_key(tmp_path, values, message):
    path = write_params(tmp_path, gate=values)
    with pytest.raises(StageError, match=message):
        load(path, "gate", GateParams)
