"""MLflow's UI on the project's runs: `make ui` (scripts/ui.py), the tags and metric names the
UI reads, and the pages themselves in headless Chromium (Playwright, the system's browser)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline import tracking
from pipeline.config import ROOT, TABLEAU10, TASK_COLORS, TASKS
from pipeline.evaluation.original import REPORTED
from scripts import ui
from tests.conftest import write_params

TEMPLATE = ROOT / ".dvc" / "plots" / "tasks.json"
# Vega's "tableau10" scheme (vega-scale), which the DVC template names.
VEGA_TABLEAU10 = "4c78a8 f58518 e45756 72b7b2 54a24b eeca3b b279a2 ff9da6 9d755d bab0ac".split()


def git(root, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()


def repository(path):
    """A git repository with one commit on branch `main`."""
    path.mkdir(exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    (path / "a.txt").write_text("a\n")
    git(path, "add", "a.txt")
    git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    return path


# -- the tags and names


def test_every_run_names_its_stage_commit_and_branch_as_mlflow_s_source(tmp_path):
    root = repository(tmp_path / "repo")
    commit = git(root, "rev-parse", "HEAD")
    tags = tracking.tags("task6_mlp", root, "digest", torch.device("cpu"), 0)
    assert tags["mlflow.source.name"] == "pipeline.stages.train_task6"
    assert tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.source.git.commit"] == commit == tags["git_commit"]  # the old tag stays
    assert tags["mlflow.source.git.branch"] == "main"
    assert tags["task"] == "task6_mlp" and tags["seed"] == "0"
    git(root, "checkout", "-q", "--detach")
    assert "mlflow.source.git.branch" not in tracking.source_tags("task2", root, commit)
    outside = tracking.source_tags("task2", tmp_path / "nowhere", "unknown")
    assert outside == {
        "mlflow.source.type": "JOB",
        "mlflow.source.name": "pipeline.stages.train_task2",
    }


def best_json(task: str, title: str) -> dict:
    return {
        "task": task,
        "title": title,
        "config": {"label": "lr=0.1", "lr": 0.1},
        "best_epoch": 7,
        "epochs_run": 10,
        "val_loss": 0.41234,
        "val_accuracy": 0.8912,
        "candidates": [{"label": "lr=0.1"}, {"label": "lr=0.05"}],
    }


def test_a_parent_run_describes_its_task_choice_and_the_original_s_number():
    tags = tracking.parent_tags(best_json("task2", "Task 2: sweep"), REPORTED["task2"])
    note = tags["mlflow.note.content"]
    assert note.startswith("Task 2: sweep: chose lr=0.1 of 2 configurations by validation loss")
    assert "epoch 7 of 10: val loss 0.4123, val accuracy 89.12%" in note
    assert "The original coursework reported 89.46% test accuracy" in note
    assert "results/test_accuracy" in note
    assert tags["mlflow.runColor"] == TASK_COLORS["task2"]
    beyond = tracking.parent_tags(best_json("task7", "Task 7: CNN"), None)
    assert "reported no number" in beyond["mlflow.note.content"]
    assert beyond["mlflow.runColor"] == TASK_COLORS["task7"]


def test_a_resumed_parent_run_keeps_the_note_it_had_below_its_description(tmp_path):
    """A run marked KILLED by the next start (mark_stale_runs), then resumed to its end."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    tracker = tracking.Tracker(uri, experiment)
    parent = tracker.start_run("task2", {"mlflow.note.content": "Marked KILLED by the next start"})
    summary = best_json("task2", "Task 2: sweep")
    for _ in range(2):  # a second description replaces the first, keeping the earlier note
        tracking.describe_parent(tracker, parent, summary, REPORTED["task2"])
        tags = client.get_run(parent.id).data.tags
        ours = tracking.parent_tags(summary, REPORTED["task2"])["mlflow.note.content"]
        assert tags["mlflow.note.content"] == f"{ours}\n\nMarked KILLED by the next start"
        assert tags["mlflow.runColor"] == TASK_COLORS["task2"]


def test_run_colours_are_the_dvc_plots_task_colours():
    """The template colours by task with Vega's tableau10 over the sorted task names (Vega's
    default for a nominal domain): no domain, range or sort of its own to change that."""
    color = json.loads(TEMPLATE.read_text())["encoding"]["color"]
    assert color["field"] == "task" and color["type"] == "nominal"
    assert color["scale"] == {"scheme": "tableau10"} and "sort" not in color
    assert list(TABLEAU10) == [f"#{c}" for c in VEGA_TABLEAU10]
    assert TASK_COLORS == {t: f"#{VEGA_TABLEAU10[i]}" for i, t in enumerate(sorted(TASKS))}


def test_results_come_before_robustness_in_the_chart_view():
    """MLflow sorts the named chart sections by name, ahead of the unnamed one."""
    assert tracking.results_key("val_loss") == "results/val_loss"
    assert sorted([tracking.ROBUSTNESS_SECTION, tracking.RESULTS_SECTION])[0] == "results"


# -- scripts/ui.py's command line


def run_ui(capsys, *args: str) -> tuple[int, list[str], list[str]]:
    code = ui.main(list(args))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root with params.yaml; no store, and no MLFLOW_TRACKING_URI or DVC_ROOT."""
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", tracking.ARTIFACTS_ENV):
        monkeypatch.delenv(name, raising=False)
    write_params(tmp_path)
    return tmp_path


def test_no_store_yet_is_one_line(project, capsys):
    code, out, err = run_ui(capsys, "--root", str(project), "--port", str(ui.free_port()))
    assert code == 1 and out == []
    assert err == [
        f"ui: error: no MLflow store at {project / 'mlflow.db'} yet: run the pipeline first "
        "(make repro)"
    ]


def test_a_port_in_use_is_one_line(project, capsys):
    (project / "mlflow.db").touch()
    with socket.socket() as held:
        held.bind((ui.HOST, 0))
        held.listen()
        port = held.getsockname()[1]
        code, out, err = run_ui(capsys, "--root", str(project), "--port", str(port))
    assert code == 1 and out == []
    assert len(err) == 1 and err[0].startswith(f"ui: error: port {port} on 127.0.0.1 is in use")


class FakeServer(BaseHTTPRequestHandler):
    """An MLflow server's experiments/get-by-name, for the experiment `notmnist` only."""

    def do_GET(self):
        found = "experiment_name=notmnist" in self.path
        body = json.dumps({"experiment": {"experiment_id": "42"}} if found else {}).encode()
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_tracking_server_s_link_is_printed_and_nothing_started(project, capsys, monkeypatch):
    server = HTTPServer((ui.HOST, 0), FakeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://{ui.HOST}:{server.server_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri + "/")
    try:
        code, out, err = run_ui(capsys, "--root", str(project))
    finally:
        server.shutdown()
    assert code == 0 and err == []
    assert out[-1].strip() == f"{uri}/#/experiments/42/runs?workflowType=machine_learning"
    assert not (project / "mlflow.db").exists()


# -- the UI in a browser, on the tiny pipeline's store


@pytest.fixture(scope="module")
def served(trained_project):
    """`python -m scripts.ui` on the tiny project: the URL it prints; stopped with Ctrl-C."""
    root, _ = trained_project
    unset = ("MLFLOW_TRACKING_URI", "DVC_ROOT", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.ui", "--root", str(root), "--port", str(ui.free_port())],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:  # until the link, or the end of the output
        lines.append(line)
        if line.strip().startswith("http"):
            break
    url = lines[-1].strip() if lines else ""
    try:
        assert url.startswith("http"), "".join(lines)
        assert not [c for c in descendants(proc.pid) if b"huey" in c]  # no MLflow job runner
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, "".join(lines) + rest
    assert rest.splitlines()[-1] == "stopped"
    with pytest.raises(OSError):  # the server is gone with it
        socket.create_connection(re.match(r"http://([^:]+):(\d+)", url).groups(), timeout=5)


def descendants(pid: int) -> list[bytes]:
    """The command lines of process `pid`'s descendants (Linux /proc)."""
    parents, cmdlines = {}, {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = re.search(r"^PPid:\s+(\d+)$", status.read_text(), re.M)
            cmdlines[int(status.parent.name)] = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        parents[int(status.parent.name)] = int(ppid.group(1))
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        kids = [p for p, parent in parents.items() if parent == pid]
        found += kids
        todo += kids
    return [cmdlines.get(p, b"") for p in found]


@pytest.fixture(scope="module")
def page(served):
    with ui.browser_page() as page:
        yield page


@pytest.mark.slow
def test_the_link_opens_the_runs_page_with_every_task_s_run(served, page, trained_project):
    ui.open_runs(page, served)  # MLflow's GenAI overview lists no runs: this would time out
    links = page.locator("aside").get_by_role("link").all_inner_texts()  # the sidebar
    assert "Runs" in links and "Overview" not in links  # model training's pages, not GenAI's
    ui.set_columns(page, {"Description": True})
    for task in TASKS:
        colour = ui.run_row(page, task).get_by_test_id("experiment-view-table-run-color")
        assert colour.inner_text() == TASK_COLORS[task]  # as `dvc plots show` draws the task
        text = ui.row_text(page, task)
        assert tracking.stage_module(task) in text  # the Source column
        best = json.loads((trained_project[0] / "reports/train" / task / "best.json").read_text())
        assert f"{best['title']}: " in text  # the Description column: the run's note


@pytest.mark.slow
def test_task2_s_candidates_and_their_val_loss_curves(served, page):
    ui.open_runs(page, served)
    names = ui.expand(page, "task2")
    assert sorted(names) == ["task2 lr=0.05", "task2 lr=0.1"]
    ui.compare(page, names)
    assert ui.metric_curves(page, "val_loss", names) == sorted(names)  # in the legend, drawn


@pytest.mark.slow
def test_a_lost_click_on_the_metric_link_is_made_again(served, page, trained_project):
    """Once, in a loaded suite, the click on val_loss left the comparison open (the page
    re-rendered under it). Here the comparison of Task 2's candidates swallows the first."""
    client = mlflow.MlflowClient(trained_project[1])
    experiment = client.get_experiment_by_name("notmnist")
    found = "tags.mlflow.runName LIKE 'task2 lr=%'"
    runs = client.search_runs([experiment.experiment_id], found)
    names = sorted(r.info.run_name for r in runs)
    assert names == ["task2 lr=0.05", "task2 lr=0.1"]
    query = {"runs": [r.info.run_id for r in runs], "experiments": [experiment.experiment_id]}
    args = "&".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in query.items())
    page.goto(f"{served.split('#')[0]}#/compare-runs?{args}")  # what ui.compare opens
    page.get_by_text("Comparing 2 Runs").wait_for()
    page.evaluate(
        """() => document.addEventListener('click', e => {
            if (!window.lost) { window.lost = true; e.preventDefault(); e.stopPropagation(); }
        }, true)"""
    )
    assert ui.metric_curves(page, "val_loss", names) == names
    assert page.evaluate("window.lost")


@pytest.mark.slow
def test_the_chart_view_opens_on_test_and_validation_results(served, page):
    page.set_viewport_size({"width": 1440, "height": 2400})  # draws the charts in view only
    try:
        sections = ui.chart_sections(page, served)
    finally:
        page.set_viewport_size({"width": 1440, "height": 900})
    title, text = sections[0]
    assert title == "results"
    for key in ("test_accuracy", "val_accuracy", "val_loss"):
        assert f"results/{key}" in text


@pytest.mark.slow
def test_the_registry_shows_the_champion(served, page):
    ui.open_registry(page, served, "notmnist-classifier")
    row = page.locator("tr, [role=row]", has=page.get_by_role("link", name="notmnist-classifier"))
    assert "champion" in row.first.inner_text()
