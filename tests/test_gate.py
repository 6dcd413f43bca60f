"""The regression gate on tiny hand-written metrics.json files, with and without a git baseline."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from pipeline import stats
from pipeline.config import ROOT, TASKS, GateParams, StageError, load
from pipeline.evaluation import original, regression
from pipeline.stages import gate
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
        assert row(out, task) == [task, "-", "90.00%", "-", "-", "-", "80.00%", "ok"]
    assert report["passed"] is True and report["baseline"] is None
    assert report["tasks"]["task2"] == {
        "baseline": None,
        "now": 0.9,
        "allowed": 0.8,
        "verdict": "ok",
        "passed": True,
        "b": None,
        "c": None,
        "p": None,
        "test": None,
    }
    assert (root / "reports" / "timing" / "gate.json").is_file()


def test_below_threshold_fails_with_table_and_one_line(tmp_path, capsys):
    root = project(tmp_path)
    write_metrics(root, **all_tasks(0.9, task3=0.7995))
    code, out, err, report = run_gate(capsys, root)
    assert code == 1
    assert row(out, "task3")[-1] == "FAIL: below threshold"
    assert all(row(out, t)[-1] == "ok" for t in ("task2", "task4", "task5"))
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
        "-",
        "-",
        "-",
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
    fallback = " (no per-image predictions at baseline: max_drop rule)"
    assert row(out, "task2") == [
        "task2",
        "90.00%",
        "87.00%",
        "-",
        "-",
        "-",
        "89.00%",
        "FAIL: dropped 3.00 points from baseline" + fallback,
    ]
    assert row(out, "task5")[-1] == "FAIL: dropped 1.50 points from baseline" + fallback
    assert report["tasks"]["task2"]["test"] == "max_drop"
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
    assert all(row(out, t)[-1].startswith("ok (no per-image predictions") for t in TASKS)


def test_both_reasons_are_named():
    r = regression.check_task(now=0.7, threshold=0.8, baseline=0.9, max_drop=0.01)
    assert r["verdict"] == "FAIL: below threshold; dropped 20.00 points from baseline"
    assert r["allowed"] == pytest.approx(0.89) and r["passed"] is False


def test_task_missing_from_baseline_is_checked_against_the_threshold(tmp_path, capsys):
    root = project(tmp_path)
    commit_baseline(tmp_path, root, task2=0.9, task3=0.9, task4=0.9)
    write_metrics(root, **all_tasks(0.85))
    code, out, err, report = run_gate(capsys, root, "--baseline", "HEAD")
    assert code == 1  # tasks 2-4 dropped 5 points
    assert report["tasks"]["task5"] == {
        "baseline": None,
        "now": 0.85,
        "allowed": 0.8,
        "passed": True,
        "verdict": "ok (not in baseline: threshold only)",
        "b": None,
        "c": None,
        "p": None,
        "test": None,
    }


@pytest.mark.parametrize(
    "rev, message",
    [
        ("nope", "--baseline nope: no such commit"),
        ("HEAD~1", "--baseline HEAD~1: no such commit"),
        ("--output=x", "--baseline --output=x: no such commit"),
    ],
)
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
    assert rows[0] == regression.HEADER
    assert re.fullmatch(r"\|(-{3,}\|){8}", lines[1])
    assert [r[0] for r in rows[2:]] == list(TASKS)
    assert all(len(r) == 8 for r in rows)
    assert text.count("|\n|") == len(lines) - 1  # one block, no blank line inside the table


def test_default_minimums_are_the_original_minus_two_points():
    p = load(ROOT / "params.yaml", "gate", GateParams)
    assert p.min_test_accuracy == pytest.approx(
        {
            **{task: original.REPORTED[task]["test_accuracy"] - 0.02 for task in original.REPORTED},
            "task6_mlp": 0.8934,  # Task 6's first committed run (91.34%) minus 2 points
            "task6_cnn": 0.91,  # its goal (93%) minus 2 points
            "task7": 0.94,  # its goal (96%) minus 2 points
        }
    )
    assert p.max_drop == 0.01
    assert p.alpha == 0.05


@pytest.mark.parametrize(
    "values, message",
    [
        ({"min_test_accuracy": {"task9": 0.5}}, "gate.min_test_accuracy: unknown task 'task9'"),
        ({"min_test_accuracy": {"task2": 89.5}}, r"gate.min_test_accuracy.task2: must be a number"),
        ({"min_test_accuracy": {"task2": True}}, r"gate.min_test_accuracy.task2: must be a number"),
        ({"min_test_accuracy": [0.8]}, "gate.min_test_accuracy: must be a mapping"),
        ({"max_drop": -0.01}, r"gate.max_drop: must be a number in \[0, 1\]"),
        ({"max_drop": "1 point"}, r"gate.max_drop: must be a number in \[0, 1\]"),
        ({"alpha": 0}, r"gate.alpha: must be a number in \(0, 1\)"),
        ({"alpha": 1}, r"gate.alpha: must be a number in \(0, 1\)"),
        ({"alpha": "5%"}, r"gate.alpha: must be a number in \(0, 1\)"),
    ],
)
def test_bad_gate_params_name_the_key(tmp_path, values, message):
    path = write_params(tmp_path, gate=values)
    with pytest.raises(StageError, match=message):
        load(path, "gate", GateParams)


# McNemar's exact test: p-values, then the gate on constructed per-image predictions


@pytest.mark.parametrize(
    "b, c, p",
    [
        (0, 0, 1.0),  # no disagreement: no evidence either way
        (1, 0, 1.0),  # 2 * 1/2
        (5, 0, 0.0625),  # 2 * 1/32
        (0, 5, 0.0625),  # symmetric
        (10, 3, 0.09228515625),  # 2 * (1 + 13 + 78 + 286) / 2**13
        (15, 2, 0.00234985351562500),  # 2 * (1 + 17 + 136) / 2**17
        (7, 7, 1.0),  # the tail passes 1/2: capped at 1
    ],
)
def test_mcnemar_exact_matches_hand_computed_binomial_tails(b, c, p):
    assert stats.mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


@pytest.mark.parametrize(
    "b, c", [(1, 2), (3, 9), (20, 31), (57, 40), (100, 130), (250, 251), (1200, 1100), (0, 40)]
)
def test_mcnemar_exact_matches_scipy_binomtest(b, c):
    from scipy.stats import binomtest

    expected = binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    assert stats.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError, match="counts must be >= 0"):
        stats.mcnemar_exact(-1, 3)


def flags(both: int, b: int, c: int, neither: int) -> tuple[list[bool], list[bool]]:
    """(old correct, new correct) per image with the four cells of McNemar's table."""
    old = [True] * both + [True] * b + [False] * c + [False] * neither
    new = [True] * both + [False] * b + [True] * c + [False] * neither
    return old, new


def predictions_csv(correct: list[bool], paths: str = "img") -> str:
    lines = ["row,path,true,predicted,probability"]
    for i, ok in enumerate(correct):
        true = "ABCDEFGHIJ"[i % 10]
        predicted = true if ok else "ABCDEFGHIJ"[(i + 3) % 10]
        lines.append(f"{i},notMNIST_small/{true}/{paths}{i:04d}.png,{true},{predicted},0.900000")
    return "\n".join(lines) + "\n"


def write_predictions(root: Path, task: str, correct: list[bool], paths: str = "img") -> None:
    """predictions.csv of `task` and a metrics.json entry whose accuracy matches it."""
    folder = root / "reports" / "eval" / task
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "predictions.csv").write_text(predictions_csv(correct, paths))
    metrics_path = root / "reports" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    metrics[task] = {"test_accuracy": sum(correct) / len(correct), "test_loss": 1.5}
    metrics_path.write_text(json.dumps(metrics))


def paired_project(tmp_path: Path, old: list[bool], new: list[bool], **new_kwargs) -> Path:
    """Task 2 only: `old` committed as the baseline, `new` in the working tree."""
    root = project(tmp_path, task2=0.5)
    write_predictions(root, "task2", old)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "baseline"], cwd=tmp_path, check=True)
    write_predictions(root, "task2", new, **new_kwargs)
    return root


def test_identical_predictions_pass_with_p_one(tmp_path, capsys):
    old, _ = flags(180, 0, 0, 20)
    root = paired_project(tmp_path, old, old)
    code, out, err, report = run_gate(capsys, root, "--baseline", "HEAD")
    assert code == 0, err
    assert row(out, "task2") == ["task2", "90.00%", "90.00%", "0", "0", "1", "50.00%", "ok"]
    r = report["tasks"]["task2"]
    assert (r["b"], r["c"], r["p"], r["test"]) == (0, 0, 1.0, "mcnemar")
    assert report["alpha"] == 0.05


def test_slightly_worse_but_not_significant_passes(tmp_path, capsys):
    """3 more mistakes in 200 images (1.5 points, more than max_drop): noise, p = 0.45."""
    old, new = flags(175, 5, 2, 18)
    root = paired_project(tmp_path, old, new)
    code, out, err, report = run_gate(capsys, root, "--baseline", "HEAD")
    assert code == 0, err
    r = report["tasks"]["task2"]
    assert (r["baseline"], r["now"]) == (pytest.approx(0.90), pytest.approx(0.885))
    assert (r["b"], r["c"]) == (5, 2)
    assert r["p"] == pytest.approx(2 * (1 + 7 + 21) / 2**7)  # 0.453125
    assert row(out, "task2") == ["task2", "90.00%", "88.50%", "5", "2", "0.453", "50.00%", "ok"]


def test_significantly_worse_fails(tmp_path, capsys):
    old, new = flags(165, 15, 2, 18)
    root = paired_project(tmp_path, old, new)
    code, out, err, report = run_gate(capsys, root, "--baseline", "HEAD")
    assert code == 1
    r = report["tasks"]["task2"]
    assert (r["b"], r["c"]) == (15, 2)
    assert r["p"] == pytest.approx(308 / 2**17)
    assert r["verdict"] == "FAIL: significantly worse than baseline (p = 0.0023 < 0.05)"
    assert row(out, "task2")[3:6] == ["15", "2", "0.00235"]
    assert err.splitlines() == ["gate: error: 1 task(s) regressed: task2"]


def test_significantly_better_passes_and_says_so(tmp_path, capsys):
    old, new = flags(165, 2, 15, 18)
    root = paired_project(tmp_path, old, new)
    code, out, err, report = run_gate(capsys, root, "--baseline", "HEAD")
    assert code == 0, err
    assert report["tasks"]["task2"]["verdict"] == "ok: significantly better"


def test_alpha_is_the_params_level(tmp_path, capsys):
    """b = 10, c = 3: p = 0.092, a failure at alpha 0.1 and a pass at 0.05."""
    old, new = flags(170, 10, 3, 17)
    root = paired_project(tmp_path, old, new)
    assert run_gate(capsys, root, "--baseline", "HEAD")[0] == 0
    write_params(root, gate={"min_test_accuracy": {"task2": 0.5}, "alpha": 0.1})
    code, _, _, report = run_gate(capsys, root, "--baseline", "HEAD")
    assert code == 1 and report["tasks"]["task2"]["p"] == pytest.approx(0.09228515625)


def test_the_paired_test_also_keeps_the_minimum(tmp_path, capsys):
    old, _ = flags(180, 0, 0, 20)
    root = paired_project(tmp_path, old, old)
    write_params(root, gate={"min_test_accuracy": {"task2": 0.95}})
    code, out, _, _ = run_gate(capsys, root, "--baseline", "HEAD")
    assert code == 1 and row(out, "task2")[-1] == "FAIL: below threshold"


def test_another_test_split_fails_in_one_line(tmp_path, capsys):
    old, new = flags(180, 0, 0, 20)
    root = paired_project(tmp_path, old, new, paths="other")
    code, out, err, report = run_gate(capsys, root, "--baseline", "HEAD")
    assert code == 1 and report is None
    assert err.splitlines() == [
        "gate: error: task2: the test split differs between the baseline and now (row, path, "
        "letter: 0 notMNIST_small/A/img0000.png A then, 0 notMNIST_small/A/other0000.png A now); "
        "the paired test needs the same test images (compare with --baseline on the same split)"
    ]


def test_another_test_size_fails_in_one_line(tmp_path, capsys):
    old, _ = flags(180, 0, 0, 20)
    root = paired_project(tmp_path, old, old[:150])
    code, _, err, _ = run_gate(capsys, root, "--baseline", "HEAD")
    assert code == 1
    assert (
        "the test split differs between the baseline and now (200 test images then, 150 now)" in err
    )


def test_predictions_that_disagree_with_metrics_fail(tmp_path, capsys):
    old, new = flags(175, 5, 2, 18)
    root = paired_project(tmp_path, old, new)
    write_metrics(root, task2=0.95)  # stale: not the run that wrote predictions.csv
    code, _, err, _ = run_gate(capsys, root, "--baseline", "HEAD")
    assert code == 1
    assert err.strip().endswith(
        "accuracy 88.50% but metrics.json says 95.00%: not from the same "
        "evaluate run (run `dvc repro`)"
    )


def test_baseline_without_predictions_falls_back_per_task(tmp_path, capsys):
    """An older baseline had predictions for task2 only: task3 is judged by max_drop."""
    root = project(tmp_path, task2=0.5, task3=0.5)
    old, new = flags(175, 5, 2, 18)
    write_predictions(root, "task2", old)
    write_metrics_entry(root, "task3", 0.90)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "baseline"], cwd=tmp_path, check=True)
    write_predictions(root, "task2", new)
    write_predictions(root, "task3", [True] * 176 + [False] * 24)  # 88%: 2 points lower
    code, out, err, report = run_gate(capsys, root, "--baseline", "HEAD")
    assert code == 1
    assert report["tasks"]["task2"]["test"] == "mcnemar" and report["tasks"]["task2"]["passed"]
    assert report["tasks"]["task3"]["test"] == "max_drop"
    assert row(out, "task3") == [
        "task3",
        "90.00%",
        "88.00%",
        "-",
        "-",
        "-",
        "89.00%",
        "FAIL: dropped 2.00 points from baseline (no per-image predictions at baseline: "
        "max_drop rule)",
    ]


def write_metrics_entry(root: Path, task: str, acc: float) -> None:
    path = root / "reports" / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics[task] = {"test_accuracy": acc, "test_loss": 1.5}
    path.write_text(json.dumps(metrics))


def test_markdown_names_the_paired_test(tmp_path, capsys):
    old, new = flags(175, 5, 2, 18)
    root = paired_project(tmp_path, old, new)
    summary = tmp_path / "summary.md"
    assert run_gate(capsys, root, "--baseline", "HEAD", "--markdown", str(summary))[0] == 0
    text = summary.read_text()
    assert "McNemar's exact test" in text and "p < 0.05" in text
    assert "| task2 " in text and "| 0.453 " in text
