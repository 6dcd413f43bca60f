"""`make verify` and the seed study end to end: a real `dvc repro`, committed, on a tiny archive.

What these check is the machinery (a clean clone rerun from nothing; queued experiments with
two DVC queue workers), not the data, so a 300-image archive stands in for the mirror that
tests/test_repro.py uses, and this file runs beside that one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipeline.config import ROOT, TASKS
from pipeline.data.archive import content_digest
from tests.conftest import make_archive, tiny_dataset, write_params
from tests.test_repro import TINY_TRAINING, copy_project, exp_runs, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC copy of the project on a tiny archive, its tiny run committed."""
    root = copy_project(tmp_path_factory.mktemp("study"))
    archive = make_archive(root.parent / "tiny.tar.gz", tiny_dataset(per_letter=30))
    write_params(
        root,
        data={"sources": [str(archive)], "content_digest": content_digest(archive)},
        split={"train_size": 200, "val_size": 50},
        **{**TINY_TRAINING, "gate": {"min_test_accuracy": dict.fromkeys(TASKS, 0.0)}},
    )
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    run(["git", "init", "-q"], root)
    with pytest.MonkeyPatch.context() as env:  # the project's own store, as `make verify` uses
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.delenv("NOTMNIST_MLFLOW_ARTIFACTS", raising=False)
        run(["dvc", "repro"], root)
    run(["git", "add", "-A"], root)
    run([*git, "commit", "-q", "-m", "tiny run"], root)
    return root


def test_verify_reruns_the_committed_pipeline_from_nothing(project, monkeypatch):
    """`make verify` on the committed tiny run: a clean clone, `dvc repro`, the same hashes."""
    assert "tiny run" in run(["git", "log", "--oneline"], project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = run([sys.executable, "-m", "pipeline.verify", "--root", str(project)], ROOT)
    assert "Reproducibility: all" in out and "outputs reproduced" in out, out
    assert not list(project.parent.glob(f".{project.name}-verify-*"))  # the clone is gone


def test_seed_study_reruns_only_training(project, tmp_path, monkeypatch):
    """`python -m pipeline.seeds --run --seeds 2`: queued experiments, two DVC queue workers.

    The experiments run in temporary copies of the project; their MLflow runs and artifacts
    land in the project's own store all the same, and the data stages come from the cache.
    """
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("NOTMNIST_MLFLOW_ARTIFACTS", raising=False)
    seeds = [sys.executable, "-m", "pipeline.seeds", "--seeds", "2"]
    run([*seeds, "--run", "--jobs", "2", "--timeout-s", "900"], project)

    study = json.loads((project / "reports/seeds/seeds.json").read_text())
    assert study["seeds"] == [0, 1] and study["wall_seconds"] > 0 and study["jobs"] == 2
    assert study["stages_run"]["seed-0"] == []  # the committed run is seed 0: nothing reruns
    ran = study["stages_run"]["seed-1"]
    assert {f"train_{t}" for t in ("task2", "task3", "task4", "task5", "task6")} <= set(ran)
    assert "evaluate" in ran and not set(ran) & {"download", "clean", "validate", "split", "gate"}
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert set(study["tasks"]) == set(TASKS)  # seeds.json: sorted keys
    for task in TASKS:
        t = study["tasks"][task]
        assert t["accuracies"]["0"] == metrics[task]["test_accuracy"]
        assert t["min"] <= t["mean"] <= t["max"]
    runs = exp_runs(project, "seed-1")
    assert {r.data.tags["task"] for r in runs} == set(TASKS)
    store = (project / "mlartifacts").resolve().as_uri()
    assert all(r.info.artifact_uri.startswith(store) for r in runs)
    for name in ("mlflow.db", "mlartifacts"):
        assert not list((project / ".dvc").rglob(name)), name
    assert "seed-1" in run(["dvc", "exp", "show", "--csv"], project)
    assert (project / "reports/seeds/seeds.png").is_file()
    assert "# Seed study" in (project / "reports/seeds/seeds.md").read_text()

    # Aggregating again (no --run) finds the same experiments and keeps the run's record.
    run(seeds, project)
    again = json.loads((project / "reports/seeds/seeds.json").read_text())
    assert again["wall_seconds"] == study["wall_seconds"] and again["tasks"] == study["tasks"]

    # The report, rerun, judges the original against the seeds.
    run(["dvc", "repro", "--single-item", "--force", "report"], project)
    summary = (project / "reports/summary.md").read_text()
    assert "original within mean +- 2 sd of 2 seeds" in summary
    assert "[seeds.md](seeds/seeds.md)" in summary
