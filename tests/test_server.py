"""A shared MLflow tracking server, an unreachable one, and parallel use of the SQLite store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import requests

from pipeline import tracking
from pipeline.config import ROOT
from pipeline.stages import train_task2
from tests.conftest import tiny_project

TRAIN = {"batch_size": 16, "max_epochs": 2, "patience": 1, "device": "cpu"}
TASK2 = {"learning_rates": [0.1], "hidden": [8]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(uri: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    """Until an MLflow server answers /health; fails with its log if it exits or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{uri}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        assert proc.poll() is None, log.read_text()
        time.sleep(0.5)
    pytest.fail(f"mlflow server did not start:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on a free port, stopped after the module's tests."""
    base = tmp_path_factory.mktemp("server")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{base / 'server.db'}",
        "--artifacts-destination",
        str(base / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = (base / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=base)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(uri, proc, base / "server.log")
        yield uri, base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_training_stage_logs_runs_metrics_and_model_to_the_server(server, tmp_path, monkeypatch):
    uri, base = server
    root = tiny_project(tmp_path / "proj", train=TRAIN, task2=TASK2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.chdir(root)
    assert train_task2.main(["--root", str(root)]) == 0

    client = mlflow.MlflowClient(tracking_uri=uri)  # everything below goes over HTTP
    experiment = client.get_experiment_by_name("notmnist")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    (child,) = (r for r in runs if r is not parent)
    assert parent.info.run_name == "task2" and child.info.run_name == "task2 lr=0.1"
    assert parent.data.params["chosen.lr"] == "0.1"
    history = client.get_metric_history(child.info.run_id, "val_loss")
    assert [m.step for m in history] == list(range(1, len(history) + 1))
    models = client.search_logged_models([experiment.experiment_id])
    assert [m.source_run_id for m in models] == [parent.info.run_id]
    # Artifacts went through the server into its artifact store, none into the project.
    stored = {p.name for p in (base / "artifacts").rglob("*") if p.is_file()}
    assert "MLmodel" in stored and "history.csv" in stored
    assert not (root / "mlflow.db").exists() and not (root / "mlruns").exists()
    local = tmp_path / "download"
    client.download_artifacts(child.info.run_id, "history.csv", str(local))
    assert (local / "history.csv").read_text().startswith("config,")


def run_stage(root: Path, uri: str) -> subprocess.CompletedProcess:
    """The stage in a subprocess with MLflow's default retries; over 30 s fails the test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run(
        [sys.executable, "-m", "pipeline.stages.train_task2", "--root", str(root)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tiny_project(tmp_path_factory.mktemp("tiny") / "proj", train=TRAIN, task2=TASK2)


def check_one_line_failure(done: subprocess.CompletedProcess, uri: str, root: Path) -> None:
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"train_task2: error: MLflow tracking server {uri} is unreachable")
    assert "Traceback" not in done.stderr
    assert "epoch" not in done.stderr  # failed before training started
    assert not (root / "models" / "task2.pt").exists()


def test_refused_connection_fails_at_once_naming_the_uri(tiny_root):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = run_stage(tiny_root, uri)
    check_one_line_failure(done, uri, tiny_root)
    assert "Connection refused" in done.stderr


def test_silent_server_fails_within_30_seconds(tiny_root):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        done = run_stage(tiny_root, uri)
    check_one_line_failure(done, uri, tiny_root)
    assert "timed out" in done.stderr


def test_default_store_follows_dvc_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    # A queued experiment runs in a temporary copy; DVC_ROOT names the real project.
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "real"))
    copy = tmp_path / "real" / ".dvc" / "tmp" / "exps" / "tmpabc"
    assert tracking.tracking_uri(copy) == f"sqlite:///{(tmp_path / 'real').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.org:5000")
    assert tracking.tracking_uri(copy) == "http://example.org:5000"


def test_artifacts_go_beside_a_sqlite_store(tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", tracking.ARTIFACTS_ENV):
        monkeypatch.delenv(name, raising=False)
    here = tracking.tracking_uri(tmp_path)
    assert tracking.artifact_location(here) == (tmp_path / "mlartifacts").resolve().as_uri()
    # A queued experiment's store is the real project's, and so are its artifacts.
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "real"))
    queued = tracking.tracking_uri(tmp_path / "real" / ".dvc" / "tmp" / "exps" / "tmpabc")
    expected = (tmp_path / "real" / "mlartifacts").resolve().as_uri()
    assert tracking.artifact_location(queued) == expected
    assert tracking.artifact_location("http://example.org:5000") is None  # the server decides
    monkeypatch.setenv(tracking.ARTIFACTS_ENV, str(tmp_path / "elsewhere"))
    assert tracking.artifact_location(here) == (tmp_path / "elsewhere").resolve().as_uri()
    assert tracking.artifact_location("http://example.org:5000") is None


MARK = """
import sys
from pathlib import Path
import mlflow
from pipeline import tracking
uri = tracking.tracking_uri(Path(sys.argv[1]))
client = mlflow.MlflowClient(uri)
client.create_experiment("old")  # made before the stages tagged experiments
client.create_experiment("mine", tags={tracking.KIND_TAG: "genai_development"})
for name in ("new", "old", "mine"):
    tracking.setup(Path(sys.argv[1]), name)
"""


def test_stages_mark_new_and_existing_experiments_as_model_training(tmp_path):
    """The tag MLflow's UI reads to open an experiment on its runs; a user's own kind stays."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", MARK, str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    kinds = {e.name: e.tags.get(tracking.KIND_TAG) for e in client.search_experiments()}
    assert kinds["new"] == kinds["old"] == "custom_model_development"
    assert kinds["mine"] == "genai_development"
    new = client.get_experiment_by_name("new")
    assert new.artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()


SETUP = """
import sys
from pathlib import Path
import mlflow
from pipeline import tracking
tracking.setup(Path(sys.argv[1]), "notmnist")
with mlflow.start_run():
    mlflow.log_metric("x", 1.0)
"""


def test_parallel_first_use_of_a_new_sqlite_store(tmp_path):
    """Three processes open one new store at once: all succeed (MLflow alone fails here)."""
    root = tmp_path / "proj"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env["NOTMNIST_MLFLOW_ARTIFACTS"] = str(tmp_path / "artifacts")
    env["PYTHONPATH"] = str(ROOT)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SETUP, str(root)],
            env=env,
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(errors)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "notmnist"]
    assert len(client.search_runs([experiment.experiment_id])) == 3


def test_servers_the_project_starts_run_no_job_runner(monkeypatch):
    """scripts/server.py and scripts/ui.py start `mlflow server` with server_env(): MLflow 3's
    job runner off unless the environment turns it on."""
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    assert tracking.server_env() == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")
    assert tracking.server_env() == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"}
    for script in ("scripts/server.py", "scripts/ui.py"):
        assert "server_env()" in (ROOT / script).read_text(), script


def test_postgres_runs_as_its_user_by_runuser_even_without_sbin_on_path(monkeypatch):
    from scripts import server as stack

    monkeypatch.setattr(stack.os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as some root shells have it
    runuser, *rest = stack.as_postgres(["initdb", "-D", "x"])
    assert Path(runuser).name == "runuser" and Path(runuser).is_file()
    assert rest == ["-u", "postgres", "--", "initdb", "-D", "x"]
    monkeypatch.setattr(stack.os, "geteuid", lambda: 1000)
    assert stack.as_postgres(["initdb"]) == ["initdb"]
