"""Sweeps: one worker or several give the same bytes; a job's key covers what decides it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import sweep, train_task2
from pipeline.config import Paths, TrainParams
from tests.conftest import tiny_project, write_params

SETTINGS = {
    "split": {"train_size": 200, "val_size": 50},
    "train": {"max_epochs": 3, "patience": 2, "workers": 1},
    "task2": {"learning_rates": [0.1, 0.05, 0.01], "hidden": [32]},
}
OUTPUTS = ["models/task2.pt", "reports/train/task2/history.csv", "reports/train/task2/best.json",
           "reports/plots/task2_curves.png"]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_project(tmp_path_factory.mktemp("sweep") / "p", per_letter=30, **SETTINGS)


def run_task2(base: Path, root: Path, workers: int, monkeypatch) -> dict[str, str]:
    shutil.copytree(base, root)
    write_params(root, **{**SETTINGS, "train": {**SETTINGS["train"], "workers": workers}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    assert train_task2.main(["--root", str(root)]) == 0
    return {p: hashlib.md5((root / p).read_bytes()).hexdigest() for p in OUTPUTS}


def test_one_worker_and_two_workers_write_the_same_bytes(base, tmp_path, monkeypatch):
    one = run_task2(base, tmp_path / "one", 1, monkeypatch)
    two = run_task2(base, tmp_path / "two", 2, monkeypatch)
    assert one == two
    timing = json.loads((tmp_path / "two" / "reports/timing/train_task2.json").read_text())
    assert timing["task2"]["workers"] == 2 and len(timing["task2"]["epoch_seconds"]) == 3


def test_job_key_covers_params_seed_and_data_but_not_the_pool(base):
    paths, cpu = Paths(base), torch.device("cpu")
    c = sweep.Candidate("lr=0.1", 0.1, (32,))
    p = TrainParams(max_epochs=3, patience=2)
    key = sweep.job_key(c, p, 0, paths, cpu)
    assert sweep.job_key(c, dataclasses.replace(p, workers=7), 0, paths, cpu) == key
    assert sweep.job_key(c, dataclasses.replace(p, batch_size=16), 0, paths, cpu) != key
    assert sweep.job_key(c, p, 1, paths, cpu) != key
    assert sweep.job_key(dataclasses.replace(c, lr=0.2), p, 0, paths, cpu) != key
    assert sweep.job_key(dataclasses.replace(c, label="other"), p, 0, paths, cpu) == key


def test_job_key_changes_with_the_data(base, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(base, root)
    c, p, cpu = sweep.Candidate("lr=0.1", 0.1, (32,)), TrainParams(), torch.device("cpu")
    before = sweep.job_key(c, p, 0, Paths(root), cpu)
    split = root / "data/split/split.csv"
    split.write_text(split.read_text().replace("train", "val", 1))
    assert sweep.job_key(c, p, 0, Paths(root), cpu) != before


def test_prepare_removes_stale_checkpoints_only(tmp_path):
    for name in ("keep", "stale"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_bytes(b"x")
    (tmp_path / "runs.json").write_text("{}")
    sweep.prepare(tmp_path, {"keep"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "runs.json"]
