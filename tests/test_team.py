"""A team's set-up, for real: MLflow on PostgreSQL with its artifacts in S3, a DVC remote on
the same store, and experiments passed between two clones through a bare git remote.

One tiny project (a small archive the test builds, tiny training settings) runs once as
clone A against the session's stack (tests/stack.py); every test reads what it left behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch

from benchmarks import tracking_load
from pipeline import tracking
from pipeline.config import ROOT, TASKS
from pipeline.data.archive import content_digest
from pipeline.training.model import load_model
from tests.conftest import make_archive, tiny_dataset, write_params
from tests.stack import client_env
from tests.test_repro import COPY, TINY_TRAINING

pytestmark = pytest.mark.stack
MODEL = "notmnist-classifier"
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
# One configuration per task, two epochs. Random glyphs cannot be learned: the gate only runs.
TINY = dict(
    TINY_TRAINING,
    task2={"learning_rates": [0.1], "hidden": [16]},
    task3={"hidden_sizes": [16]},
    gate={"min_test_accuracy": dict.fromkeys(TASKS, 0.0)},
)


class Clone:
    """One machine's working copy: commands run there with the stack's variables."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env

    def run(self, *cmd: str) -> str:
        done = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True)
        assert done.returncode == 0, f"{cmd} in {self.root.name}:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    def git(self, *args: str) -> str:
        return self.run(*GIT, *args)


@pytest.fixture(scope="module")
def team(stack, tmp_path_factory):
    """Clone A after `dvc repro` on the stack, committed, pushed to git and to the DVC remote."""
    base = tmp_path_factory.mktemp("team")
    env = client_env(stack)
    archive = make_archive(base / "tiny.tar.gz", tiny_dataset(per_letter=12))
    a = Clone(base / "a", env)
    for name in COPY:
        src, dst = ROOT / name, a.root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    write_params(
        a.root,
        data={"sources": [str(archive)], "content_digest": content_digest(archive)},
        split={"train_size": 60, "val_size": 30},
        **TINY,
    )
    subprocess.run(
        ["git", "init", "-q", "--bare", "-b", "main", str(base / "origin.git")], check=True
    )
    a.run("git", "init", "-q", "-b", "main")
    a.run("git", "remote", "add", "origin", str(base / "origin.git"))
    a.run("dvc", "remote", "add", "-d", "team", stack["dvc_remote"])  # into .dvc/config
    repro = a.run("dvc", "repro")
    a.git("add", "-A")
    a.git("commit", "-q", "-m", "tiny run on the team stack")
    a.run("git", "push", "-q", "origin", "main")
    a.run("dvc", "push")
    return {"base": base, "a": a, "env": env, "repro": repro, "stack": stack}


@pytest.fixture(scope="module")
def client(team):
    return mlflow.MlflowClient(tracking_uri=team["env"]["MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="module")
def experiment(client):
    return client.get_experiment_by_name("notmnist")


def task_runs(client, experiment, task: str, exp_name: str | None = None) -> tuple:
    """(parent, children) of a task's runs from clone A's repro (or from a DVC experiment)."""
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.task = '{task}'")
    runs = [r for r in runs if r.data.tags.get("dvc_exp_name") == exp_name]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, (task, exp_name, [r.info.run_name for r in parents])
    (parent,) = parents
    return parent, [r for r in runs if r is not parent]


def s3_keys(stack: dict, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=stack["env"]["AWS_ENDPOINT_URL"],
        aws_access_key_id=stack["env"]["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack["env"]["AWS_SECRET_ACCESS_KEY"],
        region_name=stack["env"]["AWS_DEFAULT_REGION"],
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="notmnist", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_each_task_has_a_parent_run_with_nested_children_and_epoch_metrics(
    team, client, experiment
):
    assert all(f"Running stage 'train_{t}'" in team["repro"] for t in ("task2", "task6"))
    # Each stage links to the runs page (the UI opens on its GenAI pages otherwise).
    page = f"/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert f"runs: {team['env']['MLFLOW_TRACKING_URI']}{page}" in team["repro"]
    for task in TASKS:
        parent, children = task_runs(client, experiment, task)
        assert parent.info.status == "FINISHED"
        assert children, task
        for child in children:
            assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
            steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")]
            assert steps == list(range(1, len(steps) + 1)) and steps, child.info.run_name
            assert "train_accuracy" in child.data.metrics


def test_make_server_links_the_runs_page_of_the_experiment_the_runs_went_to(team, experiment):
    """The link `make server` prints (it makes the experiment) opens the runs page, in model
    training mode: the URL tests/test_ui.py opens in a browser."""
    page = f"/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert team["stack"]["runs_page"] == team["env"]["MLFLOW_TRACKING_URI"] + page


def test_runs_are_in_postgresql_and_the_experiment_is_marked_as_training(team, client, experiment):
    import psycopg

    assert experiment.tags[tracking.KIND_TAG] == tracking.KIND_TRAINING
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    dsn = team["stack"]["backend_store_uri"]
    with psycopg.connect(dsn) as db:
        (count,) = db.execute(
            "SELECT count(*) FROM runs WHERE experiment_id = %s", (int(experiment.experiment_id),)
        ).fetchone()
    assert count == len(runs) > len(TASKS)


PREDICT = """
import sys
import mlflow.pyfunc
import numpy as np
model = mlflow.pyfunc.load_model("models:/notmnist-classifier@champion")
np.save(sys.argv[2], np.asarray(model.predict(np.load(sys.argv[1]))))
"""


def test_champion_alias_loads_and_predicts_like_the_model_file(team, client, tmp_path):
    version = client.get_model_version_by_alias(MODEL, "champion")
    task = version.tags["task"]
    assert task in TASKS
    x = np.random.default_rng(0).uniform(-1, 1, (5, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    # A user's process: MLFLOW_TRACKING_URI from the environment, nothing else.
    Clone(tmp_path, team["env"]).run(sys.executable, "-c", PREDICT, "x.npy", "y.npy")
    model, _ = load_model(team["a"].root / "models" / f"{task}.pt")
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-6)


def test_artifacts_download_over_http_and_lie_in_the_bucket(team, client, experiment, tmp_path):
    parent, children = task_runs(client, experiment, "task2")
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied by the server
    local = client.download_artifacts(parent.info.run_id, "task2_curves.png", str(tmp_path))
    curves = (team["a"].root / "reports/plots/task2_curves.png").read_bytes()
    assert Path(local).read_bytes() == curves
    uri = team["env"]["MLFLOW_TRACKING_URI"]
    query = {"path": "history.csv", "run_uuid": children[0].info.run_id}
    got = requests.get(f"{uri}/get-artifact", params=query, timeout=30)
    assert got.ok and got.text.startswith("config,")

    keys = s3_keys(team["stack"], f"mlflow/{experiment.experiment_id}/")
    run_dir = f"mlflow/{experiment.experiment_id}/{parent.info.run_id}/artifacts/"
    assert f"{run_dir}task2_curves.png" in keys
    assert f"{run_dir}evaluation/per_class.csv" in keys  # logged by the evaluate stage
    assert any(k.endswith("/MLmodel") for k in keys)  # the logged models


def test_a_fresh_clone_pulls_everything_and_reruns_nothing(team):
    Clone(team["base"], team["env"]).run("git", "clone", "-q", "origin.git", "b")
    b = Clone(team["base"] / "b", team["env"])
    b.run("dvc", "pull")
    assert "up to date" in b.run("dvc", "status")
    assert "Running stage" not in b.run("dvc", "repro")
    for task in TASKS:
        path = f"models/{task}.pt"
        assert (b.root / path).read_bytes() == (team["a"].root / path).read_bytes()
        model, blob = load_model(b.root / path)
        assert blob["task"] == task
        assert model(torch.zeros(2, 28, 28)).shape == (2, 10)
    team["b"] = b


def test_experiments_pass_between_clones_through_the_remotes(team, client, experiment):
    a, b = team["a"], team.get("b")
    assert b is not None, "runs after the fresh-clone test"
    out = a.run("dvc", "exp", "run", "-n", "a-exp", "-S", "task6.cnn_lr=0.01")
    assert "Running stage 'train_task6'" in out and "Running stage 'train_task2'" not in out
    a.run("dvc", "exp", "push", "origin", "a-exp")
    b.run("dvc", "exp", "run", "train_task6", "-n", "b-exp", "-S", "task6.cnn_lr=0.003")

    b.run("dvc", "exp", "pull", "origin", "a-exp")
    shown = b.run("dvc", "exp", "show", "--csv")
    assert "a-exp" in shown and "b-exp" in shown
    b.run("dvc", "exp", "apply", "a-exp")  # its outputs come from B's cache: pulled
    assert "up to date" in b.run("dvc", "status")
    diff = json.loads(b.run("dvc", "metrics", "diff", "--json"))["reports/metrics.json"]
    assert diff["task6_cnn.config.lr"] == {"old": 0.001, "new": 0.01, "diff": pytest.approx(0.009)}
    a_model = a.root / "models" / "task6_cnn.pt"
    assert (b.root / "models/task6_cnn.pt").read_bytes() == a_model.read_bytes()

    for name in ("a-exp", "b-exp"):  # both machines' runs on the one server
        for task in ("task6_mlp", "task6_cnn"):
            parent, children = task_runs(client, experiment, task, exp_name=name)
            assert children and all(c.data.tags["dvc_exp_name"] == name for c in children)


def test_team_stack_loses_no_run_of_concurrent_writers(stack, tmp_path):
    """benchmarks/load.py's team level, short: counts, never timings (tests/test_load.py says why
    the writers log no dataset and send no telemetry). In this file, after the tests that read
    the stack: `make test`'s processes each start their own stack for the files they run, so
    the stack's users share one file."""
    env = stack["env"]
    settings = {"units": 1, "epochs": 5, "artifact_kib": 4, "no_dataset": True}
    writers = tracking_load.quiet(tracking_load.team_env(env), telemetry=False)
    lv = tracking_load.level("team", env["MLFLOW_TRACKING_URI"], writers, 2, settings, tmp_path,
                             s3=tracking_load.s3_of(env), timeout_s=300)  # fmt: skip
    assert lv["errors"] == {}, lv["messages"]
    assert lv["expected_runs"] == lv["runs_sent"] == lv["complete"] == lv["finished"] == 2
    assert lv["runs_in_store"] == 2 and lv["lost_runs"] == 0
    assert lv["steps_found"] == lv["steps_sent"] == 2 * 5 * len(tracking_load.TEAM_METRICS)
    assert lv["steps_duplicated"] == 0 and lv["params_found"] == lv["params_sent"]
    assert lv["artifacts_found"] == lv["objects_found"] == lv["artifacts_sent"] == 2 * 2
