"""Interrupted training stages: real signals to real stage processes, then reruns.

A stage that gets SIGTERM or SIGINT marks its MLflow runs KILLED, says so in one line and
leaves no output; one killed by SIGKILL leaves RUNNING runs that the next start marks KILLED;
a rerun resumes from the last completed epoch and writes exactly the bytes an uninterrupted
run writes; a tracking server that dies mid-run costs no trained configuration.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from pipeline import signals
from tests.conftest import tiny_project, write_params
from tests.test_server import free_port

OUTPUTS = [
    "models/task2.pt",
    "reports/train/task2/history.csv",
    "reports/train/task2/best.json",
    "reports/plots/task2_curves.png",
]
SETTINGS = {  # three configurations of a few epochs, each slow enough to be hit mid-epoch
    "split": {"train_size": 2400, "val_size": 300},
    "train": {"max_epochs": 4, "patience": 4, "batch_size": 16, "workers": 1},
    "task2": {"learning_rates": [0.1, 0.05, 0.01], "hidden": [512]},
}


class Stage:
    """`python -m pipeline.stages.train_task2` in the background, its stderr read line by line."""

    def __init__(self, root: Path, uri: str, **env):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.stages.train_task2", "--root", str(root)],
            cwd=Path(__file__).parents[1],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": uri, **env},
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines:
                if re.search(pattern, line):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.proc.kill()
        pytest.fail(f"no line matching {pattern!r}:\n" + "\n".join(self.lines))

    def finish(self, timeout_s: float = 180) -> int:
        try:
            code = self.proc.wait(timeout_s)
        finally:
            self.proc.kill()
        self.reader.join(5)
        return code

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture(scope="module")
def base_project(tmp_path_factory) -> Path:
    return tiny_project(tmp_path_factory.mktemp("interrupt") / "p", per_letter=300, **SETTINGS)


@pytest.fixture
def project(base_project, tmp_path) -> Path:
    root = tmp_path / "p"
    shutil.copytree(base_project, root)
    return root


@pytest.fixture(scope="module")
def reference(base_project, tmp_path_factory) -> dict[str, str]:
    """The outputs' md5 of one uninterrupted run."""
    root = tmp_path_factory.mktemp("reference") / "p"
    shutil.copytree(base_project, root)
    stage = Stage(root, f"sqlite:///{root}/mlflow.db")
    assert stage.finish() == 0, stage.text
    assert not (root / "checkpoints" / "task2").exists()  # removed once the stage succeeded
    return hashes(root)


def hashes(root: Path) -> dict[str, str]:
    return {p: hashlib.md5((root / p).read_bytes()).hexdigest() for p in OUTPUTS}


def runs(uri: str) -> dict[str, object]:
    """The task's runs by name (parent 'task2', children 'task2 lr=...')."""
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("notmnist")
    found = client.search_runs([experiment.experiment_id], "tags.task = 'task2'", max_results=100)
    return {r.info.run_name: r for r in found}


def no_outputs(root: Path) -> bool:
    left = [p for p in OUTPUTS if (root / p).exists()]
    temps = [p for p in root.rglob("*.tmp")]
    return not left and not temps


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_epoch_marks_runs_killed_in_one_line(project, sig, code):
    uri = f"sqlite:///{project}/mlflow.db"
    stage = Stage(project, uri)
    stage.wait_for(r"lr=0\.05 epoch +2/")
    stage.proc.send_signal(sig)
    assert stage.finish() == code
    last = stage.lines[-1]
    assert re.fullmatch(
        rf"train_task2: interrupted \({sig.name}\) in lr=0\.05, epoch \d; runs marked KILLED", last
    ), stage.text
    assert "Traceback" not in stage.text and "KeyboardInterrupt" not in stage.text
    found = runs(uri)
    assert found["task2"].info.status == "KILLED"
    assert found["task2 lr=0.1"].info.status == "FINISHED"  # it had finished
    assert found["task2 lr=0.05"].info.status == "KILLED"
    assert all(r.info.end_time for r in found.values())
    assert no_outputs(project)
    kept = project / "checkpoints" / "task2"
    assert len(list(kept.glob("*/result.pt"))) == 1 and len(list(kept.glob("*/state.pt"))) == 1


def test_workers_are_stopped_and_their_runs_killed(project):
    write_params(project, **{**SETTINGS, "train": {**SETTINGS["train"], "workers": 2}})
    uri = f"sqlite:///{project}/mlflow.db"
    stage = Stage(project, uri)
    stage.wait_for(r"epoch +2/")
    workers = children(stage.proc.pid)
    assert len(workers) >= 2
    stage.proc.send_signal(signal.SIGTERM)
    assert stage.finish() == 143
    assert re.search(
        r"interrupted \(SIGTERM\) in lr=.*epoch \d.*; runs marked KILLED$", stage.lines[-1]
    ), stage.text
    statuses = {name: r.info.status for name, r in runs(uri).items()}
    assert statuses["task2"] == "KILLED" and "RUNNING" not in statuses.values()
    assert no_outputs(project)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]  # none outlived it


def children(pid: int) -> list[int]:
    """The training workers of process `pid` (Linux /proc): its children that run spawn_main."""
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            cmdline = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if re.search(rf"^PPid:\s+{pid}$", text, re.M) and b"spawn_main" in cmdline:
            out.append(int(status.parent.name))
    return out


def test_second_signal_during_clean_up_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with signals.installed():
        with pytest.raises(signals.Interrupted):
            signals.handle(signal.SIGTERM, None)
        signals.handle(signal.SIGINT, None)  # during clean-up: no exception, straight out
    assert exits == [130]


def test_a_signal_inside_a_shield_waits_for_its_end(tmp_path):
    from pipeline.files import write_text

    done = []
    with signals.installed(), pytest.raises(signals.Interrupted):
        with signals.shield():
            signals.handle(signal.SIGTERM, None)  # held
            write_text(tmp_path / "f.txt", "whole")
            done.append(True)
    assert done and (tmp_path / "f.txt").read_text() == "whole"
    assert list(tmp_path.iterdir()) == [tmp_path / "f.txt"]


POINTS = [r"lr=0\.1 epoch +1/", r"lr=0\.05 epoch +3/", r"lr=0\.01 epoch +1/"]


@pytest.mark.parametrize("where", POINTS)
def test_resume_after_interruption_is_byte_identical(project, reference, where):
    uri = f"sqlite:///{project}/mlflow.db"
    stage = Stage(project, uri)
    stage.wait_for(where)
    stage.proc.send_signal(signal.SIGTERM)
    assert stage.finish() == 143
    killed = {name: r.info.run_id for name, r in runs(uri).items()}

    again = Stage(project, uri)
    assert again.finish() == 0, again.text
    assert "resuming after epoch" in again.text
    assert hashes(project) == reference
    assert not (project / "checkpoints" / "task2").exists()
    found = runs(uri)
    assert {name: found[name].info.run_id for name in killed} == killed  # the runs continue
    client = mlflow.MlflowClient(uri)
    for name, r in found.items():
        assert r.info.status == "FINISHED", name
        if name != "task2":  # each epoch logged exactly once
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")]
            assert sorted(steps) == list(range(1, len(steps) + 1)), (name, steps)


def test_changed_params_never_resume_a_stale_checkpoint(project):
    uri = f"sqlite:///{project}/mlflow.db"
    stage = Stage(project, uri)
    stage.wait_for(r"lr=0\.05 epoch +1/")
    stage.proc.send_signal(signal.SIGTERM)
    assert stage.finish() == 143
    stale = {p.name for p in (project / "checkpoints" / "task2").iterdir() if p.is_dir()}
    write_params(project, **{**SETTINGS, "train": {**SETTINGS["train"], "batch_size": 32}})
    again = Stage(project, uri)
    again.wait_for(r"lr=0\.1 epoch +1/")
    assert "resuming" not in again.text and "trained before" not in again.text
    kept = {p.name for p in (project / "checkpoints" / "task2").iterdir() if p.is_dir()}
    assert not kept & stale
    again.proc.send_signal(signal.SIGTERM)
    assert again.finish() == 143


def test_sigkill_leaves_runs_that_the_next_start_marks_killed(project):
    uri = f"sqlite:///{project}/mlflow.db"
    stage = Stage(project, uri)
    stage.wait_for(r"lr=0\.05 epoch +2/")
    stage.proc.kill()
    stage.finish()
    before = runs(uri)
    assert before["task2"].info.status == "RUNNING"
    assert before["task2 lr=0.05"].info.status == "RUNNING"

    # A run of a live process (say, a queued experiment's worker) must be left alone.
    alive = subprocess.Popen(["sleep", "300"])
    try:
        from pipeline import tracking

        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name("notmnist").experiment_id
        tags = {"task": "task2", **tracking.process_tags(alive.pid)}
        live = client.create_run(experiment, run_name="task2 other worker", tags=tags)
        again = Stage(project, uri)
        again.wait_for(r"marked 2 stale run\(s\) of task2 KILLED")
        assert again.finish() == 0, again.text
        assert client.get_run(live.info.run_id).info.status == "RUNNING"
    finally:
        alive.kill()
    for name in ("task2", "task2 lr=0.05"):
        run = client.get_run(before[name].info.run_id)
        assert run.info.status in ("KILLED", "FINISHED")  # marked, then resumed to the end
        assert "had ended without ending the run" in run.data.tags["mlflow.note.content"]


def start_server(port: int, store: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{store}/mlflow.db",
            "--artifacts-destination",
            str(store / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    from pipeline.tracking import server_answers

    deadline = time.monotonic() + 90
    while not server_answers(f"http://127.0.0.1:{port}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            pytest.fail("mlflow server did not start")
        time.sleep(0.5)
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its workers, at once
    proc.wait(30)


def test_tracking_server_dies_and_comes_back(project, reference, tmp_path):
    port, store = free_port(), tmp_path / "server"
    uri = f"http://127.0.0.1:{port}"
    server = start_server(port, store)
    try:
        stage = Stage(project, uri, NOTMNIST_MLFLOW_WAIT_S="120")
        stage.wait_for(r"lr=0\.1 epoch +2/")
        stop_server(server)
        stage.wait_for(r"stopped answering")
        time.sleep(3)
        server = start_server(port, store)
        assert stage.finish() == 0, stage.text
        assert "answers again" in stage.text
        assert hashes(project) == reference
        found = runs(uri)
        assert {r.info.status for r in found.values()} == {"FINISHED"}
        client = mlflow.MlflowClient(uri)
        for name, r in found.items():
            if name != "task2":
                steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")]
                assert sorted(steps) == list(range(1, len(steps) + 1)), (name, steps)
    finally:
        stop_server(server)


def test_tracking_server_gone_for_good_stops_in_one_line_and_a_rerun_resumes(
    project, reference, tmp_path
):
    port, store = free_port(), tmp_path / "server"
    uri = f"http://127.0.0.1:{port}"
    server = start_server(port, store)
    try:
        stage = Stage(project, uri, NOTMNIST_MLFLOW_WAIT_S="5")
        stage.wait_for(r"lr=0\.1 epoch +2/")
        stop_server(server)
        stage.wait_for(r"stopped answering")
        stopped = time.monotonic()
        assert stage.finish() == 1
        assert time.monotonic() - stopped < 60
        assert re.fullmatch(
            rf"train_task2: error: MLflow tracking server {re.escape(uri)} did not answer .*"
            r"rerun to log them\.",
            stage.lines[-1],
        ), stage.text
        kept = project / "checkpoints" / "task2"
        assert len(list(kept.glob("*/result.pt"))) == 3  # every configuration trained, kept
        assert no_outputs(project)

        server = start_server(port, store)
        again = Stage(project, uri)
        assert again.finish() == 0, again.text
        assert again.text.count("trained before an interruption") == 3
        assert "epoch  1/" not in again.text  # nothing retrained
        assert hashes(project) == reference
        assert {r.info.status for r in runs(uri).values()} == {"FINISHED"}
    finally:
        stop_server(server)
