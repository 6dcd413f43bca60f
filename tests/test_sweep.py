"""Sweeps: one worker or several give the same bytes; a job's key covers what decides it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import numerics
from pipeline.config import Paths, TrainParams
from pipeline.stages import train_task2
from pipeline.training import runner, stacked, sweep
from pipeline.training.loop import load_splits
from tests.conftest import tiny_project, write_params

SETTINGS = {
    "split": {"train_size": 200, "val_size": 50},
    "train": {"max_epochs": 3, "patience": 2, "workers": 1},
    "task2": {"learning_rates": [0.1, 0.05, 0.01], "hidden": [32]},
}
OUTPUTS = [
    "models/task2.pt",
    "reports/train/task2/history.csv",
    "reports/train/task2/best.json",
    "reports/plots/task2_curves.png",
]


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


def test_auto_workers_fill_the_cores_at_base_threads_each(monkeypatch):
    monkeypatch.setattr(numerics, "cores", lambda: 8)
    assert runner.worker_count(TrainParams(), 2) == 4
    assert runner.worker_count(TrainParams(), 1) == 8
    assert runner.worker_count(TrainParams(), 16) == 1
    assert runner.worker_count(TrainParams(workers=3), 2) == 3


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
    sweep.prepare_folder(tmp_path, {"keep"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "runs.json"]


def stacked_jobs(base: Path, folder: Path, lrs, **train) -> list[sweep.Job]:
    p = TrainParams(**{"max_epochs": 3, "patience": 2, **train})
    cs = [sweep.Candidate(f"lr={lr}", lr, (32,)) for lr in lrs]
    return [sweep.Job(c, p, 0, str(base), str(folder / c.label), c.label) for c in cs]


def test_stacked_sweep_equals_each_configuration_alone(base, tmp_path):
    """The CUDA path, run here on the CPU: what each configuration gets alone, to rounding."""
    data = load_splits(Paths(base), torch.device("cpu"))
    lrs = [0.1, 0.05, 0.01]
    events = []
    alone = [
        sweep.read_result(sweep.train_job(job, data, lambda e: None))
        for job in stacked_jobs(base, tmp_path / "alone", lrs)
    ]
    out = stacked.train(stacked_jobs(base, tmp_path / "stacked", lrs), data, events.append)
    assert list(out) == [f"lr={lr}" for lr in lrs]
    for (want, want_weights), label in zip(alone, out, strict=True):
        got, weights = sweep.read_result(out[label])
        assert (got.best_epoch, got.status, len(got.history)) == (
            want.best_epoch,
            want.status,
            len(want.history),
        )
        for a, b in zip(got.history, want.history, strict=True):
            for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
                assert a[k] == pytest.approx(b[k], abs=1e-5), (label, k)
        assert weights.keys() == want_weights.keys()
        for name in weights:
            torch.testing.assert_close(weights[name], want_weights[name], atol=1e-5, rtol=1e-4)
    kinds = [e[0] for e in events]
    assert kinds[:3] == ["start"] * 3 and kinds[-3:] == ["done"] * 3
    assert kinds.count("epoch") == sum(len(sweep.read_result(p)[0].history) for p in out.values())


def test_stacked_sweep_a_diverging_rate_leaves_the_others_alone(base, tmp_path):
    data = load_splits(Paths(base), torch.device("cpu"))
    lrs = [0.05, 1e6]  # logits: a huge rate overflows the loss within the first epoch
    jobs = stacked_jobs(base, tmp_path, lrs, softmax_output=False, max_epochs=2)
    out = stacked.train(jobs, data, lambda e: None)
    fine, broken = (sweep.read_result(out[f"lr={lr}"])[0] for lr in lrs)
    assert broken.status == "diverged" and len(broken.history) == 1
    alone = sweep.read_result(
        sweep.train_job(
            stacked_jobs(base, tmp_path / "alone", [0.05], softmax_output=False, max_epochs=2)[0],
            data,
            lambda e: None,
        )
    )[0]
    assert fine.status == "ok" and [r["val_loss"] for r in fine.history] == pytest.approx(
        [r["val_loss"] for r in alone.history], abs=1e-5
    )


def test_stacked_groups_only_plain_sgd_mlps_of_one_kind(base, tmp_path):
    jobs = stacked_jobs(base, tmp_path, [0.1, 0.05])
    c = jobs[0].candidate
    other = dataclasses.replace(jobs[0], candidate=dataclasses.replace(c, hidden=(16,)))
    adam = dataclasses.replace(jobs[0], candidate=dataclasses.replace(c, optimizer="adam"))
    assert stacked.groups([*jobs, other, adam]) == [jobs, [other]]


def test_the_pool_starts_the_smallest_learning_rate_first(base, tmp_path):
    jobs = stacked_jobs(base, tmp_path, [0.1, 0.005, 0.05, 0.005])
    assert [j.candidate.lr for j in sweep.queue_order(jobs)] == [0.005, 0.005, 0.05, 0.1]
    assert sweep.queue_order(jobs)[:2] == [jobs[1], jobs[3]]  # ties keep their order
