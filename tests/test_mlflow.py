"""The train_task stages end to end on a tiny project: MLflow runs, logged model, outputs.

The stages run once per module (Task 2 with one diverging learning rate, then Tasks 3-5 at
Task 2's choice); every test reads what they left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import ROOT, Paths
from pipeline.data import archive
from pipeline.stages import clean, split, train_task2, train_task3, train_task4, train_task5
from pipeline.training.loop import evaluate_split, load_splits
from pipeline.training.model import load_model
from tests.conftest import make_archive, tiny_dataset, write_params

EXPERIMENT = "notmnist"
DVC_EXP = "tiny-exp"
METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
TAGS = ("task", "git_commit", "git_dirty", "data_content_digest", "device", "torch_version")
LRS = [1e30, 0.1]  # the absurd one first: the sweep must go on past it (a pool starts 0.1 first)
CHOSEN_LR = 0.1
TRAIN = {
    "batch_size": 16,
    "max_epochs": 3,
    "patience": 1,
    "softmax_output": False,
    "device": "cpu",
}
TASKS = {
    "task2": train_task2,
    "task3": train_task3,
    "task4": train_task4,
    "task5": train_task5,
}


@dataclass
class Project:
    root: Path
    artifacts: Path
    uri: str
    digest: str
    commit: str
    codes: dict[str, int]
    failed_code: int
    failed_stderr: str
    failed_unchanged: bool

    @property
    def paths(self) -> Paths:
        return Paths(self.root)

    def best(self, task: str) -> dict:
        return json.loads((self.paths.train_reports(task) / "best.json").read_text())

    def history(self, task: str) -> pd.DataFrame:
        return pd.read_csv(self.paths.train_reports(task) / "history.csv")

    def runs_record(self, task: str) -> dict:
        return json.loads((self.paths.train_reports(task) / "mlflow.json").read_text())


def git(root: Path, *args: str) -> str:
    config = ["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    cmd = ["git", *config, *args]
    return subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    base = tmp_path_factory.mktemp("mlflow")
    root, artifacts = base / "proj", base / "artifacts"
    paths = Paths(root)
    (root / "data" / "raw").mkdir(parents=True)
    make_archive(paths.raw_archive, tiny_dataset(per_letter=12))
    write_params(
        root,
        split={"train_size": 60, "val_size": 30},
        train=TRAIN,
        task2={"learning_rates": LRS, "hidden": [16]},
        task3={"hidden_sizes": [8, 16, 12]},  # the best (16) in the middle
        task4={"hidden": [8, 8]},
        task5={"hidden": [16], "dropout": 0.5},
        mlflow={"experiment": EXPERIMENT},
    )
    digest = archive.content_digest(paths.raw_archive)
    paths.data_reports.mkdir(parents=True)
    (paths.data_reports / "download.json").write_text(json.dumps({"content_digest": digest}))
    git(root, "init", "-q")
    git(root, "add", "params.yaml")
    git(root, "commit", "-q", "-m", "tiny project")
    commit = git(root, "rev-parse", "HEAD").strip()

    uri = f"sqlite:///{root / 'mlflow.db'}"
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("NOTMNIST_MLFLOW_ARTIFACTS", str(artifacts))
        mp.setenv("DVC_EXP_NAME", DVC_EXP)
        mp.chdir(root)  # MLflow's cwd-relative defaults (mlruns/, mlartifacts/) would land here
        assert clean.main(["--root", str(root)]) == 0
        assert split.main(["--root", str(root)]) == 0
        codes = {name: stage.main(["--root", str(root)]) for name, stage in TASKS.items()}

        # Every configuration diverging fails the stage and leaves the outputs as they were.
        kept = [*paths.train_reports("task2").iterdir(), paths.models / "task2.pt"]
        kept.append(paths.plots / "task2_curves.png")
        before = {p: p.read_bytes() for p in kept}
        params = paths.params.read_text()
        write_params(
            root,
            train=TRAIN,
            task2={"learning_rates": [1e30], "hidden": [16]},
            mlflow={"experiment": "all-diverged"},
        )
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            failed = train_task2.main(["--root", str(root)])
        paths.params.write_text(params)
        unchanged = before == {p: p.read_bytes() for p in before}
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)  # the stages set it
    return Project(root, artifacts, uri, digest, commit, codes, failed, err.getvalue(), unchanged)


@pytest.fixture(scope="module")
def client(project):
    return mlflow.MlflowClient(tracking_uri=project.uri)


@pytest.fixture(scope="module")
def experiment(client):
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    return exp


def runs_of(client, experiment, task: str) -> tuple[object, list]:
    """The one parent run of `task` and its nested children, in start order."""
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.task = '{task}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    children = [r for r in runs if r is not parent]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    return parent, sorted(children, key=lambda r: r.info.start_time)


def by_config(children: list) -> dict:
    """{configuration label: child run}: a pool starts configurations in its own order."""
    return {c.info.run_name.split(" ", 1)[1]: c for c in children}


def test_stages_exit_0(project):
    assert project.codes == dict.fromkeys(TASKS, 0)


# MLflow runs


def test_task2_one_parent_one_nested_child_per_configuration(client, experiment):
    parent, children = runs_of(client, experiment, "task2")
    assert parent.info.run_name == "task2"
    assert sorted(c.info.run_name for c in children) == ["task2 lr=0.1", "task2 lr=1e+30"]
    # Nothing else in the experiment but the four tasks' runs.
    all_runs = client.search_runs([experiment.experiment_id])
    assert len(all_runs) == (1 + 2) + (1 + 3) + (1 + 1) + (1 + 1)


def test_diverged_child_failed_others_finished(client, experiment):
    parent, children = runs_of(client, experiment, "task2")
    diverged, good = by_config(children)["lr=1e+30"], by_config(children)["lr=0.1"]
    assert parent.info.status == "FINISHED"
    assert diverged.info.status == "FAILED"
    assert diverged.data.tags["status"] == "diverged"
    assert good.info.status == "FINISHED"
    assert good.data.tags["status"] == "ok"
    assert "best_val_loss" not in diverged.data.metrics
    assert "best_val_loss" in good.data.metrics


@pytest.mark.parametrize("task", TASKS)
def test_children_log_one_metric_point_per_completed_epoch(project, client, experiment, task):
    _, children = runs_of(client, experiment, task)
    history = project.history(task)
    for child in children:
        rows = history[history["config"] == child.info.run_name.removeprefix(f"{task} ")]
        done = rows[rows["val_loss"].notna()]  # a diverged epoch has no metrics to log
        for key in METRICS:
            points = client.get_metric_history(child.info.run_id, key)
            assert [m.step for m in points] == done["epoch"].tolist(), (key, child.info.run_name)
            assert [m.value for m in points] == pytest.approx(done[key].tolist(), rel=1e-12)


@pytest.mark.parametrize("task", TASKS)
def test_every_run_carries_the_tags(project, client, experiment, task):
    parent, children = runs_of(client, experiment, task)
    for run in [parent, *children]:
        tags = run.data.tags
        assert all(k in tags for k in (*TAGS, "dvc_exp_name")), run.info.run_name
        assert tags["task"] == task
        assert tags["git_commit"] == project.commit
        assert tags["git_dirty"] == "false"  # untracked outputs do not count
        assert tags["data_content_digest"] == project.digest
        assert tags["device"] == "cpu"
        assert tags["torch_version"] == torch.__version__
        assert tags["dvc_exp_name"] == DVC_EXP


def test_params_flattened(client, experiment):
    parent, children = runs_of(client, experiment, "task2")
    for run in [parent, *children]:
        p = run.data.params
        assert p["train.batch_size"] == "16"
        assert p["train.max_epochs"] == "3"
        assert p["train.softmax_output"] == "False"
        assert p["base.seed"] == "0"
        assert p["task2.hidden"] == "[16]"
        assert not any(k.startswith(("task3.", "mlflow.", "split.")) for k in p)
    assert sorted(c.data.params["lr"] for c in children) == ["0.1", "1e+30"]
    assert all(c.data.params["hidden"] == "16" for c in children)
    assert all(c.data.params["dropout"] == "0.0" for c in children)
    assert parent.data.params["chosen.lr"] == "0.1"
    assert parent.data.params["chosen.label"] == "lr=0.1"
    assert "lr" not in parent.data.params


@pytest.mark.parametrize("task", ["task2", "task3"])
def test_dataset_input_logged_on_every_run(project, client, experiment, task):
    parent, children = runs_of(client, experiment, task)
    for run in [parent, *children]:
        inputs = run.inputs.dataset_inputs
        assert inputs, run.info.run_name
        assert {i.dataset.name for i in inputs} == {"notMNIST_small"}
        assert {i.dataset.digest for i in inputs} == {project.digest[:16]}


def test_artifacts_where_notmnist_mlflow_artifacts_says(project, client, experiment):
    """The override; by default they go beside the store (test_server, test_repro)."""
    assert experiment.artifact_location == project.artifacts.resolve().as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parent, children = runs_of(client, experiment, "task2")
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["task2_curves.png"]
    for child in children:
        assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["history.csv"]
    assert any(project.artifacts.rglob("MLmodel"))


def test_logged_models_are_pt2_with_this_environments_pins(project):
    """log_model skips MLflow's requirements check, not what the model records: torch.export's
    `pt2` (loading it runs no pickled code) and the pinned requirements."""
    from pipeline import tracking

    folders = [m.parent for m in project.artifacts.rglob("MLmodel")]
    assert len(folders) == len(TASKS)  # one model per task
    for folder in folders:
        assert sorted(p.name for p in (folder / "data").iterdir()) == ["model.pt2"]
        pins = (folder / "requirements.txt").read_text().split()
        assert sorted(pins) == sorted(tracking.pip_requirements())
        assert (folder / "input_example.json").is_file()
        assert (folder / "serving_input_example.json").is_file()


def test_requirements_check_skipped_only_while_logging():
    """Both places where MLflow 3.17 calls the check runner.log_model skips (a rename would
    bring the scan back silently), swapped while logging and restored afterwards."""
    import importlib
    import inspect

    from pipeline.training import runner

    environment = importlib.import_module("mlflow.utils.environment")
    pyfunc = importlib.import_module("mlflow.pyfunc")  # the module, not mlflow's lazy proxy

    name = "warn_dependency_requirement_mismatches"
    for module, caller in ((environment, "_process_pip_requirements"), (pyfunc, "load_model")):
        assert f"{name}(" in inspect.getsource(getattr(module, caller)), (module, caller)
    saved = {m: getattr(m, name) for m in (environment, pyfunc)}
    with runner.requirements_unchecked():
        for module, check in saved.items():
            assert getattr(module, name) is not check
            assert getattr(module, name)(["torch==0.0.1"]) is None
    assert all(getattr(m, name) is check for m, check in saved.items())


LOG_ONE_MODEL = """
import sys
import mlflow, torch
from mlflow.utils import requirements_utils
from pipeline.training import runner
mlflow.set_tracking_uri(sys.argv[1])
with mlflow.start_run() as run:
    pass
uri = runner.log_model(run.info.run_id, torch.nn.Linear(4, 2), torch.zeros(3, 4).numpy())
model = mlflow.pyfunc.load_model(uri, suppress_warnings=True)
assert model.predict(torch.ones(2, 4).numpy()).shape == (2, 2)
print("scanned" if requirements_utils._MODULES_TO_PACKAGES is not None else "not scanned")
"""


@pytest.mark.slow
def test_logging_a_model_never_maps_the_installed_packages(tmp_path):
    """In a fresh process, runner.log_model logs a model that loads and predicts, and MLflow
    never builds its map of every installed package (the ~0.7 s the skip is for)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # its own store
    env.update(PYTHONPATH=str(ROOT), MLFLOW_DISABLE_TELEMETRY="true")
    command = [sys.executable, "-c", LOG_ONE_MODEL, uri]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["not", "scanned"], done.stdout


def test_parent_metrics_are_the_chosen_epochs(project, client, experiment):
    parent, _ = runs_of(client, experiment, "task2")
    best = project.best("task2")
    for key in METRICS:  # in the chart view's first section, "results"
        assert parent.data.metrics[f"results/{key}"] == pytest.approx(best[key], rel=1e-12)
    assert parent.data.metrics["results/best_epoch"] == best["best_epoch"]


# The logged model


def logged_model(client, experiment, parent):
    models = mlflow.search_logged_models(
        experiment_ids=[experiment.experiment_id],
        filter_string=f"source_run_id = '{parent.info.run_id}'",
        output_format="list",
    )
    assert len(models) == 1
    model = models[0]
    assert model.name == "model"
    assert [o.model_id for o in parent.outputs.model_outputs] == [model.model_id]
    return model


@pytest.mark.parametrize("task", ["task2", "task5"])
def test_logged_model_predicts_any_batch_size(project, client, experiment, task):
    mlflow.set_tracking_uri(project.uri)
    parent, _ = runs_of(client, experiment, task)
    info = logged_model(client, experiment, parent)
    chosen, _ = load_model(project.paths.models / f"{task}.pt")
    x = torch.as_tensor(np.random.default_rng(0).uniform(-1, 1, (7, 28, 28)), dtype=torch.float32)

    for uri in (info.model_uri, f"runs:/{parent.info.run_id}/model"):
        model = mlflow.pytorch.load_model(uri)
        with torch.no_grad():
            for batch in (1, 7):
                out = model(x[:batch])
                assert out.shape == (batch, 10)
                torch.testing.assert_close(out, chosen(x[:batch]))  # the chosen model itself

    pyfunc = mlflow.pyfunc.load_model(info.model_uri)  # checks inputs against the signature
    for batch in (1, 7):
        out = np.asarray(pyfunc.predict(x[:batch].numpy()))
        assert out.shape == (batch, 10)


# Outputs in the project


def test_task2_model_file(project):
    path = project.paths.models / "task2.pt"
    blob = torch.load(path, weights_only=True)
    assert blob["task"] == "task2"
    assert blob["config"]["hidden"] == [16]
    assert blob["config"]["input_channels"] == 3
    assert blob["config"]["softmax_output"] is False
    assert blob["best_epoch"] == project.best("task2")["best_epoch"]

    model, _ = load_model(path)
    val = load_splits(project.paths, torch.device("cpu"))["val"]
    val_loss, val_acc = evaluate_split(model, val)
    best = project.best("task2")
    assert val_loss == pytest.approx(best["val_loss"], rel=1e-6)
    assert val_acc == best["val_accuracy"]


def test_task2_history_one_row_per_config_and_epoch(project):
    h = project.history("task2")
    assert list(h.columns) == [
        "config",
        "lr",
        "hidden",
        "dropout",
        "epoch",
        *METRICS,
        "status",
    ]  # fmt: skip  (no seconds: a rerun writes the same bytes)
    bad = h[h["config"] == "lr=1e+30"]
    assert bad["epoch"].tolist() == [1]
    assert bad["status"].tolist() == ["diverged"]
    assert bad[list(METRICS)].isna().all().all()
    good = h[h["config"] == "lr=0.1"]
    n = len(good)
    assert 1 <= n <= TRAIN["max_epochs"]
    assert good["epoch"].tolist() == list(range(1, n + 1))
    assert (good["status"] == "ok").all()
    assert good[list(METRICS)].notna().all().all()
    assert len(h) == len(bad) + len(good)
    assert h["lr"].tolist() == [1e30] * len(bad) + [0.1] * n


def test_task2_best_json(project, client, experiment):
    best = project.best("task2")
    parent, children = runs_of(client, experiment, "task2")
    diverged, good = by_config(children)["lr=1e+30"], by_config(children)["lr=0.1"]
    h = project.history("task2")
    good_rows = h[h["config"] == "lr=0.1"]

    assert best["task"] == "task2"
    assert best["config"] == {
        "label": "lr=0.1",
        "lr": CHOSEN_LR,
        "hidden": [16],
        "dropout": 0.0,
        "input_channels": 3,
        "softmax_output": False,
        "hflip": True,
        "arch": "mlp",
        "optimizer": "sgd",
    }
    assert "mlflow" not in best  # run ids differ on every run: they live in mlflow.json
    record = project.runs_record("task2")
    model_uri = record.pop("model_uri")
    assert record == {
        "experiment": EXPERIMENT,
        "tracking_uri": project.uri,
        "parent_run_id": parent.info.run_id,
        "run_id": good.info.run_id,
        "candidates": {"lr=1e+30": diverged.info.run_id, "lr=0.1": good.info.run_id},
    }
    logged = client.get_logged_model(model_uri.removeprefix("models:/"))
    assert logged.source_run_id == parent.info.run_id and logged.name == "model"
    assert best["epochs_run"] == len(good_rows)
    assert best["best_epoch"] == 1 + int(good_rows["val_loss"].to_numpy().argmin())
    row = good_rows.iloc[best["best_epoch"] - 1]
    for key in METRICS:
        assert best[key] == pytest.approx(row[key], rel=1e-12)
    assert best["device"] == "cpu" and best["seed"] == 0
    assert [(c["label"], c["status"]) for c in best["candidates"]] == [
        ("lr=1e+30", "diverged"),
        ("lr=0.1", "ok"),
    ]
    assert best["config_key"] == best["candidates"][1]["config_key"]
    assert good.data.tags["config_key"] == best["config_key"]
    assert "val_loss" not in best["candidates"][0]
    assert best["candidates"][1]["val_loss"] == best["val_loss"]


@pytest.mark.parametrize("task", TASKS)
def test_chosen_configuration_has_the_lowest_val_loss(project, task):
    best = project.best(task)
    ok = [c for c in best["candidates"] if c["status"] == "ok"]
    lowest = min(ok, key=lambda c: c["val_loss"])
    assert best["config"]["label"] == lowest["label"]
    record = project.runs_record(task)
    assert record["run_id"] == record["candidates"][lowest["label"]]
    assert best["val_loss"] == lowest["val_loss"] == min(c["val_loss"] for c in ok)
    h = project.history(task)
    assert best["val_loss"] == pytest.approx(h["val_loss"].min(), rel=1e-12)


@pytest.mark.parametrize("task", TASKS)
def test_curves_png(project, task):
    png = project.paths.plots / f"{task}_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_later_tasks_use_task2s_learning_rate(project):
    chosen = project.best("task2")["config"]["lr"]
    assert chosen == CHOSEN_LR
    b3 = project.best("task3")
    assert b3["config"]["lr"] == chosen
    assert [(c["hidden"], c["lr"]) for c in b3["candidates"]] == [
        ([8], chosen),
        ([16], chosen),
        ([12], chosen),
    ]
    assert project.best("task4")["config"] == {
        "label": "hidden=8-8",
        "lr": chosen,
        "hidden": [8, 8],
        "dropout": 0.0,
        "input_channels": 3,
        "softmax_output": False,
        "hflip": True,
        "arch": "mlp",
        "optimizer": "sgd",
    }
    b5 = project.best("task5")["config"]
    assert (b5["hidden"], b5["dropout"], b5["lr"]) == ([16], 0.5, chosen)
    blob = torch.load(project.paths.models / "task5.pt", weights_only=True)
    assert blob["config"]["dropout"] == 0.5


def test_task3_reuses_task2s_configuration_instead_of_retraining(project, client):
    """Task 3's hidden=16 at lr 0.1 is Task 2's lr=0.1: its result is reused, run linked."""
    cols = ["epoch", *METRICS]
    h2, h3 = project.history("task2"), project.history("task3")
    a = h2[h2["config"] == "lr=0.1"][cols].reset_index(drop=True)
    b = h3[h3["config"] == "hidden=16"][cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    b2, b3 = project.best("task2"), project.best("task3")
    reused = next(c for c in b3["candidates"] if c["label"] == "hidden=16")
    assert reused["config_key"] == b2["config_key"]
    run = client.get_run(project.runs_record("task3")["candidates"]["hidden=16"])
    assert run.data.tags["reused_from_task"] == "task2"
    assert run.data.tags["reused_from_run"] == project.runs_record("task2")["run_id"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert steps == a["epoch"].tolist()  # its curves are there, as for a trained one
    timing = json.loads((project.root / "reports/timing/train_task3.json").read_text())
    assert "hidden=16" not in timing["task3"]["epoch_seconds"]  # not one epoch trained


def test_all_configurations_diverged_fails_the_stage(project, client):
    assert project.failed_code == 1
    assert "train_task2: error: every configuration of task2 diverged" in project.failed_stderr
    assert project.failed_unchanged
    exp = client.get_experiment_by_name("all-diverged")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED"
    assert [r.info.status for r in runs if r is not parent] == ["FAILED"]


def test_nothing_mlflow_in_the_project_tree_but_the_store(project):
    top = sorted(p.name for p in project.root.iterdir())
    assert top == [".git", "data", "mlflow.db", "models", "params.yaml", "reports"]
    for name in ("mlruns", "mlartifacts", ".mlflow", "MLmodel"):
        assert not any(project.root.rglob(name)), name
    outputs = sorted(
        str(p.relative_to(project.root))
        for sub in ("models", "reports/train", "reports/plots")
        for p in (project.root / sub).rglob("*")
        if p.is_file()
    )
    expected = [f"models/{t}.pt" for t in TASKS]
    expected += [f"reports/plots/{t}_curves.png" for t in TASKS]
    expected += [
        f"reports/train/{t}/{f}" for t in TASKS for f in ("best.json", "history.csv", "mlflow.json")
    ]
    assert outputs == sorted(expected)
    assert not math.isnan(project.best("task3")["val_loss"])


def test_a_dataset_insert_lost_to_a_concurrent_run_is_tried_again():
    """Two runs logging the same new dataset race on its unique key (docs/load.md): the loser's
    second try finds the dataset in place and links it."""
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException

    from pipeline.tracking import RunRef
    from pipeline.training.runner import log_dataset

    calls = []

    def log_inputs(run_id, datasets):
        calls.append(run_id)
        if len(calls) == 1:
            raise MlflowException("UNIQUE constraint failed: datasets.dataset_uuid")

    tracker = SimpleNamespace(client=SimpleNamespace(log_inputs=log_inputs), call=lambda f: f())
    run = RunRef("task2")
    run.id = "abc"
    log_dataset(tracker, run, "0" * 64)
    assert calls == ["abc", "abc"]
