"""Shared test helpers: tiny PNGs and archives built on the fly, a scratch project root."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from pathlib import Path

# Tests run side by side (pytest-xdist) and start stages, ranks and servers: idle OpenMP
# threads sleep at once, as where a stage's processes share the cores (numerics.sharing). Set
# before torch loads OpenMP; stage processes the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import numerics
from pipeline.config import ROOT

# Stages called in this process find torch pinned as their own processes pin it (params.yaml's
# base.numerics and base.threads defaults), before any test runs a torch operation.
numerics.configure("portable", 2)

pytest_plugins = ["tests.stack"]  # the session's PostgreSQL + S3 + MLflow server stack
MIRROR = Path(
    os.environ.get("NOTMNIST_MIRROR", ROOT.parent / "shared" / "data" / "notMNIST_small.tar.gz")
)
MIRROR_DIGEST = "2d379e7090811ece33b5eab67c7c217a01f47da4b4c94cd790117419ec934429"


@pytest.fixture
def mirror() -> Path:
    """The real data set; its absence is a failure, not a skip."""
    if not MIRROR.is_file():
        pytest.fail(f"data mirror not found at {MIRROR} (set NOTMNIST_MIRROR)")
    return MIRROR


def png_bytes(pixels: np.ndarray, mode: str = "L", fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt)
    return buf.getvalue()


def glyph(seed: int) -> np.ndarray:
    """A distinct 28x28 uint8 image per seed."""
    return np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_archive(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    """A .tar.gz holding `files` (name -> bytes) plus raw `extra` members (links, devices)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            add_file(tar, name, data)
        for info in extra:
            tar.addfile(info)
    return path


def tiny_dataset(per_letter: int = 12, top: str = "notMNIST_small") -> dict[str, bytes]:
    """A good archive's files: `per_letter` distinct PNGs in each folder A..J."""
    files = {}
    for c in range(10):
        letter = "ABCDEFGHIJ"[c]
        for i in range(per_letter):
            files[f"{top}/{letter}/img{i:03d}.png"] = png_bytes(glyph(max(100, per_letter) * c + i))
    return files


def write_params(root: Path, **sections) -> Path:
    """params.yaml under `root` from the repository's, with sections overridden."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def tiny_project(root: Path, per_letter: int = 12, **sections) -> Path:
    """A project root with a tiny archive, params.yaml and its data stages run."""
    import json

    from pipeline import clean, download, split, validate
    from pipeline.config import Paths

    paths = Paths(root)
    (root / "data" / "raw").mkdir(parents=True)
    make_archive(paths.raw_archive, tiny_dataset(per_letter=per_letter))
    sections.setdefault("split", {"train_size": 60, "val_size": 30})
    write_params(root, **sections)
    paths.data_reports.mkdir(parents=True)
    digest = download.content_digest(paths.raw_archive)
    report = {"content_digest": digest, "source": "tiny.tar.gz"}
    (paths.data_reports / "download.json").write_text(json.dumps(report))
    for stage in (clean, validate, split):
        assert stage.main(["--root", str(root)]) == 0, stage.__name__
    return root


TINY_TRAINING = {  # a few seconds per task on the tiny data
    "train": {"batch_size": 16, "max_epochs": 2, "patience": 1, "device": "cpu"},
    "task2": {"learning_rates": [0.1, 0.05], "hidden": [16]},
    "task3": {"hidden_sizes": [8, 16]},
    "task4": {"hidden": [8, 8]},
    "task5": {"hidden": [16], "dropout": 0.5},
    "task6": {"max_epochs": 2, "patience": 1, "cnn_hidden": [8]},
    "task7": {"widths": [4, 8, 8], "batch_size": 16, "max_epochs": 2, "patience": 1},
}


def training_stages() -> list[str]:
    """The train_* stages of dvc.yaml, in its order (each task's inputs come before it)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return [name for name in stages if name.startswith("train_")]


def train_every_task(root: Path, artifacts: Path, *after, tracking_uri: str | None = None) -> None:
    """Every training stage of dvc.yaml, `evaluate`, then each stage module in `after`, in this
    process, on `root`; torch's deterministic-algorithm settings are restored afterwards."""
    import importlib

    import torch

    from pipeline import evaluate

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with pytest.MonkeyPatch.context() as mp:
        if tracking_uri is None:
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        else:
            mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mp.setenv("NOTMNIST_MLFLOW_ARTIFACTS", str(artifacts))
        mp.chdir(root)
        args = ["--root", str(root)]
        for name in training_stages():
            assert importlib.import_module(f"pipeline.{name}").main(args) == 0, name
        for stage in (evaluate, *after):
            assert stage.main(args) == 0, stage.__name__
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory):
    """A tiny project with every task trained, evaluated and its champion registered.

    Returns (root, tracking URI). The store is the project's default, <root>/mlflow.db, so
    commands run with --root find it without MLFLOW_TRACKING_URI.
    """
    base = tmp_path_factory.mktemp("trained")
    root = tiny_project(base / "proj", **TINY_TRAINING)
    train_every_task(root, base / "artifacts")
    return root, f"sqlite:///{root / 'mlflow.db'}"


@contextlib.contextmanager
def unknown_parent_run(root: Path, task: str):
    """reports/train/<task>/mlflow.json naming a parent run no store has, restored after."""
    path = root / "reports" / "train" / task / "mlflow.json"
    saved = path.read_text()
    path.write_text(json.dumps({**json.loads(saved), "parent_run_id": "0" * 32}))
    try:
        yield
    finally:
        path.write_text(saved)


# The longest files (measured: 3 to 5 minutes each), longest first. `make test`'s workers take
# one file at a time in collection order (--no-loadscope-reorder; xdist's default order puts
# the files with the most tests first), so these start at once, side by side, and the short
# files fill in around them instead of leaving one worker alone with a long file at the end.
LONGEST = ("test_repro.py", "test_interrupt.py", "test_repro_study.py", "test_benchmark.py",
           "test_team.py")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    """Put the LONGEST files first, keeping the order of tests within each file."""
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST)))
