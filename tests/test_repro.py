"""The real `dvc repro` on a temporary copy of the project, fed by the real data mirror."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import yaml

from pipeline.config import LETTERS, ROOT, TASKS
from tests.conftest import MIRROR, MIRROR_DIGEST, write_params
from tests.test_server import free_port, wait_for

pytestmark = pytest.mark.integration
COPY = [
    "pipeline",
    "dvc.yaml",
    "params.yaml",
    ".dvc/config",
    ".dvc/.gitignore",
    ".gitignore",
    ".dvcignore",
    ".dvc/plots",
]


def venv_env() -> dict:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=venv_env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def copy_project(root: Path) -> Path:
    """The project's pipeline files (COPY) under `root`."""
    for name in COPY:
        src, dst = ROOT / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh git + DVC copy of the project whose data source is the mirror."""
    if not MIRROR.is_file():
        pytest.fail(f"data mirror not found at {MIRROR} (set NOTMNIST_MIRROR)")
    root = copy_project(tmp_path_factory.mktemp("project"))
    write_params(root, data={"sources": [str(MIRROR)], "content_digest": MIRROR_DIGEST})
    run(["git", "init", "-q"], root)
    return root


def lock_outs(root: Path) -> dict:
    """Every stage's output hashes from dvc.lock."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {
        name: {
            o["path"]: o.get("md5")
            for o in stage.get("outs", [])
            if not o["path"].startswith("reports/timing/")  # seconds differ from run to run
        }
        for name, stage in lock["stages"].items()
    }


def test_data_stages_on_the_mirror(project):
    run(["dvc", "repro", "split"], project)

    index = pd.read_csv(project / "data/clean/index.csv")
    rejected = pd.read_csv(project / "reports/data/rejected.csv")
    assert len(index) == 18724
    assert sorted(rejected["path"]) == [
        "notMNIST_small/A/RGVtb2NyYXRpY2FCb2xkT2xkc3R5bGUgQm9sZC50dGY=.png",
        "notMNIST_small/F/Q3Jvc3NvdmVyIEJvbGRPYmxpcXVlLnR0Zg==.png",
    ]
    assert set(rejected["reason"]) == {"empty file"}

    download = json.loads((project / "reports/data/download.json").read_text())
    assert download["content_digest"] == MIRROR_DIGEST

    summary = json.loads((project / "reports/validation/summary.json").read_text())
    assert summary["success"] is True
    assert len(summary["label_conflicts"]) == 2
    assert (project / "reports/validation/docs/index.html").is_file()

    split = json.loads((project / "reports/data/split.json").read_text())
    assert split["counts"] == {"train": 15000, "val": 1000, "test": 2724}
    counts = index["letter"].value_counts()
    for s, size in split["counts"].items():
        for c in LETTERS:
            assert abs(split["per_letter"][s][c] - counts[c] * size / len(index)) < 1

    assert not list((project / "data/raw").glob(".*"))  # no temp files left behind


def test_second_repro_reruns_nothing_and_force_is_byte_identical(project):
    if not (project / "dvc.lock").exists():
        run(["dvc", "repro", "split"], project)
    before = lock_outs(project)
    out = run(["dvc", "repro", "split"], project)
    assert "Running stage" not in out
    out = run(["dvc", "repro", "--force", "split"], project)
    assert all(f"Running stage '{s}'" in out for s in ("download", "clean", "validate", "split"))
    assert lock_outs(project) == before
    assert "up to date" in run(["dvc", "status", "split"], project)


TINY_TRAINING = {
    "train": {"max_epochs": 2, "patience": 1},
    "task2": {"learning_rates": [0.1, 0.05], "hidden": [32]},
    "task3": {"hidden_sizes": [16, 32]},
    "task4": {"hidden": [16, 16]},
    "task5": {"hidden": [32]},
    "task6": {"max_epochs": 1, "patience": 1, "cnn_hidden": [16]},  # the CNNs cost the most
    "task7": {"widths": [4, 8, 8], "max_epochs": 1, "patience": 1},
    "robustness": {"shifts": [1], "rotations": [10], "scales": [0.8], "noise_std": [0.1]},
    "gate": {"min_test_accuracy": dict.fromkeys(TASKS, 0.5)},
}


def test_whole_pipeline_with_tiny_training(project, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store
    monkeypatch.delenv("NOTMNIST_MLFLOW_ARTIFACTS", raising=False)  # and its artifacts
    write_params(project, data={"sources": [str(MIRROR)]}, **TINY_TRAINING)
    out = run(["dvc", "repro"], project)
    assert "Running stage 'train_task6'" in out
    for task in TASKS:
        assert f"Running stage 'train_{task}'" in out or task.startswith("task6")
        assert (project / "models" / f"{task}.pt").is_file()
        best = json.loads((project / "reports/train" / task / "best.json").read_text())
        assert best["val_accuracy"] > 0.5, task
        assert (project / "reports/plots" / f"{task}_curves.png").is_file()
    lr = json.loads((project / "reports/train/task2/best.json").read_text())["config"]["lr"]
    for task in ("task3", "task4", "task5"):
        best = json.loads((project / "reports/train" / task / "best.json").read_text())
        assert best["config"]["lr"] == lr
    assert (project / "mlflow.db").is_file() and not (project / "mlruns").exists()
    assert any((project / "mlartifacts").rglob("MLmodel"))  # beside the store
    for name in ("mlflow.db", "mlartifacts"):  # each exits 1 if `name` is not ignored
        run(["git", "check-ignore", "-q", name], project)
        run(["dvc", "check-ignore", "-q", name], project)
    assert "Running stage" not in run(["dvc", "repro"], project)

    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert set(metrics) == set(TASKS)
    shown = run(["dvc", "metrics", "show", "--json"], project)
    (workspace,) = json.loads(shown).values()
    found = workspace["data"]["reports/metrics.json"]["data"]
    assert found["task4"]["test_accuracy"] == metrics["task4"]["test_accuracy"]
    html = project / "plots_html"
    run(["dvc", "plots", "show", "-o", str(html)], project)
    page = (html / "index.html").read_text()
    for name in ("reports/eval/task2/confusion.csv", "Validation loss per epoch", "tasks.png"):
        assert name in page, name
    assert "## Test results" in (project / "reports/summary.md").read_text()
    robustness = json.loads((project / "reports/robustness.json").read_text())
    assert set(robustness["results"]) == set(TASKS)
    assert robustness["conditions"][0] == {
        "name": "clean",
        "images": 2724,
        "description": "the test split as it is",
    }
    for task in TASKS:
        clean = robustness["results"][task]["clean"]["accuracy"]
        assert clean == pytest.approx(metrics[task]["test_accuracy"], abs=1e-12)
    assert "## Robustness" in (project / "reports/summary.md").read_text()


def test_task2_rerun_with_the_same_choice_retrains_nothing_downstream(project, monkeypatch):
    """Tasks 3-6 depend on what they use of Task 2: its learning rate (and Task 3 its model)."""
    assert (project / "reports/metrics.json").exists(), "runs after the whole-pipeline test"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = lock_outs(project)
    run(["dvc", "repro", "--force", "--single-item", "train_task2"], project)
    after = lock_outs(project)
    results = [p for p in before["train_task2"] if not p.endswith("mlflow.json")]
    assert {p: after["train_task2"][p] for p in results} == {  # the same bytes; new MLflow runs
        p: before["train_task2"][p] for p in results
    }
    status = run(["dvc", "status"], project)
    for task in TASKS[1:]:
        assert f"train_{task}:" not in status, status
    assert "evaluate:" in status  # it logs the test metrics into Task 2's new MLflow run
    # Left for test_experiment_and_metrics_diff: its experiment reruns these same stages.


def test_mlflow_ui_from_the_project_root_serves_the_artifacts(project):
    """`mlflow ui` with no options, from the project root: runs and artifacts over HTTP."""
    assert (project / "mlartifacts").is_dir(), "runs after the whole-pipeline test"
    env = {k: v for k, v in venv_env().items() if not k.startswith(("MLFLOW_", "NOTMNIST_"))}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # its 8 job processes are not tested
    uri = f"http://127.0.0.1:{free_port()}"
    cmd = ["mlflow", "ui", "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1], "--workers", "1"]
    with open(project.parent / "ui.log", "w") as log:
        ui = subprocess.Popen(cmd, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(uri, ui, project.parent / "ui.log")
        client = mlflow.MlflowClient(tracking_uri=uri)
        (experiment,) = [e for e in client.search_experiments() if e.name == "notmnist"]
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        record = json.loads((project / "reports/train/task2/mlflow.json").read_text())
        parent = client.get_run(record["parent_run_id"])  # the latest of Task 2's runs
        assert parent.info.experiment_id == experiment.experiment_id
        query = {"path": "task2_curves.png", "run_uuid": parent.info.run_id}
        got = requests.get(f"{uri}/get-artifact", params=query, timeout=30)
        assert got.ok and got.content == (project / "reports/plots/task2_curves.png").read_bytes()
        found = f"source_run_id = '{parent.info.run_id}'"
        (model,) = client.search_logged_models([experiment.experiment_id], found)
        url = f"{uri}/ajax-api/2.0/mlflow/logged-models/{model.model_id}/artifacts/files"
        got = requests.get(url, params={"artifact_file_path": "MLmodel"}, timeout=30)
        assert got.ok and "pytorch" in got.text
    finally:
        ui.terminate()
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            ui.kill()
            ui.wait()


def test_experiment_and_metrics_diff(project, monkeypatch):
    """`dvc exp run -S task7.dropout=0.2`: a new experiment, compared by metrics diff. (Task 7
    is last in line: only it and what reads its model rerun, not Tasks 2-6.)"""
    assert (project / "reports/metrics.json").exists(), "runs after the whole-pipeline test"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("NOTMNIST_MLFLOW_ARTIFACTS", raising=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    run(["git", "add", "-A"], project)
    run([*git, "commit", "-q", "-m", "tiny run"], project)
    out = run(["dvc", "exp", "run", "-n", "dropout", "-S", "task7.dropout=0.2"], project)
    assert "Running stage 'train_task7'" in out and "Running stage 'download'" not in out
    assert "Running stage 'train_task2'" not in out
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], project))
    changed = diff["reports/metrics.json"]
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())["task7"]["dropout"]
    assert changed["task7.config.dropout"]["old"] == committed != 0.2
    assert changed["task7.config.dropout"]["new"] == 0.2
    assert "task7.test_loss" in changed
    assert "dropout" in run(["dvc", "exp", "show", "--csv"], project)
    assert exp_runs(project, "dropout"), "the workspace experiment's runs carry its name"


def exp_runs(project: Path, name: str) -> list:
    """MLflow runs in the project's own store tagged with a DVC experiment name."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, filter_string=f"tags.dvc_exp_name = '{name}'")
