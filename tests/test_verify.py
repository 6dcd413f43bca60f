"""`make verify`: which outputs of a rerun differ from the committed dvc.lock, and how."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from pipeline import verify
from pipeline.evaluation.summary import MACHINE_SECTION

SUMMARY = "# Summary\n\n| task | acc |\n| --- | --- |\n| task2 | 89.54% |\n\n"


def lock(md5s: dict[str, str]) -> str:
    """A dvc.lock with one stage per output."""
    stages = {
        f"s{i}": {"cmd": "x", "outs": [{"path": p, "md5": m}]}
        for i, (p, m) in enumerate(md5s.items())
    }
    return yaml.safe_dump({"schema": "2.0", "stages": stages})


def project(tmp_path: Path, md5s: dict[str, str]) -> Path:
    (tmp_path / "dvc.lock").write_text(lock(md5s))
    return tmp_path


BASE = {
    "models/task2.pt": "a" * 32,
    "reports/metrics.json": "b" * 32,
    "reports/timing/train_task2.json": "c" * 32,
    "reports/train/task2/mlflow.json": "d" * 32,
    "reports/registry.json": "e" * 32,
    "reports/summary.md": "f" * 32,
}


def test_timing_and_run_records_are_not_compared(tmp_path):
    now = {
        **BASE,
        "reports/timing/train_task2.json": "1" * 32,
        "reports/registry.json": "3" * 32,
        "reports/train/task2/mlflow.json": "2" * 32,
    }
    root = project(tmp_path, now)
    (root / "reports").mkdir()
    (root / "reports/summary.md").write_text(SUMMARY + MACHINE_SECTION + "\n\nAMD EPYC, 12.3 s\n")
    committed = {"reports/summary.md": SUMMARY + MACHINE_SECTION + "\n\nIntel Xeon, 9.9 s\n"}
    differ, metrics, compared = verify.compare(root, lock(BASE), committed.get)
    assert differ == [] and metrics == []
    assert compared == 3  # the model, the metrics and the summary


def test_a_changed_model_metric_and_summary_are_named(tmp_path):
    now = {**BASE, "models/task2.pt": "9" * 32, "reports/metrics.json": "8" * 32}
    root = project(tmp_path, now)
    (root / "reports").mkdir()
    new_metrics = {"task2": {"test_accuracy": 0.8946, "config": {"lr": 0.1}}}
    (root / "reports/metrics.json").write_text(json.dumps(new_metrics))
    (root / "reports/summary.md").write_text(SUMMARY.replace("89.54", "89.46") + MACHINE_SECTION)
    old_metrics = {"task2": {"test_accuracy": 0.8954, "config": {"lr": 0.05}}}
    committed = {
        "reports/metrics.json": json.dumps(old_metrics),
        "reports/summary.md": SUMMARY + MACHINE_SECTION,
    }
    differ, metrics, _ = verify.compare(root, lock(BASE), committed.get)
    assert [d[0] for d in differ] == [
        "models/task2.pt",
        "reports/metrics.json",
        "reports/summary.md",
    ]
    assert differ[0][1] == "md5 aaaaaaaa -> 99999999"
    rows = {m[0]: m[1:] for m in metrics}
    assert rows["reports/metrics.json: task2.test_accuracy"] == ["0.8954", "0.8946", "-0.0008"]
    assert rows["reports/metrics.json: task2.config.lr"] == ["0.05", "0.1", "+0.05"]
    text = verify.verify_report(differ, metrics, 3, "here")
    assert "3 of 3 outputs differ" in text
    assert "| reports/metrics.json: task2.test_accuracy |" in text


def test_an_output_missing_from_the_rerun_is_named(tmp_path):
    now = dict(BASE)
    del now["models/task2.pt"]
    differ, _, _ = verify.compare(project(tmp_path, now), lock(BASE), {}.get)
    assert ["models/task2.pt", "missing from the rerun"] in differ


def git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def test_in_place_names_a_changed_metric_and_exits_1(tmp_path, capsys):
    root = tmp_path / "repo" / "project"  # the project in a subfolder of its repository
    (root / "reports").mkdir(parents=True)
    (root / "dvc.lock").write_text(lock({"reports/metrics.json": "0" * 32}))
    (root / "reports/metrics.json").write_text(json.dumps({"task2": {"test_accuracy": 0.9}}))
    git(tmp_path / "repo", "init", "-q")
    git(tmp_path / "repo", "add", "-A")
    git(tmp_path / "repo", "commit", "-q", "-m", "run")
    markdown = tmp_path / "summary.md"
    assert verify.main(["--root", str(root), "--in-place", "--markdown", str(markdown)]) == 0
    assert "all 1 outputs reproduced" in capsys.readouterr().out

    (root / "dvc.lock").write_text(lock({"reports/metrics.json": "1" * 32}))
    (root / "reports/metrics.json").write_text(json.dumps({"task2": {"test_accuracy": 0.88}}))
    assert verify.main(["--root", str(root), "--in-place", "--markdown", str(markdown)]) == 1
    out = capsys.readouterr().out
    assert "| reports/metrics.json | md5 00000000 -> 11111111 |" in out
    assert "| reports/metrics.json: task2.test_accuracy | 0.9 | 0.88 | -0.02 |" in out
    assert markdown.read_text().count("### Reproducibility") == 2
