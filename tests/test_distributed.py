"""Data-parallel training under torchrun with gloo: the same steps as one process, one
MLflow parent run, and a rank that dies takes the stage down in one line, without a hang."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from pipeline.config import ROOT
from tests.conftest import tiny_project, write_params

SETTINGS = {
    "split": {"train_size": 200, "val_size": 50},  # 200 = 6 batches of 32 and one of 8
    "train": {"max_epochs": 2, "patience": 2, "workers": 1, "processes": 1},
    "task2": {"learning_rates": [0.1], "hidden": [32]},
}
METRICS = ["train_loss", "train_accuracy", "val_loss", "val_accuracy"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_project(tmp_path_factory.mktemp("ddp") / "base", per_letter=30, **SETTINGS)


def stage(base: Path, root: Path, processes: int, **train) -> subprocess.Popen:
    shutil.copytree(base, root)
    write_params(
        root, **{**SETTINGS, "train": {**SETTINGS["train"], "processes": processes, **train}}
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.stages.train_task2", "--root", str(root)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def histories(base) -> dict[int, pd.DataFrame]:
    out = {}
    for n in (1, 2):
        proc = stage(base, base.parent / f"p{n}", n)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        out[n] = pd.read_csv(base.parent / f"p{n}" / "reports/train/task2/history.csv")
    return out


def test_two_gloo_processes_take_the_steps_of_one(histories):
    one, two = histories[1], histories[2]
    assert len(one) == len(two) == 2
    # Not bit for bit: the gradient is summed over two half-batches instead of in one product.
    diff = (one[METRICS] - two[METRICS]).abs().max().max()
    assert diff < 1e-5, (one[METRICS], two[METRICS])


def test_one_parent_run_and_outputs_from_rank_0_only(base, histories):
    root = base.parent / "p2"
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("notmnist").experiment_id
    runs = client.search_runs([experiment], "tags.task = 'task2'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 2
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert not (root / "checkpoints").exists()


def rank_pid(root: Path, rank: int) -> int | None:
    """The torchrun worker of `rank` that trains the project at `root`."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(root).encode() in cmdline and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def test_a_killed_rank_fails_the_stage_within_60_seconds_naming_it(base):
    root = base.parent / "killed"
    proc = stage(base, root, 2, max_epochs=50, patience=50)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "epoch  1/50" in line:
                break
        pid = rank_pid(root, 1)
        assert pid, "".join(lines)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert time.monotonic() - killed < 60
    assert proc.returncode == 1
    last = rest.strip().splitlines()[-1]
    assert re.fullmatch(
        r"train_task2: error: rank 1 of 2 failed \(exit code -9\); "
        r"torchrun stopped the others",
        last,
    ), rest
    assert not (root / "models" / "task2.pt").exists()
