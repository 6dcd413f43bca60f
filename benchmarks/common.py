"""Shared by the measurements: the archive, the split, scratch copies of the project."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch
import yaml

from pipeline import numerics
from pipeline.config import ROOT, BaseParams, DataParams, Paths, SplitParams, load
from pipeline.data import decode, splitting
from pipeline.training.loop import Split, load_splits

# What a temporary copy of the project needs for `dvc repro` (as tests/test_repro.py copies).
COPY = ["pipeline", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".gitignore"]
# The benchmark pins its own numerics; a child process must choose its own, not inherit ours.
NUMERICS_ENV = (
    *numerics.PORTABLE_ENV,
    "NOTMNIST_NUMERICS",
    "NOTMNIST_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)
STAGE_CMD = re.compile(r"python\s+-m\s+(\S+)")


def say(message: str) -> None:
    print(f"train_speed: {message}", file=sys.stderr, flush=True)


def child_env(**extra: str) -> dict:
    """The environment of a process the benchmark starts: no numerics settings of ours, the
    venv's tools first on PATH (the stages' `python` and `dvc`), lines unbuffered."""
    env = {k: v for k, v in os.environ.items() if k not in NUMERICS_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive when printed, so their times are right
    return {**env, **extra}


def find_archive(data: DataParams, root: Path) -> Path:
    """The first local entry of data.sources (a path relative to root, or file://) that exists."""
    for source in data.sources:
        url = urlparse(source)
        if url.scheme not in ("", "file"):
            continue
        path = Path(unquote(url.path) if url.scheme else source)
        path = path if path.is_absolute() else root / path
        if path.is_file():
            return path.resolve()
    sys.exit(f"train_speed: no local archive among data.sources {data.sources} (use --mirror)")


def seed(params_file: Path) -> int:
    return load(params_file, "base", BaseParams).seed


def decode_archive(archive: Path) -> tuple[dict, tuple]:
    """Time pipeline.data.decode.scan on the archive: the `clean` stage's work, all in memory."""
    start = time.perf_counter()
    images, index, rejected = decode.scan(archive)
    seconds = time.perf_counter() - start
    figures = {"seconds": seconds, "images": len(index), "images_per_s": len(index) / seconds}
    return figures, (images, index, rejected)


def build_splits(decoded: tuple, params_file: Path, root: Path, limit: int | None) -> dict:
    """The project's split under a scratch root, read back with loop.load_splits."""
    images, index, rejected = decoded
    paths = Paths(root)
    decode.save_clean(images, index, rejected, paths)
    p = load(params_file, "split", SplitParams)
    assigned = splitting.assign(index, p, p.seed)
    paths.split_dir.mkdir(parents=True, exist_ok=True)
    index[["path", "letter"]].assign(split=assigned).to_csv(
        paths.split_dir / "split.csv", index=False
    )
    return subset(load_splits(paths, torch.device("cpu")), limit, seed(params_file))


def subset(data: dict, limit: int | None, seed: int) -> dict:
    """At most `limit` images of each split: a seeded subset, so every letter stays in (the
    rows are sorted by letter)."""
    if not limit:
        return data
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in data.items():
        keep = torch.randperm(len(s), generator=g)[:limit].sort().values
        out[name] = Split(s.x[keep], s.y[keep])
    return out


def read_params(params_file: Path) -> dict:
    return yaml.safe_load(params_file.read_text())


def capped(params: dict, limit: int | None = None, max_epochs: int | None = None) -> dict:
    """params.yaml with split.train_size/val_size at most `limit` (the test split is the rest)
    and every section's max_epochs at most `max_epochs`: a quick run of the same pipeline."""
    out = yaml.safe_load(yaml.safe_dump(params))
    if limit:
        for key in ("train_size", "val_size"):
            out["split"][key] = min(out["split"].get(key, limit), limit)
    if max_epochs:
        for section in out.values():
            if isinstance(section, dict) and "max_epochs" in section:
                section["max_epochs"] = min(section["max_epochs"], max_epochs)
    return out


def split_params(params: dict) -> SplitParams:
    return SplitParams(**params["split"])


@contextmanager
def project_copy(params: dict, archive: Path, prefix: str) -> Iterator[Path]:
    """A fresh git + DVC copy of the project in a temporary folder, fed by `archive`.

    Yields the project root; its parent folder is scratch space (MLflow stores, artifacts).
    """
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = Path(tmp) / "project"
        for name in COPY:
            src, dst = ROOT / name, root / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(src, dst)
        write_params(root, {**params, "data": {**params["data"], "sources": [str(archive)]}})
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        yield root


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def mlflow_env(scratch: Path, name: str = "mlflow") -> dict:
    """A child environment whose MLflow runs go to a store in `scratch`."""
    return child_env(
        MLFLOW_TRACKING_URI=f"sqlite:///{scratch}/{name}.db",
        NOTMNIST_MLFLOW_ARTIFACTS=f"{scratch}/artifacts",
    )


def stage_modules(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, str]:
    """{stage: module} for every `python -m <module>` stage of dvc.yaml, in its order."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        if m := STAGE_CMD.search(str(stage.get("cmd", ""))):
            out[name] = m[1]
    return out


def run_module(module: str, root: Path, env: dict, *args: str) -> float:
    """`python -m module --root root ARGS` in root; its wall seconds. Exits on failure."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", module, "--root", str(root), *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stdout)
        sys.exit(f"train_speed: {module} failed with exit code {done.returncode}")
    return seconds


def timing_files(root: Path) -> dict[str, dict]:
    """{stage: its reports/timing/<stage>.json} under a project root."""
    folder = Paths(root).timing("x").parent
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
